"""Resolve a vocoder spec (a registered name or a checkpoint path) into a ready vocoder.

The training layer knows no concrete vocoder: names are looked up in the registry (kind
``vocoder``; a class with ``needs_weights = False`` is built as ``cls(mel_config=...)``, e.g.
``griffinlim`` or ``universal``), and a checkpoint may hold any module whose ``generator`` is a
vocoder (an ``nn.Module`` with a ``mel_config``). `tta.vocoders.factory` builds on these.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from tta.data.mel import MelConfig
from tta.registry import UnknownComponentError, components, get
from tta.training.loading import load_trained


def weight_free_vocoders() -> tuple[str, ...]:
    """Sorted names of the registered vocoders that need no trained weights (buildable by name)."""
    vocoders = components("vocoder")["vocoder"]
    return tuple(sorted(name for name, cls in vocoders.items() if not getattr(cls, "needs_weights", True)))


def is_vocoder_name(spec: str) -> bool:
    """Whether ``spec`` is the name of a registered vocoder (with or without weights)."""
    try:
        get(spec, "vocoder")
    except UnknownComponentError:
        return False
    return True


def check_composition(mel_config: MelConfig, vocoder: nn.Module, what: str = "generator and vocoder") -> None:
    """Raise `tta.data.mel.MelMismatchError` unless ``vocoder`` was trained on ``mel_config``."""
    vocoder_mels = getattr(vocoder, "mel_config", None)
    if vocoder_mels is None:
        raise ValueError(f"cannot compose {what}: the vocoder does not record its mel front-end")
    mel_config.check_compatible(vocoder_mels, what)


def _frozen(vocoder: nn.Module, mel_config: MelConfig, what: str) -> nn.Module:
    check_composition(mel_config, vocoder, what)
    vocoder.requires_grad_(False)
    return vocoder.eval()


def build_named_vocoder(name: str, mel_config: MelConfig) -> nn.Module:
    """The registered weight-free vocoder ``name`` built for ``mel_config`` (eval mode, no grad).

    Raises:
        ValueError: ``name`` is not registered, or names a vocoder that needs trained weights.
        MelMismatchError: the vocoder cannot vocode ``mel_config``.
    """
    free = ", ".join(weight_free_vocoders())
    try:
        cls = get(name, "vocoder")
    except UnknownComponentError:
        raise ValueError(f"unknown vocoder {name!r}; choose one of {free} or a checkpoint path") from None
    if getattr(cls, "needs_weights", True):
        raise ValueError(f"vocoder {name!r} needs trained weights: pass the checkpoint of a module that trained "
                         f"it (e.g. `gan_vocoder`, `hifigan`) instead; weight-free vocoders: {free}")
    return _frozen(cls(mel_config=mel_config), mel_config, f"the mels and vocoder {name!r}")


def load_checkpoint_vocoder(path: str | Path, mel_config: MelConfig) -> nn.Module:
    """The ``generator`` of the module trained in checkpoint ``path``: a copy with weight norm
    folded, checked against ``mel_config``, in eval mode without grad.

    Raises:
        TypeError: the checkpoint's module has no vocoder ``generator``.
    """
    module = load_trained(path, use_ema=False)
    generator = getattr(module, "generator", None)
    if not isinstance(generator, nn.Module) or not hasattr(generator, "mel_config"):
        held = "no `generator`" if generator is None else f"a {type(generator).__name__} `generator`"
        raise TypeError(f"{path} is a {type(module).__name__} checkpoint with {held}, not a vocoder one "
                        "(its `generator` is not a vocoder with a `mel_config`)")
    generator = copy.deepcopy(generator)
    if hasattr(generator, "remove_weight_norm"):
        generator.remove_weight_norm()
    return _frozen(generator, mel_config, f"the mels and the vocoder {path}")


def resolve_vocoder(spec: str, mel_config: MelConfig) -> nn.Module:
    """A vocoder for ``mel_config`` from ``spec``: a registered weight-free name (`build_named_vocoder`)
    or the checkpoint of a vocoder-training module (`load_checkpoint_vocoder`).

    Raises:
        FileNotFoundError: ``spec`` is neither a registered vocoder nor a file.
    """
    if is_vocoder_name(spec):
        return build_named_vocoder(spec, mel_config)
    if not Path(spec).is_file():
        raise FileNotFoundError(f"vocoder {spec!r} is neither one of {', '.join(weight_free_vocoders())} "
                                "nor a checkpoint file")
    return load_checkpoint_vocoder(spec, mel_config)
