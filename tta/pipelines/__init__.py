"""Inference composition: text (+ references) -> waveform."""

from __future__ import annotations

from typing import Any

__all__ = ["load_pipeline"]


def load_pipeline(path: Any, vocoder: str | None = None, device: str = "cpu") -> Any:
    """A text-to-audio pipeline from a pipeline folder or a checkpoint (see `tta.pipelines.ldm`)."""
    from tta.pipelines.ldm import load_pipeline as _load

    return _load(path, vocoder=vocoder, device=device)
