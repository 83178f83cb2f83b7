"""DreamAudio's reference-count adaptation: a small CNN squeezing K' reference latents to the trained K.

DreamAudio (Sec. VI-C, Fig. 5) trains its MRC UNet with a fixed number K of reference clips whose
VAE latents are concatenated along time, ``R = [r_1, ..., r_K]`` of shape ``(B, C, K * T_r, F)``.
To use another number K' it adds "an extra CNN alignment layer ... to squeeze the referenced
feature so the concatenated feature ... is a fixed size" and fine-tunes only that layer, every
other block frozen. `ReferenceAlignment` is that layer::

    R' (B, C, K'*T_r, F) --conv3x3--SiLU--> pool time to K*T_r --[conv3x3--SiLU] x (L-1)--zero conv1x1--+
    R' ----------------------------------> pool time to K*T_r ----------------------------------------+--> (B, C, K*T_r, F)

``pool`` is `fit_size` (adaptive average pooling: each output frame averages the input frames it
covers; with K' < K it stretches). The learned branch ends in a zero-initialised 1x1 conv, so at
initialisation the layer *is* that pooling, and for K' == K (nothing to pool) it is exactly the
identity: a trained MRC UNet is unchanged until the layer is fine-tuned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tta.nn.blocks import zero_module
from tta.registry import register

__all__ = ["ReferenceAlignment", "fit_size"]


def fit_size(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` (..., H, W) brought to ``size`` = (H', W') by adaptive average pooling; ``x`` itself
    when it already has that size (so equal sizes cost nothing and are exact)."""
    target = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == target:
        return x
    return F.adaptive_avg_pool2d(x, target)


@register("network", "reference_align")
class ReferenceAlignment(nn.Module):
    """Squeeze any number K' of concatenated reference latents to the trained K (DreamAudio Fig. 5).

    Args:
        channels: latent channels C of the references (AudioLDM VAE: 8).
        num_references: K, the number of references the MRC UNet was trained with (paper: 3).
        reference_length: T_r, latent frames of one reference (10.24 s AudioLDM latent: 256).
        hidden_channels: width of the convolutions.
        num_layers: 3x3 convolutions of the learned branch (>= 1).
    """

    def __init__(
        self,
        channels: int = 8,
        num_references: int = 3,
        reference_length: int = 256,
        hidden_channels: int = 64,
        num_layers: int = 2,
    ) -> None:
        super().__init__()
        if min(channels, num_references, reference_length, hidden_channels, num_layers) <= 0:
            raise ValueError(
                "ReferenceAlignment needs positive channels, num_references, reference_length, "
                f"hidden_channels and num_layers, got {channels}, {num_references}, {reference_length}, "
                f"{hidden_channels}, {num_layers}"
            )
        self.channels = int(channels)
        self.num_references = int(num_references)
        self.reference_length = int(reference_length)
        self.conv_in = nn.Conv2d(channels, hidden_channels, kernel_size=3, padding=1)
        self.convs = nn.ModuleList(
            nn.Conv2d(hidden_channels, hidden_channels, kernel_size=3, padding=1) for _ in range(num_layers - 1)
        )
        self.conv_out = zero_module(nn.Conv2d(hidden_channels, channels, kernel_size=1))

    @property
    def output_length(self) -> int:
        """K * T_r, the time length of the output."""
        return self.num_references * self.reference_length

    def forward(self, references: torch.Tensor) -> torch.Tensor:
        """(B, C, K' * T_r, F) with any K' >= 1 -> (B, C, K * T_r, F)."""
        if references.ndim != 4 or references.shape[1] != self.channels:
            raise ValueError(
                f"ReferenceAlignment expects references of shape (B, {self.channels}, K'*T_r, F), "
                f"got {tuple(references.shape)}"
            )
        length = references.shape[2]
        if length == 0 or length % self.reference_length:
            raise ValueError(
                f"ReferenceAlignment: references have {length} frames, not a positive multiple of "
                f"reference_length={self.reference_length} (K' references of T_r frames concatenated along time)"
            )
        size = (self.output_length, references.shape[3])
        h = fit_size(F.silu(self.conv_in(references)), size)
        for conv in self.convs:
            h = F.silu(conv(h))
        return fit_size(references, size) + self.conv_out(h)
