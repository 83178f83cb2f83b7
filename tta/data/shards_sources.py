"""The array sources of the frozen models a shard cache asks for, found by name in the registry.

`tta data shard --with` and the ``shard_cache`` predict module (`tta.training.shard_cache`) both
turn a list of cached array names (`MODEL_ARRAYS`) and the model paths into
`tta.data.shards_write.ArraySource` s here. The encoders are looked up by their registered names
(``vae_latents``, ``clap_embeddings``, ``t5_tokens``), so ``tta.data`` imports no model code.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from tta.data.mel import MelConfig
from tta.data.shards_write import ArraySource
from tta.data.text_cache import T5_LENGTH
from tta.utils.errors import UsageError

__all__ = ["MODEL_ARRAYS", "SEGMENT_ARRAYS", "array_sources", "cli_flag"]

#: cached arrays made by a frozen model (``mel`` is the data layer's own)
MODEL_ARRAYS = ("latent", "clap", "clap_audio", "t5")
#: those computed on the fixed training segment (the others on the captions)
SEGMENT_ARRAYS = ("latent", "clap_audio")


def cli_flag(name: str) -> str:
    """How `tta data shard` spells option ``name`` (``t5_length`` -> ``--t5-length``)."""
    return "--" + name.replace("_", "-")


def array_sources(wanted: list[str], mel: MelConfig, *, segment: bool, vae: str | os.PathLike | None = None,
                  clap: str | os.PathLike | None = None, t5: str | os.PathLike | None = None,
                  t5_length: int | None = None, flag: Callable[[str], str] = cli_flag) -> dict[str, ArraySource]:
    """The sources of the ``wanted`` model arrays (names outside `MODEL_ARRAYS` are ignored).

    ``segment``: whether a training segment is set (the segment arrays need one). A `UsageError`
    names the missing or superfluous option, spelled by ``flag`` (the CLI's ``--vae`` by default)."""
    from tta.registry import get

    segment_arrays = [w for w in wanted if w in SEGMENT_ARRAYS]
    if segment_arrays and not segment:
        raise UsageError(f"{flag('with')} {','.join(segment_arrays)} needs {flag('segment_seconds')} (the training "
                         "segment the datamodule will crop)")
    sources: dict[str, ArraySource] = {}
    if "latent" in wanted:
        if vae is None:
            raise UsageError(f"{flag('with')} latent needs {flag('vae')} CKPT (a `vae` checkpoint)")
        sources["latent"] = get("vae_latents", "encoder")(vae, mel)
    elif vae is not None:
        raise UsageError(f"{flag('vae')} applies to {flag('with')} latent only")
    clap_arrays = [w for w in wanted if w in ("clap", "clap_audio")]
    if clap_arrays:
        if clap is None:
            raise UsageError(f"{flag('with')} {','.join(clap_arrays)} needs {flag('clap')} CKPT_OR_FOLDER (the "
                             "model's CLAP: a `clap_trainer` checkpoint or a LAION CLAP folder)")
        sources.update(get("clap_embeddings", "encoder")(clap, clap_arrays, mel.sample_rate))
    elif clap is not None:
        raise UsageError(f"{flag('clap')} applies to {flag('with')} clap / clap_audio only")
    if "t5" in wanted:
        if t5 is None:
            raise UsageError(f"{flag('with')} t5 needs {flag('t5')} FOLDER (the model's local T5 / Flan-T5 folder)")
        if t5_length is not None and (isinstance(t5_length, bool) or int(t5_length) < 1):
            raise UsageError(f"{flag('t5_length')} must be an integer >= 1, got {t5_length!r}")
        sources.update(get("t5_tokens", "encoder")(t5, T5_LENGTH if t5_length is None else int(t5_length)))
    elif t5 is not None or t5_length is not None:
        raise UsageError(f"{flag('t5')} and {flag('t5_length')} apply to {flag('with')} t5 only")
    return sources
