"""Optimizer and learning-rate schedule helpers shared by tta's modules."""

from __future__ import annotations

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


def adamw_with_warmup(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its per-step linear warm-up scheduler."""
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, LinearWarmup(warmup_steps))
