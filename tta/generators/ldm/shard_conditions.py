"""Frozen conditioning encoders cached in shards (``tta data shard --with clap,clap_audio,t5``) and their checks.

Sources (`tta.data.shards_write.ArraySource`, found by name through `tta.registry`, so that
``tta.data`` imports no model):

- ``clap`` (`clap_embedding_sources`, ``inputs="text"``): the normalised CLAP text embedding
  ``(joint_dim,)`` of every caption of an item, by `ClapTextFiLM.embed` (what the LDM's FiLM
  conditioner runs live); batch key `CLAP_TEXT_KEY`;
- ``clap_audio`` (``inputs="wav"``): the CLAP audio embedding of the item's fixed training segment,
  by `ClapTextFiLM.embed_audio` (AudioLDM's training condition, ``film_source="audio"``); batch
  key `CLAP_AUDIO_KEY`;
- ``t5`` + ``t5_mask`` (`t5_token_sources`, ``inputs="text"``): the (Flan-)T5 token states
  ``(max_length, dim)`` and mask ``(max_length,)`` of every caption at the consuming model's fixed
  length, as `TextTokenContext` computes them; batch keys `T5_TOKENS_KEY` and `T5_MASK_KEY`.

**Keyed to the caption by construction**: a text array holds one row per caption of the item, in
the item's own order (`tta.data.shards.caption_rows`, written next to the item's JSON in the same
tar); the datamodule draws the caption index once and takes both the ``caption`` and that row
(`tta.data.shards_stream.ClipSettings.per_caption`); an item whose row count differs from its
caption count is refused. `TextTokenContext` also checks each row's token count against the
tokenization of the batch's caption.

The same ``t5`` sources fill the caption-keyed cache of the manifest datamodules (``tta data
text-cache``, `tta.data.text_cache`), whose batches carry the same keys, plus the reference
captions' states (`REF_T5_TOKENS_KEY`, `REF_T5_MASK_KEY`) for DreamAudio.

**Consumption**: `LatentDiffusionModule` (and DreamAudio, its subclass) reads the FiLM embedding
from the batch (`cached_film`) and passes the token states to every `TextTokenContext` (input
``cached_tokens``, `cached_tokens`) instead of running the frozen encoders; DreamAudio passes the
reference captions' to `ReferenceCaptions`. At fit start, `check_cached_conditions` refuses caches
made by other weights (or another text length) than the model's, naming the shard / cache index.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tta.data.shards_write import ArraySource
from tta.data.text_cache import REF_T5_MASK_KEY, REF_T5_TOKENS_KEY, T5_LENGTH, T5_MASK_KEY, T5_TOKENS_KEY
from tta.generators.conditioning.text_tokens import TextTokenContext
from tta.generators.ldm.conditioning import ClapTextFiLM
from tta.registry import register
from tta.training.frozen_cache import check_cache_producer
from tta.utils.errors import UsageError

__all__ = ["CLAP_ARRAYS", "CLAP_AUDIO_KEY", "CLAP_TEXT_KEY", "REF_T5_MASK_KEY", "REF_T5_TOKENS_KEY", "T5_MASK_KEY",
           "T5_TOKENS_KEY", "cached_film", "cached_tokens", "check_cached_conditions", "clap_embedding_sources",
           "load_frozen_clap", "t5_token_sources"]

log = logging.getLogger(__name__)

#: batch keys of the cached arrays (the T5 ones, shared with the text cache, are the data layer's)
CLAP_TEXT_KEY = "clap_text"
CLAP_AUDIO_KEY = "clap_audio"
#: ``--with`` names of the CLAP arrays -> batch key
CLAP_ARRAYS = {"clap": CLAP_TEXT_KEY, "clap_audio": CLAP_AUDIO_KEY}


def load_frozen_clap(path: str | os.PathLike) -> nn.Module:
    """The frozen CLAP of ``path``: a ``clap_trainer`` checkpoint (as ``clap_checkpoint`` loads
    it) or a LAION CLAP transformers folder (the ``laion_clap`` network)."""
    path = Path(path).expanduser()
    if path.is_dir():
        from tta.encoders.clap_import import load_laion_clap

        clap: nn.Module = load_laion_clap(path)
    else:
        from tta.encoders.clap_towers import load_clap_network

        clap = load_clap_network(path)
    clap.requires_grad_(False)
    if hasattr(clap, "freeze_all"):
        clap.freeze_all()
    return clap.eval()


def _clap_identity(clap: nn.Module) -> dict[str, Any]:
    """What fixes a CLAP's embeddings: its weights and its text length (truncation)."""
    from tta.retrieval.features import module_fingerprint

    return {"sha256": module_fingerprint(clap), "text_max_length": getattr(clap.text_encoder, "max_length", None)}


def _tokens_identity(encoder: nn.Module) -> dict[str, Any]:
    """What fixes a text encoder's token states: its weights and its (fixed) length."""
    from tta.retrieval.features import module_fingerprint

    return {"sha256": module_fingerprint(encoder), "max_length": getattr(encoder, "max_length", None)}


@register("encoder", "clap_embeddings")  # `tta data shard --with clap,clap_audio` finds it by name
def clap_embedding_sources(path: str | os.PathLike, arrays: Sequence[str], sample_rate: int) -> dict[str, ArraySource]:
    """The ``clap`` (text, per caption) and / or ``clap_audio`` (fixed segment; waveforms at
    ``sample_rate``, the shards' mel rate) array sources of the CLAP at ``path``."""
    unknown = sorted(set(arrays) - set(CLAP_ARRAYS))
    if unknown:
        raise ValueError(f"unknown CLAP arrays {unknown}; choose from {sorted(CLAP_ARRAYS)}")
    clap = load_frozen_clap(path)
    film = ClapTextFiLM(clap)  # the live FiLM conditioner's own embedding functions
    meta = {"checkpoint": Path(path).name, **_clap_identity(clap), "joint_dim": film.dim}
    sources = {}
    if "clap" in arrays:
        sources["clap"] = ArraySource(fn=film.embed, inputs="text", module=film,
                                      meta={"kind": "clap_text_embedding", "batch_key": CLAP_TEXT_KEY, **meta})
    if "clap_audio" in arrays:
        from tta.encoders.clap.text_only import ClapTextOnly

        if isinstance(clap, ClapTextOnly):
            raise UsageError(f"--with clap_audio: the CLAP of {path} is text-only (no audio tower); cache --with clap")
        sources["clap_audio"] = ArraySource(fn=lambda wav: film.embed_audio(wav, sample_rate), inputs="wav", module=film,
                                            meta={"kind": "clap_audio_embedding", "batch_key": CLAP_AUDIO_KEY,
                                                  **meta})
    return sources


@register("encoder", "t5_tokens")  # `tta data shard --with t5` finds it by name
def t5_token_sources(folder: str | os.PathLike, max_length: int = T5_LENGTH) -> dict[str, ArraySource]:
    """The ``t5`` (token states) and ``t5_mask`` array sources of the local T5 / Flan-T5 folder,
    padded / truncated to ``max_length`` tokens (the consuming ``t5_text`` encoder's)."""
    from tta.encoders.text import T5TextEncoder

    encoder = T5TextEncoder(folder, max_length=max_length, fixed_length=True)
    context = TextTokenContext(encoder)  # the live conditioner's own encoding

    def states(texts: list[str]) -> torch.Tensor:
        return context.encode({"captions": texts}, torch.device("cpu"))[0]

    def mask(texts: list[str]) -> torch.Tensor:
        return encoder.tokenize(texts)[1].float()  # the mask `encoder(texts)` returns, without the network

    meta = {"checkpoint": Path(folder).name, **_tokens_identity(encoder), "dim": encoder.dim}
    return {"t5": ArraySource(fn=states, inputs="text", meta={"kind": "t5_token_states", "batch_key": T5_TOKENS_KEY,
                                                              "requires": ["t5_mask"], **meta}, module=encoder),
            "t5_mask": ArraySource(fn=mask, inputs="text", meta={"kind": "t5_token_mask", "batch_key": T5_MASK_KEY,
                                                                 "requires": ["t5"], **meta})}


def cached_film(batch: Mapping[str, Any], film_source: str) -> torch.Tensor | None:
    """The batch's cached CLAP embeddings for ``film_source`` (``"text"`` / ``"audio"``), or None."""
    value = batch.get(CLAP_TEXT_KEY if film_source == "text" else CLAP_AUDIO_KEY)
    return None if value is None else value.float()


def cached_tokens(batch: Mapping[str, Any], key: str = T5_TOKENS_KEY,
                  mask_key: str = T5_MASK_KEY) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The batch's cached ``(token states, bool mask)`` under ``key`` / ``mask_key`` (default: the
    prompt's; `REF_T5_TOKENS_KEY` / `REF_T5_MASK_KEY`: the reference captions'), or None."""
    if key not in batch:
        return None
    if mask_key not in batch:
        raise KeyError(f"the batch has cached token states {key!r} without their mask {mask_key!r}: "
                       "use both cached arrays t5 and t5_mask")
    return batch[key].float(), batch[mask_key] > 0.5


def check_cached_conditions(model: nn.Module, film_source: str, datamodule: Any) -> None:
    """Refuse cached CLAP embeddings / token states (of the prompt, or of DreamAudio's reference
    captions) of ``datamodule``'s training shards or text cache that were made by another CLAP or
    text encoder than ``model``'s (a `LatentDiffusion`); log the cached arrays the model does not read."""
    sources = datamodule.cached_sources() if hasattr(datamodule, "cached_sources") else {}
    text: ClapTextFiLM | None = getattr(model, "text", None)
    used = CLAP_TEXT_KEY if film_source == "text" else CLAP_AUDIO_KEY
    for key in (CLAP_TEXT_KEY, CLAP_AUDIO_KEY):
        if key not in sources:
            continue
        if text is None or key != used:
            log.warning("the training batches carry cached %s, which this model does not read (film_source=%r%s)",
                        key, film_source, "" if text is not None else ", no CLAP FiLM")
            continue
        name = {v: k for k, v in CLAP_ARRAYS.items()}[key]
        check_cache_producer(datamodule, key, _clap_identity(text.clap), f"CLAP {film_source} embeddings", "CLAP",
                             f"Reshard with `tta data shard --with {name} --clap` of this model's CLAP, or set the "
                             f"datamodule's use_cached without '{name}'")
    fix = ("Rebuild the cache (`tta data shard --with t5`, or `tta data text-cache` for the datamodule's "
           "text_cache) with --t5 this model's encoder folder and --t5-length its max_length, or train without it "
           "(the shards datamodule's use_cached without 't5', 't5_mask'; no text_cache)")
    identities: dict[int, dict[str, Any]] = {}  # DreamAudio's prompt and reference captions share one T5: hash it once
    for key, what in ((T5_TOKENS_KEY, "T5 token states"), (REF_T5_TOKENS_KEY, "reference captions' T5 token states")):
        if key not in sources:
            continue
        readers = {n: c for n, c in model.conditioners.items() if c.cached_tokens_key == key}
        if not readers:
            log.warning("the training batches carry cached %s, which this model does not read (no conditioner "
                        "reads %r)", what, key)
        for name, conditioner in readers.items():
            encoder = conditioner.text_encoder
            if id(encoder) not in identities:
                identities[id(encoder)] = _tokens_identity(encoder)
            check_cache_producer(datamodule, key, identities[id(encoder)], f"{what} (read by conditioner {name!r})",
                                 "text encoder", fix)
