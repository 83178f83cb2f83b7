"""The AudioLDM / Re-AudioLDM diffusion `UNetModel`, composed of the pieces of `tta.nn.unet_blocks`.

`UNetModel` uses diffusers ``UNet2DConditionModel`` submodule names (``conv_in``,
``time_embedding``, ``class_embedding``, ``down_blocks``, ``mid_block``, ``up_blocks``,
``conv_norm_out``, ``conv_out``), so AudioLDM's public weights load through a small key table
(`tta.generators.ldm.unet_import`). FiLM as AudioLDM: the conditioning vector is projected by
``class_embedding`` and concatenated to the time embedding, the resnets see twice its width.
Named cross-attentions (``context_dims``, e.g. Re-AudioLDM's ``retrieval``) sit in every
transformer block after AudioLDM's context-free ``attn2``; their zero-initialised output
projection makes a fresh one a no-op.

The generic pieces (`timestep_embedding`, `Timesteps`, `TimestepEmbedding`, `DownStage`,
`MidStage`, `UpStage`) are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tta.nn.attention import KeyMask
from tta.nn.blocks import normalization
from tta.nn.transformer import check_context_names
from tta.nn.unet_blocks import (
    RESNET_EPS,
    DownStage,
    MidStage,
    Stage,
    TimestepEmbedding,
    Timesteps,
    UpStage,
    timestep_embedding,
)
from tta.registry import register

__all__ = [
    "DownStage",
    "MidStage",
    "TimestepEmbedding",
    "Timesteps",
    "UNetModel",
    "UpStage",
    "timestep_embedding",
]


def _level_heads(
    level: int,
    channels: int,
    num_head_channels: int,
    num_heads: int | Sequence[int] | None,
) -> tuple[int, int]:
    """(heads, dim_head) of one level, from a head width or explicit head counts."""
    if num_heads is None:
        heads = channels // num_head_channels if num_head_channels > 0 else 0
    elif isinstance(num_heads, int):
        heads = num_heads
    else:
        heads = int(num_heads[level])
    if (
        heads <= 0
        or channels % heads
        or (num_heads is None and channels % num_head_channels)
    ):
        raise ValueError(
            f"level {level}: {channels} channels cannot be split into attention heads "
            f"(num_head_channels={num_head_channels}, num_heads={num_heads})"
        )
    return heads, channels // heads


@register("network", "unet")
class UNetModel(nn.Module):
    """AudioLDM / Re-AudioLDM denoising UNet (epsilon or v prediction is the caller's choice).

    Args:
        in_channels, out_channels: latent channels in and out.
        model_channels: channels of the first level; level ``i`` has ``model_channels * channel_mult[i]``.
        channel_mult: per-level multipliers; every level but the last halves H and W.
        num_res_blocks: resnets per down level (up levels have one more).
        attention_resolutions: downsample factors (1, 2, 4, ...) whose levels get a `SpatialTransformer`
            after every resnet; the bottleneck always has one.
        num_head_channels: channels per attention head (heads = level channels / this).
        film_dim: width of the FiLM vector (AudioLDM: the CLAP embedding, 512); 0 disables FiLM.
        self_attn2: AudioLDM's context-free second self-attention in every transformer block.
        context_dims: named cross-attentions ``{name: context width}`` in every transformer block,
            e.g. ``{"retrieval": 768}``.
        dropout: dropout of resnets, attentions and feed-forwards.
        num_groups: GroupNorm groups.
        gradient_checkpointing: recompute resnets / attentions in backward to save memory.
        num_heads: explicit head count (int, or one per level) instead of ``num_head_channels``
            (diffusers ``attention_head_dim`` configs such as the public AudioLDM port: 8 heads).
        transformer_depth: transformer blocks per `SpatialTransformer`.
        use_linear_projection: Linear instead of 1x1-conv ``proj_in`` / ``proj_out``.
    """

    def __init__(
        self,
        in_channels: int = 8,
        out_channels: int = 8,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 3, 5),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (8, 4, 2),
        num_head_channels: int = 32,
        film_dim: int = 512,
        self_attn2: bool = True,
        context_dims: dict[str, int] | None = None,
        dropout: float = 0.0,
        num_groups: int = 32,
        gradient_checkpointing: bool = False,
        num_heads: int | Sequence[int] | None = None,
        transformer_depth: int = 1,
        use_linear_projection: bool = False,
    ) -> None:
        super().__init__()
        mult = [int(m) for m in channel_mult]
        if (
            not mult
            or any(m <= 0 for m in mult)
            or model_channels <= 0
            or num_res_blocks <= 0
        ):
            raise ValueError(
                f"UNetModel needs positive model_channels, num_res_blocks and channel_mult, got "
                f"{model_channels}, {num_res_blocks}, {list(channel_mult)}"
            )
        if film_dim < 0:
            raise ValueError(f"film_dim must be >= 0 (0 disables FiLM), got {film_dim}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.film_dim = film_dim
        self.context_dims = check_context_names(context_dims)
        self.downsample_factor = 2 ** (len(mult) - 1)
        channels = [model_channels * m for m in mult]
        if (
            num_heads is not None
            and not isinstance(num_heads, int)
            and len(num_heads) != len(mult)
        ):
            raise ValueError(
                f"num_heads {list(num_heads)} needs one entry per level ({len(mult)})"
            )
        attn_levels = {
            i
            for i in range(len(mult))
            if 2**i in {int(r) for r in attention_resolutions}
        }

        def attention(level: int) -> dict[str, Any]:
            heads, dim_head = _level_heads(
                level, channels[level], num_head_channels, num_heads
            )
            return {
                "heads": heads,
                "dim_head": dim_head,
                "depth": transformer_depth,
                "self_attn2": self_attn2,
                "context_dims": self.context_dims,
                "dropout": dropout,
                "num_groups": num_groups,
                "use_linear_projection": use_linear_projection,
            }

        time_dim = model_channels * 4
        temb = time_dim * 2 if film_dim > 0 else time_dim
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(model_channels)
        self.time_embedding = TimestepEmbedding(model_channels, time_dim)
        self.class_embedding = nn.Linear(film_dim, time_dim) if film_dim > 0 else None

        last = len(mult) - 1
        skip_channels = [channels[0]]
        self.down_blocks = nn.ModuleList()
        prev = channels[0]
        for i, ch in enumerate(channels):
            self.down_blocks.append(
                DownStage(
                    prev,
                    ch,
                    temb,
                    num_res_blocks,
                    attention(i) if i in attn_levels else None,
                    downsample=i != last,
                    dropout=dropout,
                    num_groups=num_groups,
                )
            )
            skip_channels += [ch] * (num_res_blocks + (i != last))
            prev = ch
        self.mid_block = MidStage(
            channels[-1], temb, attention(last), dropout, num_groups
        )
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(len(channels))):
            skips = [skip_channels.pop() for _ in range(num_res_blocks + 1)]
            self.up_blocks.append(
                UpStage(
                    prev,
                    skips,
                    channels[i],
                    temb,
                    attention(i) if i in attn_levels else None,
                    upsample=i != 0,
                    dropout=dropout,
                    num_groups=num_groups,
                )
            )
            prev = channels[i]
        self.conv_norm_out = normalization(channels[0], num_groups, eps=RESNET_EPS)
        self.conv_out = nn.Conv2d(channels[0], out_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether resnets and attentions are recomputed in backward."""
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self._gradient_checkpointing = bool(value)
        for module in self.modules():
            if isinstance(module, Stage):
                module.gradient_checkpointing = bool(value)

    def prepare_context(
        self,
        context: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]] | None,
        batch: int,
    ) -> dict[str, tuple[torch.Tensor, KeyMask]]:
        """Validate named contexts and prepare their masks once (empty ones are dropped)."""
        if not context:
            return {}
        unknown = sorted(set(context) - set(self.context_dims))
        if unknown:
            raise ValueError(
                f"UNetModel got unknown context name(s) {unknown}; its cross-attentions are "
                f"{sorted(self.context_dims) or 'none (context_dims is empty)'}"
            )
        out: dict[str, tuple[torch.Tensor, KeyMask]] = {}
        for name, item in context.items():
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"context[{name!r}] must be a (sequence, mask) pair")
            seq, mask = item
            dim = self.context_dims[name]
            if seq.ndim != 3 or seq.shape[0] != batch or seq.shape[2] != dim:
                raise ValueError(
                    f"context[{name!r}] sequence must have shape (B={batch}, L, {dim}), got {tuple(seq.shape)}"
                )
            if seq.shape[1] == 0:
                continue
            out[name] = (
                seq,
                KeyMask.from_bool(
                    mask, batch, seq.shape[1], where=f"context[{name!r}] mask"
                ),
            )
        return out

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        film: torch.Tensor | None = None,
        context: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Predict from the noisy latent.

        Args:
            x: (B, in_channels, H, W); H and W divisible by ``downsample_factor``.
            timesteps: (B,) (or a scalar) int or float diffusion steps.
            film: (B, film_dim), required iff ``film_dim > 0``.
            context: ``{name: (seq (B, L, D_name), mask (B, L) bool, True = real)}``; a missing
                name or ``L == 0`` makes that cross-attention contribute zero.
        Returns:
            (B, out_channels, H, W).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNetModel expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        b, _, hgt, wid = x.shape
        f = self.downsample_factor
        if hgt % f or wid % f:
            raise ValueError(
                f"UNetModel input H x W = {hgt} x {wid} must be divisible by {f} (2 ** (levels - 1)); pad the latent"
            )
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(b)
        if tuple(timesteps.shape) != (b,):
            raise ValueError(
                f"timesteps must have shape (B,) = ({b},), got {tuple(timesteps.shape)}"
            )
        emb = self.time_embedding(self.time_proj(timesteps).to(x.dtype))
        if self.class_embedding is not None:
            if film is None:
                raise ValueError(
                    f"UNetModel was built with film_dim={self.film_dim} and needs film (B, {self.film_dim})"
                )
            if tuple(film.shape) != (b, self.film_dim):
                raise ValueError(
                    f"film must have shape (B, film_dim) = {(b, self.film_dim)}, got {tuple(film.shape)}"
                )
            emb = torch.cat([emb, self.class_embedding(film).to(emb.dtype)], dim=-1)
        elif film is not None:
            raise ValueError(
                "UNetModel was built with film_dim=0 (no FiLM) but got film"
            )
        ctx = self.prepare_context(context, b)

        h = self.conv_in(x)
        skips = [h]
        for stage in self.down_blocks:
            h, out = stage(h, emb, ctx)
            skips.extend(out)
        h = self.mid_block(h, emb, ctx)
        for stage in self.up_blocks:
            h = stage(h, skips, emb, ctx)
        return self.conv_out(F.silu(self.conv_norm_out(h)))
