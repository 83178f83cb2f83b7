"""MelGAN multi-scale discriminator (Kumar et al., 2019).

`MelGANMultiScaleDiscriminator` runs one `MelGANScaleDiscriminator` on the waveform and on copies
average-pooled by 2, 4, ... (``AvgPool1d(4, stride 2, padding 1, count_include_pad=False)``).
Each scale is a 1-D PatchGAN: reflection-padded conv k15 -> ``n_layers`` grouped strided convs
(kernel ``10 * factor + 1``, stride ``factor``, groups ``in_channels / 4``, widths x ``factor`` up to
1024) -> conv k5 (width x 2, at most 1024) -> conv k3 to one channel; LeakyReLU(0.2) after every
conv but the last; weight norm on all. Like the HiFi-GAN discriminators it maps a waveform
``(B, T)`` to ``(logits, feature_maps)``: one flattened logit tensor ``(B, n)`` per scale and, per
scale, the ``n_layers + 2`` activations before the logits (what the official feature matching
compares; the logits are not a feature map there).

``channel_mult`` scales ``ndf`` and the 1024-channel cap (``1.0`` = the paper); tests use tiny versions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from tta.registry import register
from tta.vocoders.hifigan.discriminators import (
    DiscriminatorOutput,
    as_batch_channel_time,
    leaky_conv_stack,
    multi_scale,
    scaled_width,
)

LRELU_SLOPE = 0.2
MAX_CHANNELS = 1024
FIRST_KERNEL = 15


class MelGANScaleDiscriminator(nn.Module):
    """One scale of the MelGAN discriminator (upstream ``NLayerDiscriminator``).

    Args:
        ndf: channels of the first conv.
        n_layers: grouped strided convs.
        downsampling_factor: their stride (kernel ``10 * factor + 1``); width grows by it.
        max_channels: width cap (1024 in the paper).
    """

    def __init__(self, ndf: int = 16, n_layers: int = 4, downsampling_factor: int = 4,
                 max_channels: int = MAX_CHANNELS) -> None:
        super().__init__()
        if ndf < 1 or n_layers < 0 or downsampling_factor < 1 or max_channels < ndf:
            raise ValueError(f"MelGANScaleDiscriminator: need ndf >= 1, n_layers >= 0, downsampling_factor >= 1 "
                             f"and max_channels >= ndf; got {ndf}, {n_layers}, {downsampling_factor}, {max_channels}")
        stride = downsampling_factor
        self.convs = nn.ModuleList([weight_norm(nn.Conv1d(1, ndf, FIRST_KERNEL))])
        ch = ndf
        for _ in range(n_layers):
            out = min(ch * stride, max_channels)
            groups = math.gcd(max(1, ch // 4), math.gcd(ch, out))  # ch / 4 at the paper's widths
            self.convs.append(weight_norm(nn.Conv1d(ch, out, 10 * stride + 1, stride=stride, padding=5 * stride,
                                                    groups=groups)))
            ch = out
        out = min(ch * 2, max_channels)
        self.convs.append(weight_norm(nn.Conv1d(ch, out, 5, padding=2)))
        self.conv_post = weight_norm(nn.Conv1d(out, 1, 3, padding=1))

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``wav (B, T)`` or ``(B, 1, T)`` -> (logits ``(B, n)``, feature maps)."""
        x = as_batch_channel_time(wav)
        pad = FIRST_KERNEL // 2
        if x.shape[-1] <= pad:
            raise ValueError(f"MelGANScaleDiscriminator needs more than {pad} samples, got {x.shape[-1]}")
        return leaky_conv_stack(F.pad(x, (pad, pad), mode="reflect"), self.convs, self.conv_post, post_in_fmaps=False,
                                slope=LRELU_SLOPE)


@register("discriminator", "melgan_msd")
class MelGANMultiScaleDiscriminator(nn.Module):
    """MelGAN's discriminator: `MelGANScaleDiscriminator` on the waveform and its pooled copies.

    Args:
        num_scales: number of scales (``num_D``, 3 in the paper).
        ndf, n_layers, downsampling_factor: of every scale (16, 4, 4 in the paper).
        channel_mult: multiplies ``ndf`` and the 1024-channel cap (1.0 = the paper).
    """

    def __init__(self, num_scales: int = 3, ndf: int = 16, n_layers: int = 4, downsampling_factor: int = 4,
                 channel_mult: float = 1.0) -> None:
        super().__init__()
        if num_scales < 1:
            raise ValueError(f"MelGANMultiScaleDiscriminator: num_scales must be >= 1, got {num_scales}")
        self.num_scales, self.n_layers = int(num_scales), int(n_layers)
        self.discriminators = nn.ModuleList(
            MelGANScaleDiscriminator(scaled_width(ndf, channel_mult), n_layers, downsampling_factor,
                                     scaled_width(MAX_CHANNELS, channel_mult))
            for _ in range(self.num_scales)
        )
        self.pool = nn.AvgPool1d(4, stride=2, padding=1, count_include_pad=False)

    @property
    def feature_matching_scale(self) -> float:
        """The official weight of each (scale, layer) L1 term before ``lambda_feat``:
        ``4 / (n_layers + 1)`` per layer times ``1 / num_scales``."""
        return 4.0 / (self.n_layers + 1) / self.num_scales

    def forward(self, wav: torch.Tensor) -> DiscriminatorOutput:
        """``wav (B, T)`` -> (list of logits ``(B, n)``, list of feature-map lists), one per scale."""
        return multi_scale(as_batch_channel_time(wav), self.discriminators, self.pool)
