"""Optimizer and learning-rate schedule helpers shared by tta's modules."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class LinearWarmup:
    """LR multiplier: linear ramp from ~0 to 1 over ``warmup_steps`` optimizer steps, then 1.

    A class (not a lambda) so that ``LambdaLR.state_dict`` captures it for exact resume.
    """

    def __init__(self, warmup_steps: int) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)


class WarmupCosine(LinearWarmup):
    """LR multiplier: `LinearWarmup`, then a half cosine from 1 down to ``final_ratio`` at step
    ``total_steps``, then ``final_ratio``. A short run ends on settled weights instead of wherever
    a constant rate left them."""

    def __init__(self, warmup_steps: int, total_steps: int, final_ratio: float = 0.0) -> None:
        super().__init__(warmup_steps)
        if total_steps <= warmup_steps:
            raise ValueError(f"a cosine decay needs total_steps > warmup_steps, got {total_steps} <= {warmup_steps}")
        if not 0.0 <= final_ratio <= 1.0:
            raise ValueError(f"final_ratio must be in [0, 1], got {final_ratio}")
        self.total_steps, self.final_ratio = total_steps, final_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return super().__call__(step)
        t = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.final_ratio + (1.0 - self.final_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def adamw_with_warmup(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    final_ratio: float = 0.0,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its per-step scheduler: linear warm-up, then constant, or with ``total_steps``
    a cosine decay to ``final_ratio`` of ``lr`` (`WarmupCosine`)."""
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    schedule = LinearWarmup(warmup_steps) if total_steps is None else WarmupCosine(warmup_steps, total_steps,
                                                                                   final_ratio)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)
