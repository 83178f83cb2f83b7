"""Output guard: never hand out (or write) broken audio silently."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

#: peak amplitude under which a generated clip counts as silent
SILENCE_PEAK = 1e-4


class BrokenOutputError(RuntimeError):
    """Generated audio is NaN/Inf (or silent when silence is not allowed)."""


def check_output(wav: torch.Tensor, allow_silent: bool = False, names: Sequence[str] | None = None) -> list[str]:
    """Raise on non-finite clips; raise on silent clips unless ``allow_silent`` (then warn).

    Returns one flag string per problem found (empty when every clip is fine).
    """
    names = list(names) if names is not None else [str(i) for i in range(wav.shape[0])]
    flags: list[str] = []
    bad = [names[i] for i in range(wav.shape[0]) if not torch.isfinite(wav[i]).all()]
    if bad:
        raise BrokenOutputError(f"generated audio contains NaN/Inf for {bad}; nothing was written")
    silent = [names[i] for i in range(wav.shape[0]) if wav[i].abs().max() < SILENCE_PEAK]
    if silent:
        msg = f"generated audio is silent (peak < {SILENCE_PEAK}) for {silent}"
        if not allow_silent:
            raise BrokenOutputError(msg + "; pass allow_silent=True (--allow-silent) to keep such clips")
        log.warning(msg)
        flags.extend(f"silent: {n}" for n in silent)
    return flags
