"""Inference composition: text (+ references) -> waveform (`tta.pipelines.base.Pipeline`)."""

from __future__ import annotations

from typing import Any

__all__ = ["load_pipeline"]


def load_pipeline(path: Any, vocoder: str | None = None, device: str = "cpu") -> Any:
    """The pipeline of a pipeline folder or a checkpoint (`tta.pipelines.base.load_pipeline`)."""
    from tta.pipelines.base import load_pipeline as _load

    return _load(path, vocoder=vocoder, device=device)
