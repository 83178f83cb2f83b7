"""Shared 2-D convolutional building blocks (LDM / AudioLDM style).

These blocks are used by the mel VAE and are kept generic so that the diffusion UNets reuse
them: `ResnetBlock2D` optionally takes a timestep (or FiLM) embedding, `SpatialSelfAttention`
is the single-head attention of the LDM autoencoder, `Downsample2D` / `Upsample2D` change the
resolution by two.

Submodule names follow the original latent-diffusion code (``norm1``, ``conv1``, ``temb_proj``,
``norm2``, ``conv2``, ``nin_shortcut`` / ``conv_shortcut``; ``norm``, ``q``, ``k``, ``v``,
``proj_out``; ``conv``) so that public checkpoints load by key.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "Downsample2D",
    "ResnetBlock2D",
    "SpatialSelfAttention",
    "Upsample2D",
    "normalization",
    "num_groups_for",
    "zero_module",
]


def num_groups_for(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of ``channels`` that is ``<= max_groups`` (32 for every LDM width)."""
    if channels <= 0:
        raise ValueError(f"normalization needs a positive channel count, got {channels}")
    if max_groups <= 0:
        raise ValueError(f"max_groups must be positive, got {max_groups}")
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1  # unreachable: 1 divides everything


def normalization(channels: int, num_groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with ``num_groups`` groups (affine, ``eps=1e-6``).

    Falls back to the largest divisor of ``channels`` not above ``num_groups`` so that tiny CPU
    configs (e.g. 16 or 24 channels) work with the same code as the paper configs.
    """
    groups = num_groups_for(channels, num_groups)
    if groups != num_groups:
        log.debug("GroupNorm on %d channels uses %d groups instead of %d", channels, groups, num_groups)
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=eps, affine=True)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it (zero-initialised projections)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResnetBlock2D(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) twice plus a shortcut.

    Args:
        in_channels: input channels.
        out_channels: output channels (default: ``in_channels``).
        dropout: dropout probability before the second convolution.
        temb_channels: width of an optional timestep/conditioning embedding ``(B, temb_channels)``;
            0 disables it (the VAE). It is projected by ``temb_proj`` after SiLU and added to the
            hidden state after the first convolution, or, with ``scale_shift``, applied as a
            FiLM ``norm2(h) * (1 + scale) + shift``.
        conv_shortcut: use a 3x3 ``conv_shortcut`` instead of a 1x1 ``nin_shortcut`` when the
            channel count changes.
        scale_shift: FiLM-style injection of the embedding (requires ``temb_channels > 0``).
        num_groups: GroupNorm groups (see `normalization`).
        eps: GroupNorm epsilon (1e-6 as the LDM autoencoder; the diffusion UNets use 1e-5).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        temb_channels: int = 0,
        conv_shortcut: bool = False,
        scale_shift: bool = False,
        num_groups: int = 32,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        if scale_shift and temb_channels <= 0:
            raise ValueError("ResnetBlock2D(scale_shift=True) needs temb_channels > 0")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.temb_channels = temb_channels
        self.scale_shift = scale_shift
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = normalization(in_channels, num_groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels * (2 if scale_shift else 1))
        self.norm2 = normalization(out_channels, num_groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: (B, in_channels, H, W); ``temb``: (B, temb_channels) or None -> (B, out_channels, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.temb_channels > 0:
            if temb is None:
                raise ValueError(
                    f"ResnetBlock2D was built with temb_channels={self.temb_channels} but got no embedding"
                )
            emb = self.temb_proj(F.silu(temb))[:, :, None, None]
            if self.scale_shift:
                scale, shift = emb.chunk(2, dim=1)
                scale_shift = (scale, shift)
            else:
                h = h + emb
        elif temb is not None:
            raise ValueError("ResnetBlock2D was built with temb_channels=0 but got an embedding")
        h = self.norm2(h)
        if scale_shift is not None:
            h = h * (1 + scale_shift[0]) + scale_shift[1]
        h = self.conv2(self.dropout(F.silu(h)))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class Downsample2D(nn.Module):
    """Halve H and W with a 3x3 stride-2 conv.

    ``padding=0`` (default, the LDM autoencoder): asymmetric zero pad (right/bottom by one), then
    an unpadded conv. ``padding=1`` (the diffusion UNets, diffusers ``downsample_padding=1``):
    a symmetric conv padding of one. With ``with_conv=False`` it is a 2x2 average pool instead
    (no parameters).
    """

    def __init__(
        self, channels: int, with_conv: bool = True, out_channels: int | None = None, padding: int = 0
    ) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        if not with_conv and out_channels != channels:
            raise ValueError("Downsample2D(with_conv=False) cannot change the channel count")
        if padding not in (0, 1):
            raise ValueError(f"Downsample2D padding must be 0 (asymmetric LDM pad) or 1 (symmetric), got {padding}")
        self.with_conv = with_conv
        self.padding = padding
        if with_conv:
            self.conv = nn.Conv2d(channels, out_channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C_out, ceil(H/2), ceil(W/2)) for even H, W exactly (H/2, W/2)."""
        if self.with_conv:
            if self.padding == 1:
                return self.conv(x)
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample2D(nn.Module):
    """Double H and W: nearest-neighbour interpolation followed by an optional 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool = True, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        if not with_conv and out_channels != channels:
            raise ValueError("Upsample2D(with_conv=False) cannot change the channel count")
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C_out, 2H, 2W)."""
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions with a residual connection.

    GroupNorm, 1x1 convs ``q``, ``k``, ``v``, softmax(q k^T / sqrt(C)) v via
    `torch.nn.functional.scaled_dot_product_attention`, then the 1x1 ``proj_out``.
    """

    def __init__(self, channels: int, num_groups: int = 32) -> None:
        super().__init__()
        self.channels = channels
        self.norm = normalization(channels, num_groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, c, hgt, wid = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            # (B, C, H, W) -> (B, 1 head, H*W, C)
            return t.reshape(b, c, hgt * wid).transpose(1, 2).unsqueeze(1)

        q, k, v = tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, hgt, wid)
        return x + self.proj_out(out)
