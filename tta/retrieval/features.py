"""Feature store of a retrieval datastore: cached neighbour features for Re-AudioLDM.

Re-AudioLDM's UNet cross-attends to an audio feature sequence and a T5 caption embedding of each
retrieved neighbour. They are computed once for the whole datastore (``tta predict`` with the
``retrieval_features`` module, `tta.retrieval.features_extract`) and read from disk in training.

A store is a directory::

    meta.json        format, count, dtype, per modality: encoder (name, class, sha256 of its
                     weights, config), tokens/length, dim; creation info (run id, ranks, parts)
    ids.json         the id of every row, sorted
    audio.npy        (N, La, Da) float16     audio_mask.npy (N, La) bool
    text.npy         (N, Lt, Dt) float16     text_mask.npy  (N, Lt) bool

A store may hold only one modality (audio-only / text-only ablations). Arrays are opened with
``mmap_mode="r"``, so DDP ranks and DataLoader workers share the page cache.

Writing: every rank appends batches (any order) with a `FeatureStoreWriter`, which flushes part
files into ``.<name>.parts-<run id>/`` beside the store; `finalize_store` then merges the parts
(rows sorted by id, duplicated ids kept once after checking they agree), writes the store into a
temporary directory and renames it into place, ``meta.json`` last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tta.retrieval.features_write import (
    FORMAT,
    IDS_FILE,
    META_FILE,
    MODALITIES,
    SIZE_KEY,
    FeatureStoreMismatchError,
    FeatureStoreWriter,
    check_writable,
    finalize_store,
    new_run_id,
    parts_dir,
    read_meta,
)

__all__ = [
    "FORMAT",
    "FeatureStore",
    "FeatureStoreMismatchError",
    "FeatureStoreWriter",
    "MissingFeaturesError",
    "check_writable",
    "finalize_store",
    "fit_length",
    "module_fingerprint",
    "new_run_id",
    "parts_dir",
]

log = logging.getLogger(__name__)


class MissingFeaturesError(KeyError):
    """Ids asked of a store that it does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def fit_length(
    seq: torch.Tensor, mask: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (zeros, mask False) or truncate ``seq (B, L, D)`` / ``mask (B, L)`` to ``length`` positions.

    Padded positions of ``seq`` are zero whatever the input held there.
    """
    if length < 1:
        raise ValueError(f"fit_length: length must be >= 1, got {length}")
    if seq.dim() != 3 or mask.shape != seq.shape[:2]:
        raise ValueError(
            f"fit_length: seq {tuple(seq.shape)} and mask {tuple(mask.shape)} must be (B, L, D), (B, L)"
        )
    mask = mask.bool()
    seq = seq * mask.unsqueeze(-1).to(seq.dtype)
    cur = seq.shape[1]
    if cur >= length:
        return seq[:, :length], mask[:, :length]
    pad = length - cur
    seq = torch.nn.functional.pad(seq, (0, 0, 0, pad))
    mask = torch.nn.functional.pad(mask, (0, pad), value=False)
    return seq, mask


def module_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = (
            tensor.detach().cpu().contiguous().reshape(-1)
        )  # 0-d tensors cannot be viewed as bytes
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FeatureStore:
    """A finished feature store, memory-mapped read-only; see the module doc for the layout.

    Use `FeatureStore.open` (checks) rather than the constructor. Pickling keeps only the path
    and metadata, so DataLoader workers re-map the arrays instead of copying them.
    """

    def __init__(self, directory: Path, meta: dict[str, Any], ids: list[str]) -> None:
        self.directory = directory
        self.meta = meta
        self.ids = ids
        self._index = {x: i for i, x in enumerate(ids)}
        self._arrays: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        expect_audio_hash: str | None = None,
        expect_text_hash: str | None = None,
        require: Sequence[str] = (),
        expect_text_length: int | None = None,
    ) -> FeatureStore:
        """Open a store, checking its files and, when given, the encoders and sizes it was built with.

        ``expect_*_hash`` is the SHA-256 of the encoder's weights (`module_fingerprint`, recorded
        under ``meta[modality]["encoder"]["sha256"]``); ``require`` names modalities that must be
        present. A mismatch raises `FeatureStoreMismatchError`.
        """
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"feature store {d} not found")
        meta = read_meta(d)
        assert meta is not None
        ids_path = d / IDS_FILE
        if not ids_path.is_file():
            raise FileNotFoundError(f"feature store {d}: {IDS_FILE} not found")
        ids = json.loads(ids_path.read_text())
        if len(ids) != meta["count"]:
            raise ValueError(
                f"{ids_path} lists {len(ids)} ids but {META_FILE} says count {meta['count']}"
            )
        if len(set(ids)) != len(ids):
            raise ValueError(f"{ids_path} lists some ids more than once")
        store = cls(d, meta, ids)
        for modality in require:
            if modality not in MODALITIES:
                raise ValueError(
                    f"unknown modality {modality!r}; modalities are {MODALITIES}"
                )
            if not store.has(modality):
                raise FeatureStoreMismatchError(
                    f"feature store {d} holds no {modality} features (required)"
                )
        for modality, expected in (
            ("audio", expect_audio_hash),
            ("text", expect_text_hash),
        ):
            if expected is None:
                continue
            got = ((meta.get(modality) or {}).get("encoder") or {}).get("sha256")
            if got != expected:
                raise FeatureStoreMismatchError(
                    f"feature store {d} was built with {modality} encoder weights {got!r}, not the expected "
                    f"{expected!r}; rebuild it with tta predict"
                )
        if (
            expect_text_length is not None
            and store.has("text")
            and store.length("text") != expect_text_length
        ):
            raise FeatureStoreMismatchError(
                f"feature store {d} holds text sequences of length {store.length('text')}, expected {expect_text_length}"
            )
        for (
            modality
        ) in store.modalities:  # map now: shape and dtype errors surface at open time
            store._array(modality)
            store._array(f"{modality}_mask")
        return store

    def _array(self, key: str) -> np.ndarray:
        arr = self._arrays.get(key)
        if arr is not None:
            return arr
        path = self.directory / f"{key}.npy"
        if not path.is_file():
            raise FileNotFoundError(
                f"feature store {self.directory}: {path.name} not found"
            )
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        modality = key.removesuffix("_mask")
        n, length = self.meta["count"], self.length(modality)
        shape = (
            (n, length) if key.endswith("_mask") else (n, length, self.dim(modality))
        )
        dtype = np.bool_ if key.endswith("_mask") else np.float16
        if arr.shape != shape or arr.dtype != dtype:
            raise ValueError(
                f"{path}: {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape} from {META_FILE}"
            )
        self._arrays[key] = arr
        return arr

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "meta": self.meta, "ids": self.ids}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["meta"], state["ids"])  # type: ignore[misc]

    # -------------------------------------------------------------- properties
    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities the store holds (``audio``, ``text`` or both)."""
        return tuple(m for m in MODALITIES if self.meta.get(m))

    def has(self, modality: str) -> bool:
        """Whether the store holds ``modality`` features."""
        return modality in self.modalities

    def length(self, modality: str) -> int:
        """Tokens per clip of ``modality`` (La or Lt)."""
        return int(self._info(modality)[SIZE_KEY[modality]])

    def dim(self, modality: str) -> int:
        """Feature width of ``modality`` (Da or Dt)."""
        return int(self._info(modality)["dim"])

    def _info(self, modality: str) -> dict[str, Any]:
        info = self.meta.get(modality)
        if not info:
            raise KeyError(
                f"feature store {self.directory} holds no {modality} features"
            )
        return info

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, clip_id: object) -> bool:
        return clip_id in self._index

    # ------------------------------------------------------------------ lookup
    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each id; `MissingFeaturesError` names the ids the store lacks."""
        missing = [x for x in dict.fromkeys(ids) if x not in self._index]
        if missing:
            raise MissingFeaturesError(
                f"{len(missing)} ids are not in feature store {self.directory} ({len(self)} clips): "
                f"{', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''}; rebuild the store over "
                "the datastore the neighbour table was built from"
            )
        return np.fromiter(
            (self._index[x] for x in ids), dtype=np.int64, count=len(ids)
        )

    def lookup(
        self, ids: Sequence[Sequence[str]], dtype: torch.dtype = torch.float32
    ) -> dict[str, torch.Tensor]:
        """Features of ``B`` rows of ``k`` neighbour ids each.

        Returns ``{"audio": (B, k, La, Da), "audio_mask": (B, k, La), "text": (B, k, Lt, Dt),
        "text_mask": (B, k, Lt)}`` (only the modalities the store holds), features in ``dtype``,
        masks bool (True = real position).
        """
        if isinstance(ids, str) or not len(ids):
            raise ValueError(
                "lookup takes a non-empty sequence of id sequences (B rows of k neighbour ids)"
            )
        rows_of = [
            [ids_row] if isinstance(ids_row, str) else list(ids_row) for ids_row in ids
        ]
        if any(isinstance(r, str) for r in ids):
            raise TypeError(
                "lookup takes B sequences of k ids each, got a bare id string in a row position"
            )
        k = len(rows_of[0])
        if k == 0 or any(len(r) != k for r in rows_of):
            raise ValueError(
                f"lookup rows must all hold the same number (>= 1) of ids, got {[len(r) for r in rows_of]}"
            )
        flat = self.rows([x for r in rows_of for x in r])
        uniq, inverse = np.unique(
            flat, return_inverse=True
        )  # sorted reads of the memory map
        b = len(rows_of)
        out: dict[str, torch.Tensor] = {}
        for modality in self.modalities:
            feats = np.asarray(self._array(modality)[uniq])[inverse]
            mask = np.asarray(self._array(f"{modality}_mask")[uniq])[inverse]
            out[modality] = torch.from_numpy(feats.reshape(b, k, *feats.shape[1:])).to(
                dtype
            )
            out[f"{modality}_mask"] = torch.from_numpy(mask.reshape(b, k, -1).copy())
        return out

    # ----------------------------------------------------------------- writing
    @staticmethod
    def write(
        directory: str | os.PathLike,
        ids: Sequence[str],
        audio: torch.Tensor | np.ndarray | None = None,
        audio_mask: torch.Tensor | np.ndarray | None = None,
        text: torch.Tensor | np.ndarray | None = None,
        text_mask: torch.Tensor | np.ndarray | None = None,
        audio_meta: Mapping[str, Any] | None = None,
        text_meta: Mapping[str, Any] | None = None,
        extra_meta: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> FeatureStore:
        """Write a whole store from in-memory arrays in one process (one writer, then finalize)."""
        run_id = new_run_id()
        writer = FeatureStoreWriter(
            directory,
            run_id,
            0,
            audio_meta=(audio_meta or {}) if audio is not None else None,
            text_meta=(text_meta or {}) if text is not None else None,
            flush_rows=max(1, len(ids)),
        )
        writer.add(
            ids, audio=audio, audio_mask=audio_mask, text=text, text_mask=text_mask
        )
        writer.close()
        finalize_store(directory, run_id, extra_meta=extra_meta, overwrite=overwrite)
        return FeatureStore.open(directory)


def __getattr__(name: str) -> Any:
    """``RetrievalFeatureExtractor`` lives in `tta.retrieval.features_extract` (imported on demand)."""
    if name == "RetrievalFeatureExtractor":
        from tta.retrieval.features_extract import RetrievalFeatureExtractor

        return RetrievalFeatureExtractor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
