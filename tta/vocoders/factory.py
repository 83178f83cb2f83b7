"""Build a vocoder by name, spec or config for a given mel front-end, refusing mismatched mels;
describe a vocoder as a config (what pipeline folders store) and rebuild it.

Nothing here is specific to one vocoder: specs are resolved by `tta.training.vocoding` (names
looked up in the registry, kind ``vocoder``, e.g. ``griffinlim`` or ``universal``; checkpoints of
any module whose ``generator`` is a `Vocoder`, e.g. `GANVocoderModule`), and a vocoder describes
itself through `Vocoder.init_args` and `Vocoder.config_class`.
"""

from __future__ import annotations

from typing import Any

from tta.data.mel import MelConfig
from tta.registry import class_path
from tta.training.loading import build_network
from tta.training.vocoding import (
    build_named_vocoder,
    check_composition,
    resolve_vocoder,
    weight_free_vocoders,
)
from tta.vocoders.base import Vocoder
from tta.vocoders.hifigan.universal import UNIVERSAL

__all__ = ["UNIVERSAL", "build_vocoder", "build_vocoder_from_config", "check_composition", "vocoder_config",
           "vocoder_names", "vocoder_spec"]


def vocoder_names() -> tuple[str, ...]:
    """Names `build_vocoder` accepts: every registered vocoder that needs no weights (sorted)."""
    return weight_free_vocoders()


def _as_vocoder(vocoder: Any, spec: str) -> Vocoder:
    if not isinstance(vocoder, Vocoder):
        raise TypeError(f"vocoder {spec!r} is a {type(vocoder).__name__}, not a tta Vocoder")
    return vocoder


def build_vocoder(name: str, mel_config: MelConfig) -> Vocoder:
    """A registered vocoder that needs no trained weights (``"griffinlim"``, ``"universal"``: the
    pretrained universal HiFi-GAN, which requires the ``demo`` mels), built for ``mel_config``;
    the result is in eval mode."""
    return _as_vocoder(build_named_vocoder(name, mel_config), name)


def vocoder_config(vocoder: Vocoder) -> dict[str, Any]:
    """``{"class_path": <import path>, "init_args": vocoder.init_args()}``, readable and rebuilt by
    `build_vocoder_from_config`; the class is ``vocoder.config_class`` when set, else its own."""
    return {"class_path": class_path(type(vocoder).config_class or type(vocoder)), "init_args": vocoder.init_args()}


def vocoder_spec(spec: str, mel_config: MelConfig) -> tuple[Vocoder, dict[str, Any]]:
    """``(vocoder, config)`` for a name of `build_vocoder` or the checkpoint of a vocoder-training
    module (any module whose ``generator`` is a `Vocoder`).

    The vocoder is in eval mode, weight norm folded, and checked against ``mel_config``.
    """
    voc = _as_vocoder(resolve_vocoder(spec, mel_config), spec)
    return voc, vocoder_config(voc)


def build_vocoder_from_config(config: dict[str, Any]) -> Vocoder:
    """Instantiate a vocoder config (`vocoder_config`; registry names or import paths) through the
    registry; weights are loaded by the caller."""
    voc = build_network(config, Vocoder)
    voc.requires_grad_(False)
    return voc.eval()
