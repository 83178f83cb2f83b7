"""HiFi-GAN discriminators: multi-period (MPD) and multi-scale (MSD).

Both take a waveform ``(B, T)`` or ``(B, 1, T)`` and return ``(logits, feature_maps)``:
``logits`` is a list with one flattened logit tensor ``(B, n)`` per sub-discriminator, and
``feature_maps`` a list (one per sub-discriminator) of lists of intermediate activations, used
by `tta.nn.gan_losses.feature_matching_loss`. Call them once on the real and once on the
generated waveform. This is the interface every discriminator of
`tta.vocoders.gan.GANVocoderModule` has (registry kind ``discriminator``).

``channel_mult`` scales every hidden width (``1.0`` = the paper); tests use tiny versions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from tta.registry import register

LRELU_SLOPE = 0.1
DiscriminatorOutput = tuple[list[torch.Tensor], list[list[torch.Tensor]]]


def scaled_width(channels: int, mult: float) -> int:
    """``channels * mult`` rounded, at least 1 (the ``channel_mult`` of the discriminators)."""
    return max(1, round(channels * mult))


def as_batch_channel_time(wav: torch.Tensor) -> torch.Tensor:
    if wav.dim() == 2:
        return wav.unsqueeze(1)
    if wav.dim() == 3 and wav.shape[1] == 1:
        return wav
    raise ValueError(f"discriminator expects a waveform (B, T) or (B, 1, T), got {tuple(wav.shape)}")


def multi_scale(x: torch.Tensor, discriminators: nn.ModuleList, pool: nn.Module) -> DiscriminatorOutput:
    """Run ``discriminators[i]`` on ``x`` pooled ``i`` times by ``pool`` (multi-scale discriminators of
    HiFi-GAN and MelGAN): per scale, its logits and feature maps."""
    logits, fmaps = [], []
    for i, d in enumerate(discriminators):
        if i > 0:
            x = pool(x)
        logit, fmap = d(x)
        logits.append(logit)
        fmaps.append(fmap)
    return logits, fmaps


def leaky_conv_stack(x: torch.Tensor, convs: nn.ModuleList, post: nn.Module, post_in_fmaps: bool = True,
                     slope: float = LRELU_SLOPE) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``convs`` each followed by a leaky ReLU (``slope``: HiFi-GAN's 0.1), then ``post``: the flattened
    logits ``(B, n)`` and the feature maps (every activation, plus ``post``'s map when
    ``post_in_fmaps``: HiFi-GAN / BigVGAN include it, MelGAN does not)."""
    fmaps = []
    for conv in convs:
        x = F.leaky_relu(conv(x), slope)
        fmaps.append(x)
    x = post(x)
    if post_in_fmaps:
        fmaps.append(x)
    return torch.flatten(x, 1, -1), fmaps


class PeriodDiscriminator(nn.Module):
    """Reshape ``(B, 1, T)`` to ``(B, 1, T/p, p)`` and apply 2-D convs along time."""

    def __init__(self, period: int, channel_mult: float = 1.0, kernel_size: int = 5, stride: int = 3) -> None:
        super().__init__()
        self.period = period
        widths = [1] + [scaled_width(c, channel_mult) for c in (32, 128, 512, 1024, 1024)]
        pad = (kernel_size - 1) // 2
        self.convs = nn.ModuleList()
        for i in range(5):
            s = stride if i < 4 else 1
            conv = nn.Conv2d(widths[i], widths[i + 1], (kernel_size, 1), (s, 1), padding=(pad, 0))
            self.convs.append(weight_norm(conv))
        self.conv_post = weight_norm(nn.Conv2d(widths[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = as_batch_channel_time(wav)
        b, c, t = x.shape
        if t % self.period:
            n_pad = self.period - t % self.period
            mode = "reflect" if n_pad < t else "constant"
            x = F.pad(x, (0, n_pad), mode=mode)
            t += n_pad
        x = x.view(b, c, t // self.period, self.period)
        return leaky_conv_stack(x, self.convs, self.conv_post)


class ScaleDiscriminator(nn.Module):
    """Strided, grouped 1-D convs over the raw (or average-pooled) waveform."""

    # (out_channels, kernel, stride, groups) of the paper's layers.
    LAYERS = ((128, 15, 1, 1), (128, 41, 2, 4), (256, 41, 2, 16), (512, 41, 4, 16),
              (1024, 41, 4, 16), (1024, 41, 1, 16), (1024, 5, 1, 1))

    def __init__(self, use_spectral_norm: bool = False, channel_mult: float = 1.0) -> None:
        super().__init__()
        norm = spectral_norm if use_spectral_norm else weight_norm
        self.convs = nn.ModuleList()
        in_ch = 1
        for out, kernel, stride, groups in self.LAYERS:
            out_ch = scaled_width(out, channel_mult)
            g = math.gcd(groups, math.gcd(in_ch, out_ch))
            self.convs.append(norm(nn.Conv1d(in_ch, out_ch, kernel, stride, groups=g, padding=(kernel - 1) // 2)))
            in_ch = out_ch
        self.conv_post = norm(nn.Conv1d(in_ch, 1, 3, 1, padding=1))

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return leaky_conv_stack(as_batch_channel_time(wav), self.convs, self.conv_post)


@register("discriminator", "hifigan_mpd")
class MultiPeriodDiscriminator(nn.Module):
    """One `PeriodDiscriminator` per period (2, 3, 5, 7, 11 in the paper).

    Args:
        periods: the periods.
        channel_mult: width multiplier of every hidden layer (1.0 = paper).
    """

    def __init__(self, periods: Sequence[int] = (2, 3, 5, 7, 11), channel_mult: float = 1.0) -> None:
        super().__init__()
        if not periods or any(int(p) < 1 for p in periods):
            raise ValueError(f"MultiPeriodDiscriminator: periods must be positive integers, got {list(periods)}")
        self.periods = [int(p) for p in periods]
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p, channel_mult) for p in self.periods)

    def forward(self, wav: torch.Tensor) -> DiscriminatorOutput:
        """``wav (B, T)`` -> (list of logits ``(B, n)``, list of feature-map lists)."""
        logits, fmaps = [], []
        for d in self.discriminators:
            logit, fmap = d(wav)
            logits.append(logit)
            fmaps.append(fmap)
        return logits, fmaps


@register("discriminator", "hifigan_msd")
class MultiScaleDiscriminator(nn.Module):
    """`ScaleDiscriminator` on the waveform and on 2x, 4x, ... average-pooled copies.

    The first (full-resolution) discriminator uses spectral norm, the others weight norm.

    Args:
        num_scales: number of scales (3 in the paper).
        channel_mult: width multiplier of every hidden layer (1.0 = paper).
    """

    def __init__(self, num_scales: int = 3, channel_mult: float = 1.0) -> None:
        super().__init__()
        if num_scales < 1:
            raise ValueError(f"MultiScaleDiscriminator: num_scales must be >= 1, got {num_scales}")
        self.discriminators = nn.ModuleList(
            ScaleDiscriminator(use_spectral_norm=(i == 0), channel_mult=channel_mult) for i in range(num_scales)
        )
        self.pool = nn.AvgPool1d(4, 2, padding=2)

    def forward(self, wav: torch.Tensor) -> DiscriminatorOutput:
        """``wav (B, T)`` -> (list of logits ``(B, n)``, list of feature-map lists)."""
        return multi_scale(as_batch_channel_time(wav), self.discriminators, self.pool)
