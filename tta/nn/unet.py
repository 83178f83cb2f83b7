"""The AudioLDM / Re-AudioLDM diffusion `UNetModel`, composed of the pieces of `tta.nn.unet_blocks`.

`UNetModel` uses diffusers ``UNet2DConditionModel`` submodule names (``conv_in``,
``time_embedding``, ``class_embedding``, ``down_blocks``, ``mid_block``, ``up_blocks``,
``conv_norm_out``, ``conv_out``), so AudioLDM's public weights load through a small key table
(`tta.generators.ldm.unet_import`). FiLM as AudioLDM: the conditioning vector is projected by
``class_embedding`` and concatenated to the time embedding, the resnets see twice its width.
Named cross-attentions (``context_dims``, e.g. Re-AudioLDM's ``retrieval``) sit after AudioLDM's
context-free ``attn2`` in the transformer blocks of every stage, or only of the stages
``context_stages`` names (e.g. a decoder-only DreamAudio ``refcap``); their zero-initialised
output projection makes a fresh one a no-op.

The paths are built by `tta.nn.unet_paths` (`build_down_path`, `build_mid_stage`,
`build_up_path`), and the forward pass is split so that parts can be composed: ``embed`` (time +
FiLM embedding), ``encode`` (``conv_in``, down path, middle block -> hidden state and skips) and
``decode`` (up path and output, optionally adding external `UNetResiduals` to the skips and the
middle output). A second `UNetModel`'s ``encode`` features, through `ZeroResidualProjections`
sized by ``skip_channels`` / ``mid_channels``, give ControlNet-style residuals (DreamAudio's
reference-extraction path).

The generic pieces (`timestep_embedding`, `Timesteps`, `TimestepEmbedding`, `DownStage`,
`MidStage`, `UpStage`) and `UNetResiduals` / `ZeroResidualProjections` are re-exported here.
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
from tta.nn.unet_paths import (
    UNetResiduals,
    ZeroResidualProjections,
    build_down_path,
    build_mid_stage,
    build_up_path,
    stage_context_dims,
)
from tta.registry import register

__all__ = [
    "DownStage",
    "MidStage",
    "TimestepEmbedding",
    "Timesteps",
    "UNetModel",
    "UNetResiduals",
    "UpStage",
    "ZeroResidualProjections",
    "timestep_embedding",
]

PreparedContext = dict[str, tuple[torch.Tensor, KeyMask]]


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
        context_dims: named cross-attentions ``{name: context width}`` in the transformer blocks,
            e.g. ``{"retrieval": 768}``; every stage by default (see ``context_stages``).
        dropout: dropout of resnets, attentions and feed-forwards.
        num_groups: GroupNorm groups.
        gradient_checkpointing: recompute resnets / attentions in backward to save memory.
        num_heads: explicit head count (int, or one per level) instead of ``num_head_channels``
            (diffusers ``attention_head_dim`` configs such as the public AudioLDM port: 8 heads).
        transformer_depth: transformer blocks per `SpatialTransformer`.
        use_linear_projection: Linear instead of 1x1-conv ``proj_in`` / ``proj_out``.
        context_stages: ``{name: stages}`` giving a ``context_dims`` name a cross-attention only in
            the transformer blocks of some of the stages ``"down"``, ``"mid"``, ``"up"`` (e.g.
            ``{"refcap": ["up"]}``: decoder-only); unlisted names (and None) are in every stage.
            A stage ignores the contexts it has no cross-attention for.

    Attributes:
        skip_channels: channels of each skip the down path pushes (``conv_in`` output first), the
            shapes `UNetResiduals` ``skips`` must match (at H / 2**level).
        mid_channels: channels of the middle block's output (`UNetResiduals` ``mid``).
        stage_contexts: ``{stage: context names with a cross-attention there}``.
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
        context_stages: dict[str, Sequence[str]] | None = None,
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
        stage_dims = stage_context_dims(self.context_dims, context_stages)
        self.stage_contexts: dict[str, tuple[str, ...]] = {
            stage: tuple(dims) for stage, dims in stage_dims.items()
        }
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

        def attention(level: int, stage: str) -> dict[str, Any] | None:
            if stage != "mid" and level not in attn_levels:
                return None
            heads, dim_head = _level_heads(
                level, channels[level], num_head_channels, num_heads
            )
            return {
                "heads": heads,
                "dim_head": dim_head,
                "depth": transformer_depth,
                "self_attn2": self_attn2,
                "context_dims": stage_dims[stage],
                "dropout": dropout,
                "num_groups": num_groups,
                "use_linear_projection": use_linear_projection,
            }

        levels = range(len(channels))
        time_dim = model_channels * 4
        temb = time_dim * 2 if film_dim > 0 else time_dim
        # construction order = parameter init order (fixed-seed behaviour): keep it
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(model_channels)
        self.time_embedding = TimestepEmbedding(model_channels, time_dim)
        self.class_embedding = nn.Linear(film_dim, time_dim) if film_dim > 0 else None
        self.down_blocks, skip_channels = build_down_path(
            channels,
            temb,
            num_res_blocks,
            [attention(i, "down") for i in levels],
            dropout,
            num_groups,
        )
        self.mid_block = build_mid_stage(
            channels[-1], temb, attention(len(mult) - 1, "mid"), dropout, num_groups
        )
        self.up_blocks = build_up_path(
            channels,
            skip_channels,
            temb,
            num_res_blocks,
            [attention(i, "up") for i in levels],
            dropout,
            num_groups,
        )
        self.conv_norm_out = normalization(channels[0], num_groups, eps=RESNET_EPS)
        self.conv_out = nn.Conv2d(channels[0], out_channels, kernel_size=3, padding=1)
        self.skip_channels: list[int] = list(skip_channels)
        self.mid_channels: int = channels[-1]
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
    ) -> PreparedContext:
        """Validate named contexts and prepare their masks once (empty ones are dropped)."""
        if not context:
            return {}
        unknown = sorted(set(context) - set(self.context_dims))
        if unknown:
            raise ValueError(
                f"UNetModel got unknown context name(s) {unknown}; its cross-attentions are "
                f"{sorted(self.context_dims) or 'none (context_dims is empty)'}"
            )
        out: PreparedContext = {}
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

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNetModel expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        hgt, wid = x.shape[2:]
        f = self.downsample_factor
        if hgt % f or wid % f:
            raise ValueError(
                f"UNetModel input H x W = {hgt} x {wid} must be divisible by {f} (2 ** (levels - 1)); pad the latent"
            )

    def _stage_context(self, ctx: PreparedContext, stage: str) -> PreparedContext:
        """The part of ``ctx`` that ``stage`` has cross-attentions for."""
        names = self.stage_contexts[stage]
        if all(name in names for name in ctx):
            return ctx
        return {name: item for name, item in ctx.items() if name in names}

    def embed(
        self,
        timesteps: torch.Tensor,
        film: torch.Tensor | None,
        batch: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Time (+ FiLM) embedding the resnets receive.

        Args:
            timesteps: (B,) or a scalar, int or float diffusion steps.
            film: (B, film_dim), required iff ``film_dim > 0``.
            batch: B.
            dtype: dtype of the time embedding's input (that of the latent).
        Returns:
            (B, 4 * model_channels), twice that with FiLM.
        """
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        if tuple(timesteps.shape) != (batch,):
            raise ValueError(
                f"timesteps must have shape (B,) = ({batch},), got {tuple(timesteps.shape)}"
            )
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype))
        if self.class_embedding is not None:
            if film is None:
                raise ValueError(
                    f"UNetModel was built with film_dim={self.film_dim} and needs film (B, {self.film_dim})"
                )
            if tuple(film.shape) != (batch, self.film_dim):
                raise ValueError(
                    f"film must have shape (B, film_dim) = {(batch, self.film_dim)}, got {tuple(film.shape)}"
                )
            emb = torch.cat([emb, self.class_embedding(film).to(emb.dtype)], dim=-1)
        elif film is not None:
            raise ValueError(
                "UNetModel was built with film_dim=0 (no FiLM) but got film"
            )
        return emb

    def encode(
        self, x: torch.Tensor, emb: torch.Tensor, ctx: PreparedContext
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``conv_in``, down path and middle block.

        Args:
            x: (B, in_channels, H, W); H and W divisible by ``downsample_factor``.
            emb: the output of `embed`.
            ctx: the output of `prepare_context`.
        Returns:
            (middle block output (B, mid_channels, H/f, W/f), skips in push order, channels
            ``skip_channels``).
        """
        self._check_input(x)
        down_ctx = self._stage_context(ctx, "down")
        h = self.conv_in(x)
        skips = [h]
        for stage in self.down_blocks:
            h, out = stage(h, emb, down_ctx)
            skips.extend(out)
        return self.mid_block(h, emb, self._stage_context(ctx, "mid")), skips

    def _add_residuals(
        self, h: torch.Tensor, skips: list[torch.Tensor], residuals: UNetResiduals
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if len(residuals.skips) != len(skips):
            raise ValueError(
                f"residuals.skips needs {len(skips)} tensors (one per skip, conv_in output first), "
                f"got {len(residuals.skips)}"
            )
        for i, (res, skip) in enumerate(zip(residuals.skips, skips)):
            if res.shape != skip.shape:
                raise ValueError(
                    f"residuals.skips[{i}] must have the skip's shape {tuple(skip.shape)}, got {tuple(res.shape)}"
                )
        if residuals.mid is not None:
            if residuals.mid.shape != h.shape:
                raise ValueError(
                    f"residuals.mid must have the middle block output's shape {tuple(h.shape)}, "
                    f"got {tuple(residuals.mid.shape)}"
                )
            h = h + residuals.mid
        return h, [skip + res for skip, res in zip(skips, residuals.skips)]

    def decode(
        self,
        h: torch.Tensor,
        skips: Sequence[torch.Tensor],
        emb: torch.Tensor,
        ctx: PreparedContext,
        residuals: UNetResiduals | None = None,
    ) -> torch.Tensor:
        """Up path and output head (``skips`` is not modified).

        Args:
            h, skips: the output of `encode`.
            emb, ctx: as `encode`.
            residuals: added to ``skips`` and ``h`` first (shapes must match exactly).
        Returns:
            (B, out_channels, H, W).
        """
        skips = list(skips)
        if residuals is not None:
            h, skips = self._add_residuals(h, skips, residuals)
        up_ctx = self._stage_context(ctx, "up")
        for stage in self.up_blocks:
            h = stage(h, skips, emb, up_ctx)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        film: torch.Tensor | None = None,
        context: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        residuals: UNetResiduals | None = None,
    ) -> torch.Tensor:
        """Predict from the noisy latent: `embed`, `prepare_context`, `encode`, `decode`.

        Args:
            x: (B, in_channels, H, W); H and W divisible by ``downsample_factor``.
            timesteps: (B,) (or a scalar) int or float diffusion steps.
            film: (B, film_dim), required iff ``film_dim > 0``.
            context: ``{name: (seq (B, L, D_name), mask (B, L) bool, True = real)}``; a missing
                name or ``L == 0`` makes that cross-attention contribute zero.
            residuals: external features added to the skips and the middle block's output
                (e.g. `ZeroResidualProjections` of a companion encoder).
        Returns:
            (B, out_channels, H, W).
        """
        self._check_input(x)
        b = x.shape[0]
        emb = self.embed(timesteps, film, b, x.dtype)
        ctx = self.prepare_context(context, b)
        h, skips = self.encode(x, emb, ctx)
        return self.decode(h, skips, emb, ctx, residuals)
