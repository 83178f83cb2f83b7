"""Exponential moving average of a network's parameters, with a saved update counter."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class EMA:
    """EMA shadow of ``module``'s floating-point parameters and buffers.

    The effective decay warms up as ``min(decay, (1 + n) / (10 + n))`` where ``n`` is the number
    of updates so far; ``n`` is part of the state so a resumed run continues exactly.
    Frozen parameters (``requires_grad=False``, e.g. a frozen text encoder inside the module) are
    not shadowed: they cannot change.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        frozen = {k for k, p in module.named_parameters() if not p.requires_grad}
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().clone().float()
            for k, v in module.state_dict().items()
            if v.is_floating_point() and k not in frozen
        }

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.current_decay()
        for k, v in module.state_dict().items():
            if k in self.shadow:
                s = self.shadow[k]
                if s.device != v.device:
                    s = self.shadow[k] = s.to(v.device)
                s.mul_(d).add_(v.detach().float(), alpha=1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into ``module`` (all shadowed keys must exist)."""
        state = module.state_dict()
        for k, s in self.shadow.items():
            state[k].copy_(s.to(state[k].dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        unexpected = set(state["shadow"]) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(f"EMA state mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}
