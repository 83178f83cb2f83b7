"""Writing feature stores (`tta.retrieval.features`): per-rank part files and the final merge.

Every rank appends batches (in any order) with a `FeatureStoreWriter`, which flushes part files
``rank<R>-<P>.npz`` into ``.<name>.parts-<run id>/`` beside the store. `finalize_store` merges
the parts of one run: rows sorted by id, an id written more than once kept once after checking
that its copies agree, the store written into a temporary directory (``meta.json`` last) and
renamed into place. One pass reads only ids, the second scatters one part at a time into
memory-mapped outputs, so a store larger than memory can be merged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tta import __version__
from tta.utils.files import atomic_path

log = logging.getLogger(__name__)

FORMAT = "tta-features/1"
MODALITIES = ("audio", "text")
META_FILE, IDS_FILE = "meta.json", "ids.json"
SIZE_KEY = {"audio": "tokens", "text": "length"}
_FP16_MAX = float(np.finfo(np.float16).max)
_DUP_RTOL, _DUP_ATOL = (
    1e-2,
    1e-3,
)  # duplicated rows (DDP padding, nondeterministic kernels) must agree


class FeatureStoreMismatchError(ValueError):
    """A store was built with other encoders / sizes than the caller expects."""


def new_run_id() -> str:
    """A fresh id naming one extraction run's part files."""
    return uuid.uuid4().hex[:12]


def parts_dir(out_dir: str | os.PathLike, run_id: str) -> Path:
    """Where the ranks of run ``run_id`` write their part files for the store ``out_dir``."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.parts-{run_id}"


def check_writable(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Raise unless ``out_dir`` is absent, or is a feature store (or empty) and ``overwrite`` is set."""
    out = Path(out_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"feature store path {out} exists and is not a directory")
    if not overwrite:
        raise FileExistsError(
            f"feature store {out} already exists; remove it or set overwrite=True"
        )
    if any(out.iterdir()) and read_meta(out, required=False) is None:
        raise FileExistsError(
            f"{out} is not empty and holds no feature store (no {META_FILE}); refusing to overwrite it"
        )


def read_meta(directory: Path, required: bool = True) -> dict[str, Any] | None:
    path = directory / META_FILE
    if not path.is_file():
        if required:
            raise FileNotFoundError(
                f"feature store {directory}: {META_FILE} not found (not a store, or unfinished)"
            )
        return None
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        if required:
            raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
        return None
    return meta


def _to_numpy(x: torch.Tensor | np.ndarray, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = (
            x.detach()
            .to("cpu", torch.float32 if dtype != np.bool_ else torch.bool)
            .numpy()
        )
    return np.asarray(x, dtype=dtype)


class FeatureStoreWriter:
    """Appends feature batches of one rank as part files; `finalize_store` merges all ranks.

    Args:
        out_dir: the final store directory.
        run_id: id shared by every rank of the run (`new_run_id`, broadcast from rank 0).
        rank: this process's rank (names its part files).
        audio_meta / text_meta: what produced each modality (encoder identity, sizes, ...); a
            modality is written iff its meta is given. Must be equal across ranks.
        flush_rows: rows buffered in memory before a part file is written.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        run_id: str,
        rank: int = 0,
        audio_meta: Mapping[str, Any] | None = None,
        text_meta: Mapping[str, Any] | None = None,
        flush_rows: int = 1024,
    ) -> None:
        if audio_meta is None and text_meta is None:
            raise ValueError("FeatureStoreWriter needs audio_meta, text_meta or both")
        self.out_dir, self.run_id, self.rank = Path(out_dir), run_id, int(rank)
        self.dir = parts_dir(out_dir, run_id)
        self.meta = {
            m: dict(v)
            for m, v in (("audio", audio_meta), ("text", text_meta))
            if v is not None
        }
        self.flush_rows = max(1, int(flush_rows))
        self.shapes: dict[str, tuple[int, int]] = {}
        self._buffer: dict[str, list[Any]] = {}
        self._buffered = 0
        self.parts: list[Path] = []
        self.rows_written = 0
        self._closed = False

    def add(
        self,
        ids: Sequence[str],
        audio: torch.Tensor | np.ndarray | None = None,
        audio_mask: torch.Tensor | np.ndarray | None = None,
        text: torch.Tensor | np.ndarray | None = None,
        text_mask: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Buffer one batch: features ``(B, L, D)`` and masks ``(B, L)`` (None: all positions real).

        Features are stored as float16 with zeros where the mask is False; non-finite values, or
        values beyond float16's range, raise naming the clips.
        """
        if self._closed:
            raise RuntimeError("FeatureStoreWriter.add after close()")
        ids = [str(i) for i in ids]
        given = {"audio": (audio, audio_mask), "text": (text, text_mask)}
        rows: dict[str, Any] = {"ids": np.asarray(ids, dtype=str)}
        for modality, (feats, mask) in given.items():
            if modality not in self.meta:
                if feats is not None:
                    raise ValueError(
                        f"FeatureStoreWriter: got {modality} features but the store has no {modality}"
                    )
                continue
            if feats is None:
                raise ValueError(
                    f"FeatureStoreWriter: {modality} features missing from the batch"
                )
            rows[modality], rows[f"{modality}_mask"] = self._check(
                modality, ids, feats, mask
            )
        for key, value in rows.items():
            self._buffer.setdefault(key, []).append(value)
        self._buffered += len(ids)
        if self._buffered >= self.flush_rows:
            self.flush()

    def _check(
        self, modality: str, ids: list[str], feats: Any, mask: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        x = _to_numpy(feats, np.float32)
        if x.ndim != 3 or x.shape[0] != len(ids):
            raise ValueError(
                f"{modality} features must be (B={len(ids)}, L, D), got {x.shape}"
            )
        expected = self.shapes.setdefault(modality, (x.shape[1], x.shape[2]))
        if x.shape[1:] != expected:
            raise ValueError(
                f"{modality} features of shape {x.shape[1:]} after earlier batches of {expected}"
            )
        m = (
            np.ones(x.shape[:2], dtype=bool)
            if mask is None
            else _to_numpy(mask, np.bool_)
        )
        if m.shape != x.shape[:2]:
            raise ValueError(
                f"{modality} mask {m.shape} does not match features {x.shape}"
            )
        bad = ~np.isfinite(x).all(axis=(1, 2)) | (
            np.abs(np.nan_to_num(x)) > _FP16_MAX
        ).any(axis=(1, 2))
        if bad.any():
            which = [ids[i] for i in np.flatnonzero(bad)[:5]]
            raise ValueError(
                f"{modality} features of {int(bad.sum())} clips are not finite in float16 (first: {which})"
            )
        return np.where(m[..., None], x, 0.0).astype(
            np.float16
        ), m  # padded positions hold zeros

    def flush(self) -> Path | None:
        """Write the buffered rows as one part file (atomically); None when nothing is buffered."""
        if not self._buffered:
            return None
        arrays = {k: np.concatenate(v) for k, v in self._buffer.items()}
        meta = {
            "run_id": self.run_id,
            "rank": self.rank,
            "modalities": self.meta,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
        }
        arrays["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
        path = self.dir / f"rank{self.rank:05d}-{len(self.parts):05d}.npz"
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        self.parts.append(path)
        self.rows_written += self._buffered
        log.debug("rank %d wrote %d rows to %s", self.rank, self._buffered, path)
        self._buffer, self._buffered = {}, 0
        return path

    def close(self) -> list[Path]:
        """Flush the rest; returns this rank's part files."""
        self.flush()
        self._closed = True
        return list(self.parts)


def _part_meta(path: Path, data: Any) -> dict[str, Any]:
    if "meta" not in data.files or "ids" not in data.files:
        raise ValueError(
            f"part file {path} lacks 'meta' or 'ids'; it was not written by FeatureStoreWriter"
        )
    return json.loads(str(data["meta"]))


def finalize_store(
    out_dir: str | os.PathLike,
    run_id: str,
    extra_meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    keep_parts: bool = False,
) -> Path:
    """Merge the part files of run ``run_id`` into the store ``out_dir`` (rows sorted by id).

    An id written more than once (e.g. by two ranks) is kept once after checking that its rows
    agree (float16 tolerance); rows that disagree raise. The store is built in a temporary
    directory and renamed into place; an existing store is replaced only with ``overwrite``.
    """
    out = Path(out_dir)
    src = parts_dir(out, run_id)
    files = sorted(src.glob("rank*.npz")) if src.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no part files in {src}: no batch was written for feature store {out}"
        )
    check_writable(out, overwrite)
    metas, part_ids = [], []
    for f in files:  # pass 1: ids and metadata only
        with np.load(f, allow_pickle=False) as data:
            metas.append(_part_meta(f, data))
            part_ids.append(data["ids"].astype(str))
    first = metas[0]
    for f, m in zip(files[1:], metas[1:]):
        for key in ("run_id", "modalities", "shapes"):
            if m[key] != first[key]:
                raise FeatureStoreMismatchError(
                    f"part files disagree on {key}: {files[0].name} has {first[key]!r}, {f.name} has {m[key]!r}"
                )
    ids = sorted(set().union(*(set(p.tolist()) for p in part_ids)))
    where = {x: i for i, x in enumerate(ids)}
    n = len(ids)
    tmp = out.parent / f".{out.name}.tmp-{run_id}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    arrays = {}
    for modality in first["modalities"]:
        length, dim = first["shapes"][modality]
        arrays[modality] = np.lib.format.open_memmap(
            tmp / f"{modality}.npy", "w+", np.float16, (n, length, dim)
        )
        arrays[f"{modality}_mask"] = np.lib.format.open_memmap(
            tmp / f"{modality}_mask.npy", "w+", np.bool_, (n, length)
        )
    filled = np.zeros(n, dtype=bool)
    duplicates = 0
    for f, pids in zip(
        files, part_ids
    ):  # pass 2: scatter rows, one part in memory at a time
        rows = np.fromiter((where[x] for x in pids), dtype=np.int64, count=len(pids))
        with np.load(f, allow_pickle=False) as data:
            loaded = {k: data[k] for k in arrays}
        _, first_pos = np.unique(rows, return_index=True)
        fresh = np.zeros(len(rows), dtype=bool)
        fresh[first_pos] = True
        fresh &= ~filled[rows]
        for key, arr in arrays.items():
            arr[rows[fresh]] = loaded[key][fresh]
        filled[rows[fresh]] = True
        dup = ~fresh
        if dup.any():  # checked after the fresh rows are in place: the first copy may be in this part
            duplicates += int(dup.sum())
            _check_duplicates(
                f, pids[dup], rows[dup], {k: v[dup] for k, v in loaded.items()}, arrays
            )
    for arr in arrays.values():
        arr.flush()
    del arrays
    ranks = sorted({m["rank"] for m in metas})
    meta = {
        "format": FORMAT,
        "count": n,
        "dtype": "float16",
        "order": "sorted by id",
        **{m: None for m in MODALITIES},
        "created": {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(),
            "tta_version": __version__,
            "run_id": run_id,
            "ranks": ranks,
            "parts": len(files),
            "rows_written": int(sum(len(p) for p in part_ids)),
            "duplicates_dropped": duplicates,
        },
        "extra": dict(extra_meta or {}),
    }
    for modality, info in first["modalities"].items():
        length, dim = first["shapes"][modality]
        meta[modality] = {**info, SIZE_KEY[modality]: length, "dim": dim}
    (tmp / IDS_FILE).write_text(json.dumps(ids, ensure_ascii=False))
    with atomic_path(tmp / META_FILE) as mtmp:
        mtmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    _swap_into_place(tmp, out, run_id)
    if not keep_parts:
        shutil.rmtree(src)
    log.info(
        "feature store %s: %d clips from %d part files of %d ranks (%d duplicates dropped)",
        out,
        n,
        len(files),
        len(ranks),
        duplicates,
    )
    return out


def _check_duplicates(
    path: Path,
    ids: np.ndarray,
    rows: np.ndarray,
    values: dict[str, np.ndarray],
    arrays: dict[str, np.ndarray],
) -> None:
    """Rows of an id written before must agree with the stored one; a conflicting id is an error."""
    for key, arr in arrays.items():
        stored, new = np.asarray(arr[rows]), values[key]
        if key.endswith("_mask"):
            bad = (stored != new).reshape(len(rows), -1).any(axis=1)
        else:
            close = np.isclose(
                stored.astype(np.float32),
                new.astype(np.float32),
                rtol=_DUP_RTOL,
                atol=_DUP_ATOL,
            )
            bad = ~close.reshape(len(rows), -1).all(axis=1)
        if bad.any():
            which = sorted(set(ids[bad].tolist()))[:5]
            raise ValueError(
                f"{path.name}: ids written more than once with different {key} rows (first: {which}); "
                "the manifest may reuse ids for different audio or captions"
            )


def _swap_into_place(tmp: Path, out: Path, run_id: str) -> None:
    old = out.parent / f".{out.name}.old-{run_id}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
