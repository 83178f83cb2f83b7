"""Evaluation of generated audio: ``tta eval`` and the `evaluate` function (docs/evaluation.md)."""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate"]


def evaluate(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """`tta.evaluation.core.evaluate` (imported on first use)."""
    from tta.evaluation.core import evaluate as _evaluate

    return _evaluate(*args, **kwargs)
