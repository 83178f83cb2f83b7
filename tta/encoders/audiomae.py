"""AudioMAE encoder (Huang et al. 2022) as a feature extractor, as used by Re-AudioLDM.

Only the encoder of the masked autoencoder is built (no masking, no decoder): feature
extraction runs the ViT over every patch.

1. Kaldi fbank with 128 bins (``audiomae`` `MelFrontend` preset: 16 kHz, 25 ms / 10 ms), 10.24 s
   clips padded/cropped to ``num_frames`` = 1024 frames (raw value 0 for padding, as AudioMAE),
   normalised as ``(fbank - mean) / (2 * std)`` with AudioSet statistics;
2. 16 x 16 patches of the ``(frames, 128)`` image -> 64 x 8 = 512 tokens, fixed 2-D sin-cos
   position embeddings (first half of the channels: frequency index, second half: time index,
   as in the MAE code), a learned ``[CLS]`` token with a zero position;
3. ViT-B: 12 pre-norm blocks of width 768 with 12 heads (timm's `Block`, as the official AudioMAE
   code builds its encoder from timm), final LayerNorm (about 85.3 M parameters);
4. ``seq`` = the normalised patch tokens ``(B, 512, 768)`` in time-major order (``[CLS]``
   dropped); ``pooled`` = their mean, reduced to ``out_dim`` (32, Re-AudioLDM's retrieval
   feature), or the 768-d mean itself when ``out_dim`` is None.

The reduction to ``out_dim`` is not part of the pretrained AudioMAE. ``reduction="group_mean"``
(the paper config) averages ``embed_dim / out_dim`` consecutive channels: weight-free, so the
public checkpoint alone determines the feature (`tta.encoders.audiomae_import`). ``"linear"`` is a
learned/fixed ``proj`` layer whose weights must then come with the loaded state dict. Parameter
names follow the AudioMAE / timm layout (``patch_embed.proj``, ``cls_token``,
``blocks.i.attn.qkv``, ``blocks.i.mlp.fc1``, ``norm``); the fixed ``pos_embed`` is recomputed, not
stored (the importer checks the checkpoint's copy against it).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tta.encoders.base import AudioEmbedding, AudioEncoder
from tta.encoders.cnn14 import build_frontend, check_waveform, fit_length
from tta.registry import register

log = logging.getLogger(__name__)

AUDIOSET_FBANK_MEAN = -4.2677393
AUDIOSET_FBANK_STD = 4.5689974
REDUCTIONS = ("linear", "group_mean")


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``(N,)`` positions -> ``(N, dim)``: sines then cosines of geometric frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """Fixed position embeddings ``(rows * cols, dim)`` for a row-major grid (rows = time)."""
    if dim % 4:
        raise ValueError(f"sin-cos 2-D position embedding needs a width divisible by 4, got {dim}")
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, c.flatten()), sincos_1d(dim // 2, r.flatten())], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping square patches of a one-channel image: ``(B, 1, H, W)`` -> ``(B, D, H/p, W/p)``."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def vit_block(dim: int, num_heads: int, mlp_ratio: float) -> nn.Module:
    """timm's pre-norm ViT block as MAE / AudioMAE build it: fused ``qkv`` with bias, LayerNorm eps
    1e-6, GELU MLP (state keys ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``)."""
    from timm.models.vision_transformer import Block

    if dim % num_heads:
        raise ValueError(f"AudioMAE: width {dim} is not divisible by {num_heads} heads")
    return Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))


@register("encoder", "audiomae")
class AudioMAE(AudioEncoder):
    """AudioMAE ViT encoder: waveform ``(B, T)`` -> ``AudioEmbedding(pooled (B, dim), seq (B, N, embed_dim))``.

    Args:
        out_dim: width of the reduced clip feature (32 for Re-AudioLDM); None: no reduction,
            ``dim`` = ``embed_dim``.
        reduction: how the 768-d mean becomes ``out_dim`` wide: ``"linear"`` (a ``proj`` layer,
            part of the state dict) or ``"group_mean"`` (mean of ``embed_dim / out_dim``
            consecutive channels; no weights).
        embed_dim, depth, num_heads, mlp_ratio: ViT size (768, 12, 12, 4: ViT-B).
        patch_size: square patch side (16).
        num_frames: fbank frames per clip (1024); None pads to a multiple of ``patch_size``
            (the position embedding is fixed, so any length works).
        clip_seconds: pad/crop every clip to this duration first (10.24); None: any length.
        norm_mean, norm_std: fbank normalisation ``(x - mean) / (2 * std)`` (AudioSet values).
        mel_preset: `MelFrontend` preset (``audiomae``: Kaldi fbank, 128 bins).
        mel: `MelConfig` fields overriding the preset.
    """

    def __init__(
        self,
        out_dim: int | None = 32,
        reduction: str = "linear",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        num_frames: int | None = 1024,
        clip_seconds: float | None = 10.24,
        norm_mean: float = AUDIOSET_FBANK_MEAN,
        norm_std: float = AUDIOSET_FBANK_STD,
        mel_preset: str = "audiomae",
        mel: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.frontend = build_frontend(mel_preset, **(mel or {}))
        self.sample_rate = self.frontend.sample_rate
        n_mels = self.frontend.n_mels
        if n_mels % patch_size or (num_frames is not None and num_frames % patch_size):
            raise ValueError(
                f"AudioMAE: n_mels ({n_mels}) and num_frames ({num_frames}) must be multiples of "
                f"patch_size ({patch_size})"
            )
        if norm_std <= 0:
            raise ValueError(f"AudioMAE.norm_std must be positive, got {norm_std}")
        self.embed_dim, self.patch_size, self.num_frames = int(embed_dim), int(patch_size), num_frames
        self.clip_seconds = clip_seconds
        self.clip_samples = None if clip_seconds is None else round(clip_seconds * self.sample_rate)
        self.min_samples = self.frontend.config.win_length
        if self.clip_samples is not None and self.clip_samples < self.min_samples:
            raise ValueError(f"AudioMAE.clip_seconds={clip_seconds} is shorter than one fbank window")
        self.norm_mean, self.norm_std = float(norm_mean), float(norm_std)
        self.freq_patches = n_mels // patch_size

        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(vit_block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        if reduction not in REDUCTIONS:
            raise ValueError(f"AudioMAE.reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if reduction == "group_mean" and out_dim is not None and embed_dim % out_dim:
            raise ValueError(f"AudioMAE: reduction 'group_mean' needs out_dim ({out_dim}) to divide "
                             f"embed_dim ({embed_dim})")
        self.reduction = reduction
        self.proj = nn.Linear(embed_dim, out_dim) if out_dim is not None and reduction == "linear" else None
        self.dim = int(out_dim) if out_dim is not None else self.embed_dim
        if num_frames is not None:
            pos = sincos_2d(embed_dim, num_frames // patch_size, self.freq_patches)
        else:
            pos = torch.empty(0, embed_dim)
        self.register_buffer("pos_embed", pos, persistent=False)
        self._init_weights()
        log.debug("AudioMAE built: width %d, depth %d, heads %d, dim %d", embed_dim, depth, num_heads, self.dim)

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def fbank(self, wav: torch.Tensor) -> torch.Tensor:
        """Normalised fbank image ``(B, 1, frames, n_mels)``, padded/cropped as configured."""
        check_waveform(wav, "AudioMAE", 1 if self.clip_samples else self.min_samples)
        if self.clip_samples is not None:
            wav = fit_length(wav, self.clip_samples)
        fb = self.frontend(wav).transpose(1, 2)  # (B, frames, n_mels)
        frames = fb.shape[1]
        target = self.num_frames
        if target is None:
            target = -(-frames // self.patch_size) * self.patch_size
        fb = F.pad(fb, (0, 0, 0, target - frames)) if frames < target else fb[:, :target]
        return ((fb - self.norm_mean) / (2 * self.norm_std)).unsqueeze(1)

    def forward(self, wav: torch.Tensor) -> AudioEmbedding:
        """Waveform ``(B, T)`` at `sample_rate` -> pooled ``(B, dim)`` and patch tokens ``(B, N, embed_dim)``."""
        x = self.patch_embed(self.fbank(wav))  # (B, D, time patches, freq patches)
        b, d, rows, cols = x.shape
        x = x.flatten(2).transpose(1, 2)
        pos = self.pos_embed
        if pos.shape[0] != rows * cols:
            pos = sincos_2d(d, rows, cols)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x + pos.to(device=x.device, dtype=x.dtype)], dim=1)
        for block in self.blocks:
            x = block(x)
        seq = self.norm(x)[:, 1:]
        pooled = seq.mean(dim=1)
        if self.proj is not None:
            pooled = self.proj(pooled)
        elif self.dim != self.embed_dim:  # group_mean
            pooled = pooled.view(b, self.dim, self.embed_dim // self.dim).mean(dim=-1)
        return AudioEmbedding(pooled=pooled, seq=seq)
