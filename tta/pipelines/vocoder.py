"""Vocoders of pipelines (re-exported from `tta.vocoders.factory`, where they live so that
generators can build their evaluation vocoder without importing the pipelines)."""

from tta.vocoders.factory import GRIFFINLIM_CLASS, HIFIGAN_CLASS, build_vocoder_from_config, vocoder_spec

__all__ = ["GRIFFINLIM_CLASS", "HIFIGAN_CLASS", "build_vocoder_from_config", "vocoder_spec"]
