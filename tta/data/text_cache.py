"""A caption-keyed on-disk cache of frozen T5 token states (``tta data text-cache``).

The shards cache (``tta data shard --with t5``) serves the streaming datamodule; this one serves
the manifest-based ``audio`` and ``reference_audio`` datamodules (``text_cache: DIR``), so that the
LDM and DreamAudio train without running their frozen (Flan-)T5 on every step, for the prompt
*and* DreamAudio's reference captions. A cache folder holds::

    index.json      format, version, the producer (the ``t5`` source's meta: weights sha256,
                    max_length, dim, folder name), the manifest's name and sha256, the split, count
    captions.json   the cached texts, sorted (row i of the arrays is text i)
    t5.npy          float32 (N, max_length, dim): the token states, as `TextTokenContext` computes them
    t5_mask.npy     bool (N, max_length): their mask

The texts are every caption of the chosen split's items (``""`` for an uncaptioned item, the caption
the datamodule gives it), every caption of their DreamAudio references
(`tta.data.customize_refs.item_references`), and ``""`` (absent references). The states come from
the ``t5_tokens`` array sources (`tta.generators.ldm.shard_conditions.t5_token_sources`), found by
name in the registry: this module imports no model code. Files are written atomically, the index
last; arrays are memory-mapped when read (`TextCache`).

Batch keys: the datamodule puts the prompt's states under `T5_TOKENS_KEY` / `T5_MASK_KEY` (the
shards' keys) and the reference captions' under `REF_T5_TOKENS_KEY` ``(B, K, L, D)`` /
`REF_T5_MASK_KEY` ``(B, K, L)``; `TextCache.meta` is what models compare with their encoder
(`tta.generators.ldm.shard_conditions.check_cached_conditions`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tta.data.customize_refs import item_references, manifest_lines
from tta.data.manifest import select_split
from tta.data.shards import caption_rows
from tta.data.shards_write import ArraySource
from tta.utils.errors import TTAError, UsageError
from tta.utils.files import atomic_path, file_sha256

__all__ = ["CAPTIONS_NAME", "FORMAT", "INDEX_NAME", "MASK_NAME", "REF_T5_MASK_KEY", "REF_T5_TOKENS_KEY",
           "STATES_NAME", "T5_LENGTH", "T5_MASK_KEY", "T5_TOKENS_KEY", "VERSION", "CachedTextCollate", "TextCache",
           "TextCacheError", "cache_texts", "check_out", "write_text_cache"]

log = logging.getLogger(__name__)

FORMAT = "tta-text-cache"
VERSION = 1
INDEX_NAME = "index.json"
CAPTIONS_NAME = "captions.json"
STATES_NAME = "t5.npy"
MASK_NAME = "t5_mask.npy"
_FILES = (INDEX_NAME, CAPTIONS_NAME, STATES_NAME, MASK_NAME)

#: tokens per caption of the cached T5 states unless given (DreamAudio's fixed prompt length)
T5_LENGTH = 50

#: batch keys of cached token states (`tta.generators.ldm.shard_conditions` uses the same)
T5_TOKENS_KEY = "t5_tokens"
T5_MASK_KEY = "t5_mask"
REF_T5_TOKENS_KEY = "reference_t5_tokens"
REF_T5_MASK_KEY = "reference_t5_mask"


class TextCacheError(TTAError, ValueError):
    """A text cache folder is invalid or lacks texts; the message names the file / field."""


def cache_texts(manifest: str | os.PathLike, split: str | None) -> list[str]:
    """The sorted unique texts a cache of ``split`` (None: every item) of ``manifest`` holds: every
    caption (``""`` for an uncaptioned item), every reference caption, and ``""``."""
    path = Path(manifest)
    lines = manifest_lines(path)
    chosen = {id(item) for item in select_split([item for _, item in lines], split, path)}
    texts = {""}
    for line, item in lines:
        if id(item) in chosen:
            texts.update(caption_rows(list(item.captions)))
            texts.update(ref.caption for ref in item_references(item, path.parent, manifest=path, line=line))
    return sorted(texts)


def check_out(out: str | os.PathLike, force: bool) -> None:
    """`UsageError` naming ``--out`` unless ``out`` is new, empty, or (with ``force``) a text cache."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    present = [p for p in out.iterdir() if not p.name.startswith(".")] if out.exists() else []
    others = [p.name for p in present if p.name not in _FILES]
    if others:
        raise UsageError(f"--out {out} is not empty and holds other files ({others[:3]}); give an empty or new "
                         "folder")
    if present and not force:
        raise UsageError(f"--out {out} is not empty: it already holds a text cache; pass --force to replace it")


def write_text_cache(manifest: str | os.PathLike, out: str | os.PathLike, sources: dict[str, ArraySource],
                     split: str | None = None, force: bool = False, batch_size: int = 64) -> TextCache:
    """Cache the `cache_texts` of ``split`` (None: all) of ``manifest`` in ``out`` with ``sources``
    (``t5`` -> states ``(N, L, D)``, ``t5_mask`` -> mask ``(N, L)``; `t5_token_sources`); see the
    module docstring. Refuses a non-empty ``out`` unless ``force``. Returns the written cache."""
    missing = sorted({"t5", "t5_mask"} - set(sources))
    if missing:
        raise ValueError(f"write_text_cache needs the array sources 't5' and 't5_mask'; {missing} missing")
    manifest, out = Path(manifest), Path(out)
    texts = cache_texts(manifest, split)
    check_out(out, force)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_NAME).unlink(missing_ok=True)  # first: a half-replaced cache has no index
    with atomic_path(out / CAPTIONS_NAME) as tmp:
        tmp.write_text(json.dumps(texts, ensure_ascii=False) + "\n", encoding="utf-8")
    with atomic_path(out / STATES_NAME) as seq_tmp, atomic_path(out / MASK_NAME) as mask_tmp:
        seq_file = mask_file = None
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            with torch.no_grad():
                seq = sources["t5"].fn(chunk).detach().float().cpu().numpy()
                mask = sources["t5_mask"].fn(chunk).detach().cpu().numpy() > 0.5
            if seq.ndim != 3 or mask.shape != seq.shape[:2] or seq.shape[0] != len(chunk):
                raise ValueError(f"the t5 sources returned states {seq.shape} and mask {mask.shape} for "
                                 f"{len(chunk)} texts; expected (N, L, D) and (N, L)")
            if seq_file is None:
                seq_file = np.lib.format.open_memmap(seq_tmp, mode="w+", dtype=np.float32,
                                                     shape=(len(texts), *seq.shape[1:]))
                mask_file = np.lib.format.open_memmap(mask_tmp, mode="w+", dtype=np.bool_,
                                                      shape=(len(texts), seq.shape[1]))
            seq_file[start:start + len(chunk)] = seq
            mask_file[start:start + len(chunk)] = mask
        seq_file.flush()
        mask_file.flush()
        del seq_file, mask_file  # close the maps before the rename
    index = {"format": FORMAT, "version": VERSION, "split": split, "count": len(texts),
             "producer": dict(sources["t5"].meta),
             "manifest": {"name": manifest.name, "sha256": file_sha256(manifest)}}
    with atomic_path(out / INDEX_NAME) as tmp:
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("%d texts of %s (split %s) cached under %s", len(texts), manifest, split or "all", out)
    return TextCache.load(out)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a complete `tta data text-cache` folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TextCacheError(f"{path}: not valid JSON ({exc})") from exc


class TextCache:
    """A ``tta data text-cache`` folder: texts -> their cached T5 ``(states, mask)``.

    `load` checks the files; the arrays are memory-mapped (and re-opened, not copied, in
    DataLoader workers)."""

    def __init__(self, folder: Path, index: dict[str, Any], captions: list[str]) -> None:
        self.folder, self.index, self.captions = folder, index, captions
        self._rows = {text: row for row, text in enumerate(captions)}
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def load(cls, folder: str | os.PathLike) -> TextCache:
        """Read and check the cache in ``folder`` (`TextCacheError` / `FileNotFoundError` naming the file)."""
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"text cache folder not found: {folder}")
        index = _read_json(folder / INDEX_NAME)
        where = folder / INDEX_NAME
        if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
            got = (index.get("format"), index.get("version")) if isinstance(index, dict) else type(index).__name__
            raise TextCacheError(f"{where}: format/version must be {FORMAT!r}/{VERSION}, got {got}")
        for field, kind in (("count", int), ("producer", dict), ("manifest", dict)):
            if not isinstance(index.get(field), kind):
                raise TextCacheError(f"{where}: field {field!r} must be a {kind.__name__}, got "
                                     f"{index.get(field)!r:.80}")
        captions = _read_json(folder / CAPTIONS_NAME)
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise TextCacheError(f"{folder / CAPTIONS_NAME}: must be a list of strings")
        if len(captions) != index["count"] or len(set(captions)) != len(captions):
            raise TextCacheError(f"{folder / CAPTIONS_NAME}: {len(captions)} texts ({len(set(captions))} unique), "
                                 f"but {INDEX_NAME} field 'count' is {index['count']}")
        cache = cls(folder, index, captions)
        cache._open()
        return cache

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is not None:
            return self._arrays
        arrays = []
        for name in (STATES_NAME, MASK_NAME):
            path = self.folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist: not a complete `tta data text-cache` folder")
            try:
                arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
            except ValueError as exc:
                raise TextCacheError(f"{path}: not a .npy array ({exc})") from exc
        seq, mask = arrays
        producer = self.meta
        want = (len(self.captions), producer.get("max_length"), producer.get("dim"))
        if seq.dtype != np.float32 or seq.shape != want:
            raise TextCacheError(f"{self.folder / STATES_NAME}: must be float32 (count, max_length, dim) = {want} "
                                 f"(from {INDEX_NAME}), got {seq.dtype} {seq.shape}")
        if mask.dtype != np.bool_ or mask.shape != seq.shape[:2]:
            raise TextCacheError(f"{self.folder / MASK_NAME}: must be bool {seq.shape[:2]}, got {mask.dtype} "
                                 f"{mask.shape}")
        self._arrays = (seq, mask)
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers re-open the maps
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def meta(self) -> dict[str, Any]:
        """The producer's metadata (the ``t5`` source's: ``sha256``, ``max_length``, ``dim``, ``checkpoint``)."""
        return dict(self.index["producer"])

    @property
    def index_path(self) -> Path:
        """The cache's ``index.json``."""
        return self.folder / INDEX_NAME

    def missing(self, texts: Iterable[str]) -> list[str]:
        """The distinct ``texts`` the cache lacks, in first-seen order."""
        return list(dict.fromkeys(t for t in texts if t not in self._rows))

    def require(self, texts: Iterable[str], what: str) -> None:
        """`TextCacheError` when any of ``texts`` (described by ``what``, e.g. "captions of split
        'val'") is not cached, naming the count, the first ones and the cache."""
        missing = self.missing(texts)
        if missing:
            raise TextCacheError(f"the text cache {self.folder} lacks {len(missing)} {what} (first: "
                                 f"{missing[:3]}); rebuild it with `tta data text-cache` over this manifest "
                                 f"(--split all covers every split)")

    def lookup(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states (B, L, D) float32, mask (B, L) bool)`` of ``captions``; KeyError naming a
        caption that is not cached."""
        rows = []
        for caption in captions:
            row = self._rows.get(caption)
            if row is None:
                raise KeyError(f"caption {caption!r} is not in the text cache {self.folder} ({len(self)} texts); "
                               "rebuild it with `tta data text-cache` over the training manifest")
            rows.append(row)
        seq, mask = self._open()
        return torch.from_numpy(np.array(seq[rows])), torch.from_numpy(np.array(mask[rows]))

    def lookup_nested(self, captions: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states (B, K, L, D), mask (B, K, L))`` of B lists of K captions (reference captions)."""
        k = len(captions[0]) if captions else 0
        if any(len(row) != k for row in captions):
            raise ValueError(f"captions must be lists of equal length, got lengths {[len(r) for r in captions]}")
        seq, mask = self.lookup([c for row in captions for c in row])
        return seq.reshape(len(captions), k, *seq.shape[1:]), mask.reshape(len(captions), k, mask.shape[-1])


class CachedTextCollate:
    """``collate(batch)`` plus the cached states of its ``caption`` (`T5_TOKENS_KEY`, `T5_MASK_KEY`)
    and, when it has ``reference_captions``, of those (`REF_T5_TOKENS_KEY`, `REF_T5_MASK_KEY`)."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]], cache: TextCache) -> None:
        self.collate, self.cache = collate, cache

    def __call__(self, batch: list[Any]) -> dict[str, Any]:
        out = self.collate(batch)
        out[T5_TOKENS_KEY], out[T5_MASK_KEY] = self.cache.lookup(out["caption"])
        if "reference_captions" in out:
            out[REF_T5_TOKENS_KEY], out[REF_T5_MASK_KEY] = self.cache.lookup_nested(out["reference_captions"])
        return out
