"""tta: a PyTorch Lightning framework for text-to-audio generation research."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_pipeline"]


def load_pipeline(path: Any, vocoder: str | None = None, device: str = "cpu") -> Any:
    """``from tta import load_pipeline; pipe = load_pipeline(DIR); wavs = pipe(["..."], duration=5)``.

    Imports lazily: ``import tta`` stays free of torch-heavy side effects.
    """
    from tta.pipelines import load_pipeline as _load

    return _load(path, vocoder=vocoder, device=device)
