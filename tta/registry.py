"""Name -> component registry.

Every LightningModule, DataModule and network registers under a short name and a kind::

    from tta.registry import register

    @register("module", "vae")
    class VAEModule(TTAModule): ...

Configs may then say ``class_path: vae`` (or the full import path). Third-party packages
register their components through the entry-point group ``tta.plugins``: each entry point
names a module (or a callable) that is imported (called) once, registering its components as a
side effect of the import.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

log = logging.getLogger(__name__)

KINDS = ("module", "datamodule", "network", "process", "vocoder", "discriminator", "autoencoder", "encoder",
         "conditioner", "metric", "callback", "pipeline")
ENTRY_POINT_GROUP = "tta.plugins"

# Modules of tta itself that hold registered components; imported lazily by `load_builtin()`.
_BUILTIN_MODULES = (
    "tta.data.datamodule",
    "tta.generators.vae.network",
    "tta.nn.discriminators",
    "tta.generators.vae.module",
    "tta.nn.quantize",
    "tta.generators.vqgan.network",
    "tta.generators.vqgan.module",
    "tta.vocoders.hifigan.generator",
    "tta.vocoders.hifigan.discriminators",
    "tta.vocoders.gan",
    "tta.vocoders.hifigan.module",
    "tta.vocoders.griffinlim",
    "tta.vocoders.melgan.generator",
    "tta.vocoders.melgan.discriminators",
    "tta.vocoders.melgan.module",
    "tta.vocoders.hifigan.universal",
    "tta.vocoders.bigvgan.generator",
    "tta.vocoders.bigvgan.discriminators",
    "tta.vocoders.bigvgan.module",
    "tta.training.callbacks",
    "tta.encoders.htsat",
    "tta.encoders.cnn14",
    "tta.encoders.audiomae",
    "tta.encoders.text",
    "tta.encoders.pretrained",
    "tta.encoders.clip_text",
    "tta.encoders.clap.network",
    "tta.encoders.clap.module",
    "tta.encoders.clap.captioner",
    "tta.encoders.clap.caption_module",
    "tta.encoders.clap_import",
    "tta.encoders.clap.text_only",
    "tta.encoders.clap_towers",
    "tta.retrieval.features_extract",
    "tta.nn.unet",
    "tta.nn.mrc_unet",
    "tta.nn.reference_align",
    "tta.generators.noise.ddpm",
    "tta.generators.noise.flow",
    "tta.generators.ldm.retrieval",
    "tta.generators.conditioning.text_tokens",
    "tta.generators.ldm.module",
    "tta.generators.dreamaudio.conditioning",
    "tta.generators.dreamaudio.module",
    "tta.data.references",
    "tta.pipelines.dreamaudio",
    "tta.metrics.fad",
    "tta.metrics.classifier",
    "tta.metrics.clap_score",
    "tta.metrics.spectrogram",
    "tta.training.eval_callback",
    "tta.pipelines.ldm",
    "tta.nn.mel_classifier", "tta.encoders.mel_classifier", "tta.metrics.melception",
    "tta.nn.code_prior", "tta.generators.vqgan.prior", "tta.pipelines.vqgan",
    "tta.data.shards_datamodule",
    "tta.data.shards_extend",
    "tta.training.shard_cache",
    "tta.generators.vae.shard_latents",
    "tta.generators.ldm.shard_conditions",
)

_REGISTRY: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}
_loaded = {"builtin": False, "plugins": False}

T = TypeVar("T", bound=type)


class UnknownComponentError(KeyError):
    """Raised for a name that no component registered under."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register(kind: str, name: str) -> Callable[[T], T]:
    """Class decorator registering ``cls`` as ``name`` of ``kind``."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")

    def deco(cls: T) -> T:
        # names are unique across kinds: configs say `class_path: NAME` without a kind
        for other_kind, entries in _REGISTRY.items():
            existing = entries.get(name)
            if existing is not None and existing is not cls:
                raise ValueError(
                    f"component name {name!r} ({kind}) is already registered as a {other_kind} by "
                    f"{class_path(existing)}"
                )
        _REGISTRY[kind][name] = cls
        cls.registry_name = name  # type: ignore[attr-defined]
        return cls

    return deco


def load_builtin() -> None:
    """Import tta's own component modules so that they register."""
    if _loaded["builtin"]:
        return
    _loaded["builtin"] = True
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


def load_plugins() -> None:
    """Import every entry point of group ``tta.plugins`` (once). A broken plugin raises."""
    if _loaded["plugins"]:
        return
    _loaded["plugins"] = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:
            raise ImportError(f"tta plugin entry point {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        if callable(obj) and not isinstance(obj, type):
            obj()
        log.debug("loaded tta plugin %s", ep.name)


def _ensure_loaded() -> None:
    load_builtin()
    load_plugins()


def components(kind: str | None = None) -> dict[str, dict[str, type]]:
    """Registered components, ``{kind: {name: class}}`` (optionally of one kind)."""
    _ensure_loaded()
    if kind is None:
        return {k: dict(v) for k, v in _REGISTRY.items()}
    if kind not in _REGISTRY:
        raise ValueError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
    return {kind: dict(_REGISTRY[kind])}


def get(name: str, kind: str | None = None) -> type:
    """The class registered as ``name`` (of ``kind`` if given); clear error listing names."""
    _ensure_loaded()
    kinds = [kind] if kind else list(KINDS)
    for k in kinds:
        if name in _REGISTRY[k]:
            return _REGISTRY[k][name]
    available = sorted({n for k in kinds for n in _REGISTRY[k]})
    where = f" {kind}" if kind else ""
    raise UnknownComponentError(
        f"unknown{where} component {name!r}; registered names: {', '.join(available) or '(none)'}"
    )


def class_path(cls: type) -> str:
    """Import path of a class, as jsonargparse expects it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve(name: str, kind: str | None = None) -> str:
    """Turn a short name or a dotted import path into a dotted import path.

    Dotted paths are returned unchanged (jsonargparse reports import errors for them).
    """
    if "." in name:
        return name
    return class_path(get(name, kind))


def resolve_config(obj: Any) -> Any:
    """Recursively replace short ``class_path`` names in a parsed YAML config by import paths."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if key == "class_path" and isinstance(value, str):
                out[key] = resolve(value)
            else:
                out[key] = resolve_config(value)
        return out
    if isinstance(obj, list):
        return [resolve_config(v) for v in obj]
    return obj
