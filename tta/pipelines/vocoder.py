"""Vocoders of pipelines (re-exported from `tta.vocoders.factory`, where they live so that
generators can build their evaluation vocoder without importing the pipelines)."""

from tta.vocoders.factory import build_vocoder_from_config, vocoder_config, vocoder_spec

__all__ = ["build_vocoder_from_config", "vocoder_config", "vocoder_spec"]
