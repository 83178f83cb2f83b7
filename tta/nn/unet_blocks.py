"""Generic pieces of the diffusion UNets (re-exported by `tta.nn.unet`).

* `timestep_embedding` / `Timesteps`: sinusoidal embedding, identical to diffusers ``Timesteps``
  (``flip_sin_to_cos=True``: cos half first; ``downscale_freq_shift=0``).
* `TimestepEmbedding`: ``linear_1`` - SiLU - ``linear_2``.
* `DownStage` (``resnets``, optional ``attentions``, optional ``downsamplers.0``), `MidStage`
  (``resnets.0``, ``attentions.0``, ``resnets.1``), `UpStage` (``resnets`` fed with popped skip
  connections, optional ``attentions``, optional ``upsamplers.0``). Attentions are
  `SpatialTransformer`s whose blocks can hold named cross-attentions; resnets are
  `tta.nn.blocks.ResnetBlock2D` with the (time + FiLM) embedding. Every stage can recompute its
  resnets / attentions in backward (``gradient_checkpointing``).

Composing them differently (two encoder paths, residuals added to the skips before an
`UpStage` pops them, two named cross-attentions per decoder block) gives DreamAudio's MRC UNet.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tta.nn.blocks import Downsample2D, ResnetBlock2D, Upsample2D
from tta.nn.transformer import ContextInput, SpatialTransformer

__all__ = [
    "RESNET_EPS",
    "DownStage",
    "MidStage",
    "Stage",
    "TimestepEmbedding",
    "Timesteps",
    "UpStage",
    "timestep_embedding",
]

RESNET_EPS = 1e-5  # GroupNorm eps of the UNet resnets and output norm (diffusers norm_eps, LDM default)


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding ``(B,) -> (B, dim)`` (float32), as diffusers ``get_timestep_embedding``."""
    if timesteps.ndim != 1:
        raise ValueError(
            f"timesteps must be 1-D (B,), got shape {tuple(timesteps.shape)}"
        )
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(
        half, dtype=torch.float32, device=timesteps.device
    )
    exponent = exponent / (half - downscale_freq_shift)
    args = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """`timestep_embedding` as a module (no parameters)."""

    def __init__(
        self, dim: int, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0
    ) -> None:
        super().__init__()
        self.dim = dim
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, dim) float32."""
        return timestep_embedding(
            timesteps, self.dim, self.flip_sin_to_cos, self.downscale_freq_shift
        )


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: ``linear_1`` - SiLU - ``linear_2``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim)."""
        return self.linear_2(F.silu(self.linear_1(x)))


class Stage(nn.Module):
    """Base of the UNet stages: runs submodules through activation checkpointing when
    ``gradient_checkpointing`` is set (and gradients are enabled)."""

    gradient_checkpointing = False

    def _run(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


def _resnet(
    in_ch: int, out_ch: int, temb: int, dropout: float, groups: int
) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_ch, out_ch, dropout, temb, num_groups=groups, eps=RESNET_EPS
    )


def _attentions(
    n: int, channels: int, attn: Mapping[str, Any] | None
) -> nn.ModuleList | None:
    return (
        None
        if attn is None
        else nn.ModuleList(SpatialTransformer(channels, **attn) for _ in range(n))
    )


class DownStage(Stage):
    """``num_layers`` x (resnet [+ attention]) then an optional stride-2 downsampler.

    Args:
        in_channels, out_channels: channels in and out (the first resnet changes them).
        temb_channels: width of the embedding the resnets receive.
        num_layers: resnets (and attentions).
        attention: keyword arguments of `SpatialTransformer` (heads, dim_head, ...), None = none.
        downsample: add ``downsamplers.0`` (symmetric padding 1, as diffusers / openaimodel).
        dropout, num_groups: resnet dropout and GroupNorm groups.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        attention: Mapping[str, Any] | None = None,
        downsample: bool = True,
        dropout: float = 0.0,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(
                in_channels if i == 0 else out_channels,
                out_channels,
                temb_channels,
                dropout,
                num_groups,
            )
            for i in range(num_layers)
        )
        self.attentions = _attentions(num_layers, out_channels, attention)
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, padding=1)])
            if downsample
            else None
        )

    def forward(
        self, h: torch.Tensor, temb: torch.Tensor, context: ContextInput | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (output, skip tensors: one per layer plus the downsampled output)."""
        skips: list[torch.Tensor] = []
        for i, resnet in enumerate(self.resnets):
            h = self._run(resnet, h, temb)
            if self.attentions is not None:
                h = self._run(self.attentions[i], h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidStage(Stage):
    """resnet - attention - resnet at the bottleneck (``attention`` as in `DownStage`)."""

    def __init__(
        self,
        channels: int,
        temb_channels: int,
        attention: Mapping[str, Any] | None,
        dropout: float = 0.0,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(channels, channels, temb_channels, dropout, num_groups)
            for _ in range(2)
        )
        self.attentions = _attentions(1, channels, attention)

    def forward(
        self, h: torch.Tensor, temb: torch.Tensor, context: ContextInput | None = None
    ) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        h = self._run(self.resnets[0], h, temb)
        if self.attentions is not None:
            h = self._run(self.attentions[0], h, context)
        return self._run(self.resnets[1], h, temb)


class UpStage(Stage):
    """``len(skip_channels)`` x (concat a popped skip, resnet [+ attention]), optional upsampler.

    Args:
        in_channels: channels of the incoming hidden state.
        skip_channels: channels of the skips in the order they are popped (last pushed first).
        out_channels: channels of every resnet output.
        temb_channels, attention, dropout, num_groups: as `DownStage`.
        upsample: add ``upsamplers.0`` (nearest x2 + 3x3 conv).
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: Sequence[int],
        out_channels: int,
        temb_channels: int,
        attention: Mapping[str, Any] | None = None,
        upsample: bool = True,
        dropout: float = 0.0,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(
                (in_channels if i == 0 else out_channels) + skip,
                out_channels,
                temb_channels,
                dropout,
                num_groups,
            )
            for i, skip in enumerate(skip_channels)
        )
        self.attentions = _attentions(len(skip_channels), out_channels, attention)
        self.upsamplers = (
            nn.ModuleList([Upsample2D(out_channels)]) if upsample else None
        )

    def forward(
        self,
        h: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        context: ContextInput | None = None,
    ) -> torch.Tensor:
        """Pops one tensor of ``skips`` per resnet (in place) -> output."""
        for i, resnet in enumerate(self.resnets):
            h = self._run(resnet, torch.cat([h, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                h = self._run(self.attentions[i], h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h
