"""Builders of the UNet's down path, middle block and up path, per-stage cross-attention names,
and external (ControlNet-style) residuals.

* `build_down_path` -> (``nn.ModuleList`` of `DownStage`, skip channels in push order),
  `build_mid_stage` -> `MidStage`, `build_up_path` -> ``nn.ModuleList`` of `UpStage`. They take one
  `SpatialTransformer` keyword set per level (None = no attention there), so a caller decides per
  stage which named cross-attentions its transformer blocks hold. `tta.nn.unet.UNetModel` is built
  from them; a second encoder path of the same structure (independent weights) is another call.
* `stage_context_dims` resolves ``context_stages`` (``{context name: stages}``, stages among
  ``"down"``, ``"mid"``, ``"up"``) into the ``context_dims`` of each stage, e.g. a decoder-only
  ``refcap`` cross-attention (DreamAudio).
* `UNetResiduals` (one tensor per skip, conv_in output first, plus the middle block's output) are
  added by ``UNetModel.decode``; `ZeroResidualProjections` makes them from a companion encoder's
  features with zero-initialised 1x1 convs, so a fresh one leaves the UNet unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tta.nn.blocks import zero_module
from tta.nn.unet_blocks import DownStage, MidStage, UpStage

__all__ = [
    "STAGES",
    "UNetResiduals",
    "ZeroResidualProjections",
    "build_down_path",
    "build_mid_stage",
    "build_up_path",
    "stage_context_dims",
]

#: the stage kinds ``context_stages`` may name
STAGES = ("down", "mid", "up")

AttentionSpec = Mapping[str, Any] | None  # keyword arguments of `SpatialTransformer`, None = no attention


def stage_context_dims(
    context_dims: Mapping[str, int],
    context_stages: Mapping[str, Sequence[str] | str] | None = None,
) -> dict[str, dict[str, int]]:
    """``{stage: {name: width}}`` for the stages in `STAGES`, in ``context_dims`` order.

    Args:
        context_dims: every named cross-attention ``{name: context width}``.
        context_stages: ``{name: stages}`` restricting a name to some of ``"down"``, ``"mid"``,
            ``"up"`` (a bare string is one stage); names not listed are in every stage; None = all.
    Raises:
        ValueError: a name not in ``context_dims``, an unknown stage, or an empty stage list.
    """
    stages = dict(context_stages or {})
    unknown = sorted(set(stages) - set(context_dims))
    if unknown:
        raise ValueError(
            f"context_stages names unknown context(s) {unknown}; context_dims has {sorted(context_dims)}"
        )
    allowed: dict[str, set[str]] = {}
    for name, value in stages.items():
        chosen = [value] if isinstance(value, str) else list(value)
        bad = sorted({str(s) for s in chosen} - set(STAGES))
        if bad:
            raise ValueError(f"context_stages[{name!r}] has unknown stage(s) {bad}; stages are {list(STAGES)}")
        if not chosen:
            raise ValueError(
                f"context_stages[{name!r}] names no stage; drop {name!r} from context_dims instead"
            )
        allowed[name] = set(chosen)
    return {
        stage: {n: d for n, d in context_dims.items() if stage in allowed.get(n, STAGES)}
        for stage in STAGES
    }


def _check_levels(what: str, specs: Sequence[AttentionSpec], levels: int) -> None:
    if len(specs) != levels:
        raise ValueError(f"{what} needs one attention spec per level ({levels}), got {len(specs)}")


def build_down_path(
    channels: Sequence[int],
    temb_channels: int,
    num_res_blocks: int,
    attention: Sequence[AttentionSpec],
    dropout: float = 0.0,
    num_groups: int = 32,
) -> tuple[nn.ModuleList, list[int]]:
    """One `DownStage` per level (all but the last downsample), fed by ``conv_in`` (``channels[0]``).

    Args:
        channels: channels of each level.
        temb_channels: width of the embedding the resnets receive.
        num_res_blocks: resnets per level.
        attention: `SpatialTransformer` keyword arguments per level (None = no attention).
        dropout, num_groups: resnet dropout and GroupNorm groups.
    Returns:
        (the stages, channels of every skip in push order: ``conv_in`` output first).
    """
    _check_levels("build_down_path", attention, len(channels))
    last = len(channels) - 1
    stages = nn.ModuleList()
    skip_channels = [int(channels[0])]
    prev = int(channels[0])
    for i, ch in enumerate(channels):
        stages.append(
            DownStage(
                prev,
                ch,
                temb_channels,
                num_res_blocks,
                attention[i],
                downsample=i != last,
                dropout=dropout,
                num_groups=num_groups,
            )
        )
        skip_channels += [int(ch)] * (num_res_blocks + (i != last))
        prev = int(ch)
    return stages, skip_channels


def build_mid_stage(
    channels: int,
    temb_channels: int,
    attention: AttentionSpec,
    dropout: float = 0.0,
    num_groups: int = 32,
) -> MidStage:
    """The bottleneck `MidStage` (resnet - attention - resnet) at ``channels``."""
    return MidStage(channels, temb_channels, attention, dropout, num_groups)


def build_up_path(
    channels: Sequence[int],
    skip_channels: Sequence[int],
    temb_channels: int,
    num_res_blocks: int,
    attention: Sequence[AttentionSpec],
    dropout: float = 0.0,
    num_groups: int = 32,
) -> nn.ModuleList:
    """One `UpStage` per level, deepest first, each popping ``num_res_blocks + 1`` skips.

    Args:
        channels: channels of each level (shallowest first, as `build_down_path`); the path starts
            from the middle block's ``channels[-1]``.
        skip_channels: the down path's skip channels in push order (not modified).
        temb_channels, num_res_blocks, dropout, num_groups: as `build_down_path`.
        attention: `SpatialTransformer` keyword arguments per level, indexed by level (not by
            up-path position).
    """
    _check_levels("build_up_path", attention, len(channels))
    pending = [int(c) for c in skip_channels]
    if len(pending) != len(channels) * (num_res_blocks + 1):
        raise ValueError(
            f"build_up_path: {len(pending)} skip channels for {len(channels)} levels of "
            f"{num_res_blocks + 1} resnets"
        )
    stages = nn.ModuleList()
    prev = int(channels[-1])
    for i in reversed(range(len(channels))):
        popped = [pending.pop() for _ in range(num_res_blocks + 1)]
        stages.append(
            UpStage(
                prev,
                popped,
                channels[i],
                temb_channels,
                attention[i],
                upsample=i != 0,
                dropout=dropout,
                num_groups=num_groups,
            )
        )
        prev = int(channels[i])
    return stages


@dataclass
class UNetResiduals:
    """Features added inside a UNet: ``skips[i]`` to the i-th skip (push order, ``conv_in`` output
    first; shapes as the down path makes them), ``mid`` to the middle block's output."""

    skips: list[torch.Tensor]
    mid: torch.Tensor | None = None


class ZeroResidualProjections(nn.Module):
    """Zero-initialised 1x1 convs (ControlNet's zero convs) from encoder features to `UNetResiduals`.

    Args:
        skip_channels: channels of each incoming skip feature (e.g. a companion ``UNetModel.skip_channels``).
        mid_channels: channels of the incoming middle feature; None = no ``mid`` residual.
        out_skip_channels, out_mid_channels: channels of the target UNet (default: the same).
    """

    def __init__(
        self,
        skip_channels: Sequence[int],
        mid_channels: int | None = None,
        out_skip_channels: Sequence[int] | None = None,
        out_mid_channels: int | None = None,
    ) -> None:
        super().__init__()
        outs = list(skip_channels if out_skip_channels is None else out_skip_channels)
        if len(outs) != len(skip_channels):
            raise ValueError(
                f"out_skip_channels has {len(outs)} entries for {len(skip_channels)} skip_channels"
            )
        self.skip_channels = [int(c) for c in skip_channels]
        self.skips = nn.ModuleList(
            zero_module(nn.Conv2d(int(c), int(o), kernel_size=1)) for c, o in zip(skip_channels, outs)
        )
        self.mid: nn.Module | None = None
        if mid_channels is not None:
            out_mid = mid_channels if out_mid_channels is None else out_mid_channels
            self.mid = zero_module(nn.Conv2d(int(mid_channels), int(out_mid), kernel_size=1))
        elif out_mid_channels is not None:
            raise ValueError("out_mid_channels needs mid_channels")

    def forward(self, skips: Sequence[torch.Tensor], mid: torch.Tensor | None = None) -> UNetResiduals:
        """Project each skip (and ``mid``, when built with ``mid_channels``) -> `UNetResiduals`."""
        if len(skips) != len(self.skips):
            raise ValueError(f"ZeroResidualProjections expects {len(self.skips)} skips, got {len(skips)}")
        if (mid is None) != (self.mid is None):
            raise ValueError(
                "ZeroResidualProjections "
                + ("needs mid" if mid is None else "was built without mid_channels but got mid")
            )
        out_mid = None if self.mid is None or mid is None else self.mid(mid)
        return UNetResiduals([conv(s) for conv, s in zip(self.skips, skips)], out_mid)
