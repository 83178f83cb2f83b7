"""Build a vocoder by name for a given mel front-end, refusing mismatched mels."""

from __future__ import annotations

from tta.data.mel import MelConfig
from tta.vocoders.base import Vocoder

VOCODER_CHOICES = ("griffinlim", "universal")


def build_vocoder(name: str, mel_config: MelConfig) -> Vocoder:
    """``"griffinlim"`` (any STFT mels) or ``"universal"`` (the pretrained universal HiFi-GAN,
    which requires the ``demo`` mels); the result is in eval mode."""
    if name == "griffinlim":
        from tta.vocoders.griffinlim import GriffinLimVocoder

        vocoder: Vocoder = GriffinLimVocoder(mel_config)
    elif name == "universal":
        from tta.vocoders.hifigan.importers import load_universal_hifigan

        vocoder = load_universal_hifigan()
    else:
        raise ValueError(f"unknown vocoder {name!r}; choose one of {', '.join(VOCODER_CHOICES)}")
    check_composition(mel_config, vocoder, f"the mels and vocoder {name!r}")
    vocoder.requires_grad_(False)
    return vocoder.eval()


def check_composition(mel_config: MelConfig, vocoder: Vocoder, what: str = "generator and vocoder") -> None:
    """Raise `tta.data.mel.MelMismatchError` unless ``vocoder`` was trained on ``mel_config``."""
    if vocoder.mel_config is None:
        raise ValueError(f"cannot compose {what}: the vocoder does not record its mel front-end")
    mel_config.check_compatible(vocoder.mel_config, what)
