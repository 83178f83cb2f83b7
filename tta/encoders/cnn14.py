"""CNN14 (PANNs, Kong et al. 2020): a VGG-like CNN over log-mels, pooled to a clip embedding.

Architecture (paper size): a BatchNorm over the mel bins, six conv blocks with 64, 128, 256, 512,
1024, 2048 channels (each ``2 x (3x3 conv, BN, ReLU)`` then a 2x2 average pool; the last block
pools 1x1 as in PANNs), the mean over frequency, then ``max + mean`` over time, ``fc1`` (2048 ->
``dim``) with ReLU as the embedding and an optional AudioSet head ``fc_audioset`` (527 classes)
whose logits `CNN14.classify` exposes for KL / IS style metrics. About 80.8 M parameters.

Front-end: exactly PANNs' (torchlibrosa ``Spectrogram`` + ``LogmelFilterBank``): a centred,
reflect-padded Hann STFT, power spectrum, librosa's Slaney mel bank and ``10 log10(max(mel,
1e-10))`` (`MelFrontend` kind ``stft_db``), so real PANNs weights see the features they were
trained on. Presets: ``"panns"`` (Cnn14, 32 kHz, window 1024, hop 320, 64 mels, 50-14000 Hz) and
``"panns16k"`` (Cnn14_16k, the classifier of AudioLDM's evaluation: 16 kHz, window 512, hop 160,
50-8000 Hz). Parameter names follow the PANNs checkpoint layout (``conv_block1.conv1``, ``bn0``,
``fc1``, ``fc_audioset``) so real weights load key for key.

The waveform helpers `check_waveform`, `fit_length` and `build_frontend` are shared by the audio
encoders of tta (HTSAT, AudioMAE).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tta.data.mel import MelFrontend
from tta.encoders.base import AudioEmbedding, AudioEncoder
from tta.registry import register

log = logging.getLogger(__name__)

PANNS_MEL: dict[str, Any] = {
    "name": "panns",
    "sample_rate": 32000,
    "n_fft": 1024,
    "win_length": 1024,
    "hop_length": 320,
    "n_mels": 64,
    "f_min": 50.0,
    "f_max": 14000.0,
    "log_floor": 1e-10,
    "kind": "stft_db",
}
PANNS_PRESETS: dict[str, dict[str, Any]] = {
    "panns": PANNS_MEL,
    "panns16k": {**PANNS_MEL, "name": "panns16k", "sample_rate": 16000, "n_fft": 512, "win_length": 512,
                 "hop_length": 160, "f_max": 8000.0},
}


def build_frontend(preset: str | None, **overrides: Any) -> MelFrontend:
    """A `MelFrontend`; built on the CPU when the default device is ``meta``.

    The mel bank cannot be computed on the meta device, and its buffers are constants, so a model
    instantiated on ``meta`` (to count parameters) gets a real CPU front-end.
    """
    if torch.get_default_device().type == "meta":
        with torch.device("cpu"):
            return MelFrontend(preset, **overrides)
    return MelFrontend(preset, **overrides)


def check_waveform(wav: torch.Tensor, owner: str, min_samples: int) -> None:
    """Raise ``ValueError`` unless ``wav`` is a floating ``(B, T)`` batch with ``T >= min_samples``."""
    if not isinstance(wav, torch.Tensor):
        raise TypeError(f"{owner} expects a torch.Tensor waveform (B, T), got {type(wav).__name__}")
    if wav.dim() != 2:
        raise ValueError(f"{owner} expects a mono waveform batch (B, T), got shape {tuple(wav.shape)}")
    if not wav.is_floating_point():
        raise ValueError(f"{owner} expects a floating-point waveform, got dtype {wav.dtype}")
    if wav.shape[0] == 0:
        raise ValueError(f"{owner} got an empty batch (shape {tuple(wav.shape)})")
    if wav.shape[1] < min_samples:
        raise ValueError(
            f"{owner}: clip of {wav.shape[1]} samples is too short; at least {min_samples} samples are needed"
        )


def fit_length(wav: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Zero-pad at the end or crop from the start to exactly ``num_samples`` samples."""
    t = wav.shape[-1]
    if t > num_samples:
        return wav[..., :num_samples]
    if t < num_samples:
        return F.pad(wav, (0, num_samples - t))
    return wav


class ConvBlock(nn.Module):
    """``2 x (3x3 conv without bias, BatchNorm, ReLU)`` then average pooling."""

    def __init__(self, in_channels: int, out_channels: int, pool_size: tuple[int, int] = (2, 2)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.pool_size = tuple(pool_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        if self.pool_size != (1, 1):
            x = F.avg_pool2d(x, kernel_size=self.pool_size)
        return x


@register("encoder", "cnn14")
class CNN14(AudioEncoder):
    """PANNs CNN14 audio encoder: waveform ``(B, T)`` -> ``AudioEmbedding(pooled (B, dim), seq)``.

    ``seq`` is the frame sequence of the last conv block averaged over frequency,
    ``(B, frames / 32, channels[-1])``.

    Args:
        dim: embedding width (output of ``fc1``; 2048 in PANNs).
        channels: widths of the six conv blocks (64 ... 2048 in PANNs); any number of blocks.
        pool_sizes: average-pool size after each block; default 2x2 for all but the last (1x1).
        num_classes: size of the classifier head (527 AudioSet classes), or None for none.
        dropout: dropout after each conv block (0.2) and before the fully connected layers (0.5).
        clip_seconds: pad/crop every clip to this duration; None accepts any length.
        mel: the front-end: ``"panns"`` (32 kHz), ``"panns16k"`` (Cnn14_16k), or `MelConfig`
            fields overriding ``"panns"``.
    """

    def __init__(
        self,
        dim: int = 2048,
        channels: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048),
        pool_sizes: tuple[tuple[int, int], ...] | None = None,
        num_classes: int | None = 527,
        dropout: tuple[float, float] = (0.2, 0.5),
        clip_seconds: float | None = None,
        mel: str | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) <= 0:
            raise ValueError(f"CNN14.channels must be positive widths, got {channels}")
        if pool_sizes is None:
            pool_sizes = ((2, 2),) * (len(channels) - 1) + ((1, 1),)
        pool_sizes = tuple(tuple(int(s) for s in p) for p in pool_sizes)  # type: ignore[misc]
        if len(pool_sizes) != len(channels):
            raise ValueError(f"CNN14: {len(channels)} channels but {len(pool_sizes)} pool_sizes")
        if isinstance(mel, str) and mel not in PANNS_PRESETS:
            raise ValueError(f"CNN14.mel must be one of {', '.join(PANNS_PRESETS)} or a dict, got {mel!r}")
        front = PANNS_PRESETS[mel] if isinstance(mel, str) else {**PANNS_MEL, **(mel or {})}
        self.frontend = build_frontend(None, **front)
        self.sample_rate = self.frontend.sample_rate
        self.dim = int(dim)
        self.num_classes = num_classes
        self.clip_seconds = clip_seconds
        self.block_dropout, self.fc_dropout = float(dropout[0]), float(dropout[1])
        self.pool_sizes = pool_sizes
        # frames and mel bins must survive every pooling
        self.min_frames = 1
        min_bins = 1
        for p in pool_sizes:
            self.min_frames *= p[0]
            min_bins *= p[1]
        if self.frontend.n_mels < min_bins:
            raise ValueError(f"CNN14: {self.frontend.n_mels} mel bins cannot be pooled {min_bins}x")

        self.bn0 = nn.BatchNorm1d(self.frontend.n_mels)
        blocks = []
        in_ch = 1
        for i, (out_ch, pool) in enumerate(zip(channels, pool_sizes)):
            blocks.append((f"conv_block{i + 1}", ConvBlock(in_ch, out_ch, pool)))
            in_ch = out_ch
        for name, block in blocks:
            self.add_module(name, block)
        self.num_blocks = len(blocks)
        self.fc1 = nn.Linear(in_ch, self.dim)
        self.fc_audioset = nn.Linear(self.dim, num_classes) if num_classes else None
        self._init_weights()
        self.clip_samples: int | None = None
        if clip_seconds is not None:
            self.clip_samples = round(clip_seconds * self.sample_rate)
            if self.clip_samples < self.min_samples:
                raise ValueError(
                    f"CNN14.clip_seconds={clip_seconds} gives {self.clip_samples} samples, fewer than the "
                    f"{self.min_samples} the network needs"
                )
        log.debug("CNN14 built: channels %s, dim %d, classes %s", channels, self.dim, num_classes)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def min_samples(self) -> int:
        """The shortest clip (in samples) that survives the front-end and every pooling."""
        hop = self.frontend.hop_length
        return max(self.frontend.config.n_fft, self.min_frames * hop)

    def features(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding ``(B, dim)`` and frame sequence ``(B, frames', channels[-1])`` of a waveform."""
        check_waveform(wav, "CNN14", 1 if self.clip_samples else self.min_samples)
        if self.clip_samples is not None:
            wav = fit_length(wav, self.clip_samples)
        mel = self.frontend(wav)  # (B, n_mels, frames)
        x = self.bn0(mel).transpose(1, 2).unsqueeze(1)  # (B, 1, frames, n_mels)
        for i in range(self.num_blocks):
            x = getattr(self, f"conv_block{i + 1}")(x)
            x = F.dropout(x, p=self.block_dropout, training=self.training)
        frames = x.mean(dim=3)  # (B, C, T')
        pooled = frames.amax(dim=2) + frames.mean(dim=2)
        pooled = F.dropout(pooled, p=self.fc_dropout, training=self.training)
        emb = F.relu(self.fc1(pooled))
        return emb, frames.transpose(1, 2)

    def forward(self, wav: torch.Tensor) -> AudioEmbedding:
        """Waveform ``(B, T)`` at `sample_rate` -> ``AudioEmbedding(pooled (B, dim), seq)``."""
        emb, seq = self.features(wav)
        return AudioEmbedding(pooled=emb, seq=seq)

    def classify(self, wav: torch.Tensor) -> torch.Tensor:
        """AudioSet logits ``(B, num_classes)`` (apply a sigmoid for PANNs' clip-wise probabilities)."""
        if self.fc_audioset is None:
            raise RuntimeError("CNN14.classify: this CNN14 was built with num_classes=None (no classifier head)")
        emb, _ = self.features(wav)
        emb = F.dropout(emb, p=self.fc_dropout, training=self.training)
        return self.fc_audioset(emb)
