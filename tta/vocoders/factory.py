"""Build a vocoder by name, spec or config for a given mel front-end, refusing mismatched mels;
describe a vocoder as a config (what pipeline folders store) and rebuild it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

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


HIFIGAN_CLASS = "tta.vocoders.hifigan.generator.HiFiGANGenerator"
GRIFFINLIM_CLASS = "tta.vocoders.griffinlim.GriffinLimVocoder"


def _hifigan_config(generator: Any) -> dict[str, Any]:
    mel = generator.mel_config.to_dict() if generator.mel_config is not None else None
    return {"class_path": HIFIGAN_CLASS, "init_args": {**generator.config, "use_weight_norm": False, "mel_config": mel}}


def vocoder_spec(spec: str, mel_config: MelConfig) -> tuple[Vocoder, dict[str, Any]]:
    """``(vocoder, config)`` for ``"universal"``, ``"griffinlim"`` or a ``hifigan`` checkpoint path.

    The vocoder is in eval mode, weight norm folded, and checked against ``mel_config``.
    """
    if spec in VOCODER_CHOICES:
        voc = build_vocoder(spec, mel_config)
        if spec == "griffinlim":
            config = {"class_path": GRIFFINLIM_CLASS, "init_args": {"mel_config": mel_config.to_dict()}}
        else:
            config = _hifigan_config(voc)
        return voc, config
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"vocoder {spec!r} is neither one of {', '.join(VOCODER_CHOICES)} nor a checkpoint file")
    from tta.training.loading import load_trained

    module = load_trained(path, use_ema=False)
    generator = getattr(module, "generator", None)
    if generator is None:
        raise TypeError(f"{path} is a {type(module).__name__} checkpoint, not a hifigan one")
    generator = copy.deepcopy(generator)
    if hasattr(generator, "remove_weight_norm"):
        generator.remove_weight_norm()
    generator.requires_grad_(False)
    check_composition(mel_config, generator, f"the mels and the vocoder {path}")
    return generator.eval(), _hifigan_config(generator)


def build_vocoder_from_config(config: dict[str, Any]) -> Vocoder:
    """Instantiate a vocoder config written by `vocoder_spec` (weights loaded by the caller)."""
    from tta.training.loading import build_network

    voc = build_network(config, Vocoder)
    voc.requires_grad_(False)
    return voc.eval()
