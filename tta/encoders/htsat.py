"""HTS-AT (Chen et al. 2022), the hierarchical token-semantic audio transformer of MS-CLAP 2023.

Pipeline for one window of audio:

1. log-mel ``(n_mels, frames)`` from the `MelFrontend` preset (``msclap``: 44.1 kHz, hop 320,
   64 mels, 50-8000 Hz), resized in time (linear interpolation) to ``spec_frames`` (1024), and a
   BatchNorm over the mel bins;
2. HTS-AT's "freq ratio" folding: the ``spec_frames`` axis is cut into ``freq_ratio`` (4) chunks
   stacked along frequency, so a 64 x 1024 mel becomes a 256 x 256 image;
3. patch embedding (4 x 4 patches, ``embed_dim`` 96) and four Swin-Transformer stages (depths
   2, 2, 6, 2; heads 4, 8, 16, 32; window 8) of windowed self-attention with shifted windows and
   relative position bias, with patch merging between stages (widths 96 -> 768);
4. the token-semantic head: the final feature map is unfolded back to chronological order and a
   ``(rows per chunk) x 3`` convolution gives per-embedding frame activations ``(frames', dim)``
   (32 frames per window); their mean over time is the clip embedding (``dim`` = 768).

LAION CLAP's HTSAT (transformers ``ClapAudioModel``, fusion off) is the same network with three
options (`tta.encoders.clap_import` maps its weights with a key table): ``head="mean"`` (no
token-semantic conv: the clip embedding is the mean of the final normalised tokens, ``dim`` =
the last stage's width, ``seq`` the per-frame means over frequency), ``resize="bicubic"`` (the
BatchNorm first, then a bicubic ``align_corners=True`` resize in time) and ``pad="repeat"``
(a short clip is tiled ``window // length`` times, then zero-padded: LAION's ``repeatpad``), on
the ``laion`` mel preset (48 kHz power mel in dB, `tta.data.mel`).

About 31 M parameters at paper size. Parameter names follow the original checkpoint layout
(``patch_embed.proj``, ``layers.i.blocks.j.attn.relative_position_bias_table``,
``layers.i.downsample.reduction``, ``tscam_conv``, ``bn0``).

Input length: ``clip_seconds`` (if set) pads/crops every clip first. Clips are then cut into
windows of ``window_seconds`` (7 s, the MS-CLAP training segment): a shorter clip is zero-padded
to one window; a longer clip is, in training mode, randomly cropped to one window (MS-CLAP's
random truncation), and in eval mode split into consecutive non-overlapping windows (the last
one aligned to the clip's end, so no silence is added) whose frame activations are concatenated
(``seq``) and averaged (``pooled``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tta.encoders.base import AudioEmbedding, AudioEncoder
from tta.encoders.cnn14 import build_frontend, check_waveform, fit_length
from tta.registry import register

log = logging.getLogger(__name__)


def window_partition(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B * windows, wh * ww, C)``, windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def window_reverse(windows: torch.Tensor, wh: int, ww: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `window_partition`: ``(B * windows, wh * ww, C)`` -> ``(B, H, W, C)``."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // wh) * (w // ww))
    x = windows.view(b, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop whole residual branches per sample with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Mlp(nn.Module):
    """``Linear -> GELU -> Linear``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ``wh x ww`` windows with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int]) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"WindowAttention: width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.window = window
        wh, ww = window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
        rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
        index = (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)
        self.register_buffer("relative_position_index", index, persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B * nW, N, C)``; ``mask``: additive ``(nW, N, N)`` or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.num_heads).permute(2, 0, 1).to(q.dtype)  # (heads, N, N)
        if mask is None:
            attn_bias = bias.unsqueeze(0).expand(bw, -1, -1, -1)
        else:
            nw = mask.shape[0]
            attn_bias = bias.unsqueeze(0) + mask.to(q.dtype).unsqueeze(1)  # (nW, heads, N, N)
            attn_bias = attn_bias.unsqueeze(0).expand(bw // nw, -1, -1, -1, -1).reshape(bw, self.num_heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP block on a ``(B, H, W, C)`` map."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        resolution: tuple[int, int],
        window_size: int,
        shift: bool,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        h, w = resolution
        # a map smaller than the window is attended as one window, without shifting (as in Swin)
        self.window = (min(window_size, h), min(window_size, w))
        wh, ww = self.window
        if h % wh or w % ww:
            raise ValueError(f"SwinBlock: feature map {h}x{w} is not divisible into {wh}x{ww} windows")
        self.shift = (wh // 2 if shift and h > window_size else 0, ww // 2 if shift and w > window_size else 0)
        self.resolution = resolution
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, self.window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.register_buffer("attn_mask", self._shift_mask() if any(self.shift) else None, persistent=False)

    def _shift_mask(self) -> torch.Tensor:
        """Additive mask ``(nW, N, N)`` keeping tokens from different regions of a rolled window apart."""
        (h, w), (wh, ww), (sh, sw) = self.resolution, self.window, self.shift
        img = torch.zeros(1, h, w, 1)
        label = 0
        for hs in (slice(0, h - wh), slice(h - wh, h - sh), slice(h - sh, h)):
            for ws in (slice(0, w - ww), slice(w - ww, w - sw), slice(w - sw, w)):
                img[:, hs, ws, :] = label
                label += 1
        win = window_partition(img, wh, ww).squeeze(-1)  # (nW, N)
        diff = win.unsqueeze(1) - win.unsqueeze(2)
        return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        if (h, w) != self.resolution:
            raise ValueError(f"SwinBlock built for a {self.resolution} map got {(h, w)}")
        (wh, ww), (sh, sw) = self.window, self.shift
        y = self.norm1(x)
        if sh or sw:
            y = torch.roll(y, shifts=(-sh, -sw), dims=(1, 2))
        y = window_reverse(self.attn(window_partition(y, wh, ww), self.attn_mask), wh, ww, h, w)
        if sh or sw:
            y = torch.roll(y, shifts=(sh, sw), dims=(1, 2))
        x = x + drop_path(y, self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchMerging(nn.Module):
    """Concatenate 2x2 neighbours and project ``4C -> 2C``: ``(B, H, W, C)`` -> ``(B, H/2, W/2, 2C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """``depth`` Swin blocks (alternately shifted), then optional patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        resolution: tuple[int, int],
        window_size: int,
        mlp_ratio: float,
        drop_paths: list[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, resolution, window_size, i % 2 == 1, mlp_ratio, drop_paths[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches of a one-channel image -> ``(B, H/p, W/p, C)`` tokens."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


@register("encoder", "htsat")
class HTSAT(AudioEncoder):
    """HTS-AT audio encoder: waveform ``(B, T)`` -> ``AudioEmbedding(pooled (B, dim), seq (B, T', dim))``.

    Args:
        dim: embedding width, the output channels of the token-semantic conv (768).
        embed_dim: width of the first stage (96); it doubles at every patch merging.
        depths: Swin blocks per stage ((2, 2, 6, 2)).
        num_heads: attention heads per stage ((4, 8, 16, 32)).
        window_size: attention window in tokens (8).
        patch_size: patch side in mel bins / frames (4).
        spec_frames: mel frames per window fed to the transformer (1024); mels are resized to it.
        freq_ratio: time chunks folded onto the frequency axis (4).
        mlp_ratio: MLP hidden width over block width (4).
        drop_path: stochastic depth rate, increasing linearly over blocks to this value (0.1).
        window_seconds: audio per window (7 s, MS-CLAP's training segment); see the module doc.
        clip_seconds: pad/crop every clip to this duration first; None accepts any length.
        mel_preset: `MelFrontend` preset (``msclap``).
        mel: `MelConfig` fields overriding the preset.
        head: ``"tscam"`` (token-semantic conv, MS-CLAP) or ``"mean"`` (mean of the final
            tokens, LAION; ``dim`` must then be the last stage's width).
        resize: time resize of the mel to ``spec_frames``: ``"linear"`` before the BatchNorm, or
            ``"bicubic"`` (``align_corners=True``) after it (LAION).
        pad: a clip shorter than a window is ``"zero"``-padded or ``"repeat"``-ed then
            zero-padded (LAION's ``repeatpad``).
    """

    def __init__(
        self,
        dim: int = 768,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (4, 8, 16, 32),
        window_size: int = 8,
        patch_size: int = 4,
        spec_frames: int = 1024,
        freq_ratio: int = 4,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.1,
        window_seconds: float = 7.0,
        clip_seconds: float | None = None,
        mel_preset: str = "msclap",
        mel: dict[str, Any] | None = None,
        head: Literal["tscam", "mean"] = "tscam",
        resize: Literal["linear", "bicubic"] = "linear",
        pad: Literal["zero", "repeat"] = "zero",
    ) -> None:
        super().__init__()
        for name, value, allowed in (("head", head, ("tscam", "mean")), ("resize", resize, ("linear", "bicubic")),
                                     ("pad", pad, ("zero", "repeat"))):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"HTSAT.{name} must be one of {', '.join(allowed)}, got {value!r}")
        self.head, self.resize, self.pad = head, resize, pad
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"HTSAT: depths {depths} and num_heads {num_heads} must be non-empty and equally long")
        self.frontend = build_frontend(mel_preset, **(mel or {}))
        self.sample_rate = self.frontend.sample_rate
        n_mels = self.frontend.n_mels
        self.dim, self.spec_frames, self.freq_ratio = int(dim), int(spec_frames), int(freq_ratio)
        self.window_seconds, self.clip_seconds = float(window_seconds), clip_seconds
        self.window_samples = round(window_seconds * self.sample_rate)
        self.clip_samples = None if clip_seconds is None else round(clip_seconds * self.sample_rate)
        if self.window_samples < self.frontend.config.n_fft:
            raise ValueError(f"HTSAT.window_seconds={window_seconds} is shorter than one STFT window")
        if self.clip_samples is not None and self.clip_samples <= 0:
            raise ValueError(f"HTSAT.clip_seconds must be positive, got {clip_seconds}")
        reduction = patch_size * 2 ** (len(depths) - 1)  # total downsampling of the image
        if spec_frames % (freq_ratio * reduction) or n_mels % reduction:
            raise ValueError(
                f"HTSAT: spec_frames ({spec_frames}) must be a multiple of freq_ratio * patch_size * "
                f"2**(stages-1) = {freq_ratio * reduction} and n_mels ({n_mels}) a multiple of {reduction}"
            )
        self.bn0 = nn.BatchNorm1d(n_mels)
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        res = (n_mels * freq_ratio // patch_size, spec_frames // freq_ratio // patch_size)
        rates = torch.linspace(0, drop_path, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        width = embed_dim
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            last = i == len(depths) - 1
            done = sum(depths[:i])
            self.layers.append(
                SwinStage(width, depth, heads, res, window_size, mlp_ratio, rates[done : done + depth], not last)
            )
            if not last:
                width, res = 2 * width, (res[0] // 2, res[1] // 2)
        self.num_features = width
        self.final_resolution = res
        self.norm = nn.LayerNorm(width)
        self.rows_per_chunk = res[0] // freq_ratio
        if head == "tscam":
            self.tscam_conv = nn.Conv2d(width, self.dim, kernel_size=(self.rows_per_chunk, 3), padding=(0, 1))
        elif self.dim != width:
            raise ValueError(f"HTSAT(head='mean'): dim ({dim}) must be the last stage's width ({width})")
        self.frames_per_window = freq_ratio * res[1]
        self.apply(self._init_weights)
        log.debug("HTSAT built: widths %d..%d, final map %s, dim %d", embed_dim, width, res, self.dim)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, WindowAttention):
            nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    def windows(self, wav: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Cut ``(B, T)`` into ``(B * n, window_samples)`` windows; returns them and ``n``."""
        b, t = wav.shape
        size = self.window_samples
        if t < size and self.pad == "repeat":
            wav = wav.repeat(1, size // t)
        if t <= size:
            return fit_length(wav, size), 1
        if self.training:  # one random window per clip
            starts = torch.randint(0, t - size + 1, (b,)).tolist()
            return torch.stack([wav[i, s : s + size] for i, s in enumerate(starts)]), 1
        n = math.ceil(t / size)
        starts = [i * size for i in range(n - 1)] + [t - size]
        return torch.stack([wav[:, s : s + size] for s in starts], dim=1).reshape(b * n, size), n

    def encode_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel ``(B, n_mels, frames)`` of one window -> frame activations ``(B, T', dim)``."""
        if self.resize == "bicubic":  # LAION: normalise, then resize
            x = self.bn0(mel)
            if x.shape[-1] != self.spec_frames:
                size = (x.shape[1], self.spec_frames)
                x = F.interpolate(x.unsqueeze(1), size=size, mode="bicubic", align_corners=True).squeeze(1)
        else:
            if mel.shape[-1] != self.spec_frames:
                mel = F.interpolate(mel, size=self.spec_frames, mode="linear", align_corners=False)
            x = self.bn0(mel)
        b, m, t = x.shape
        # fold freq_ratio time chunks onto the frequency axis: row c * n_mels + m holds chunk c
        x = x.reshape(b, m, self.freq_ratio, t // self.freq_ratio).transpose(1, 2)
        x = self.patch_embed(x.reshape(b, 1, self.freq_ratio * m, t // self.freq_ratio))
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)  # (B, H', W', C)
        w, c = x.shape[2:]
        if self.head == "mean":  # chunk k's rows are time positions k * W' .. (k + 1) * W' - 1
            return x.view(b, self.freq_ratio, self.rows_per_chunk, w, c).mean(2).reshape(b, self.freq_ratio * w, c)
        # unfold: chunk c's rows go back to time positions c * W' .. (c + 1) * W' - 1
        x = x.view(b, self.freq_ratio, self.rows_per_chunk, w, c).permute(0, 4, 2, 1, 3)
        x = x.reshape(b, c, self.rows_per_chunk, self.freq_ratio * w)
        return self.tscam_conv(x).squeeze(2).transpose(1, 2)

    def forward(self, wav: torch.Tensor) -> AudioEmbedding:
        """Waveform ``(B, T)`` at `sample_rate` -> ``AudioEmbedding(pooled (B, dim), seq (B, n * T', dim))``."""
        check_waveform(wav, "HTSAT", 1)
        if self.clip_samples is not None:
            wav = fit_length(wav, self.clip_samples)
        b = wav.shape[0]
        chunks, n = self.windows(wav)
        frames = self.encode_mel(self.frontend(chunks))  # (B * n, T', dim)
        seq = frames.reshape(b, n * frames.shape[1], self.dim)
        return AudioEmbedding(pooled=seq.mean(dim=1), seq=seq)
