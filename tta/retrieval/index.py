"""FAISS indexes of L2-normalised embeddings (inner product = cosine), with ids and metadata.

Layout of a saved index directory::

    index_000.faiss [index_001.faiss ...]   one file per shard (contiguous chunks of the store)
    ids.json                                 the id of every stored vector, in order
    meta.json                                embedding model hash, dim, metric, count, spec, faiss version

`EmbeddingIndex.load` memory-maps the shards read-only where FAISS supports it (so DDP ranks
share one copy) and refuses an index built by another embedding model or of another dimension.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from tta.utils.files import atomic_path

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivf", "ivfsq8", "ivfpq", "hnsw")


class IndexMismatchError(ValueError):
    """The index was built with another embedding model or dimension than expected."""


@dataclass(frozen=True)
class IndexSpec:
    """How to index: FAISS type and its parameters (inner-product metric throughout).

    ``nlist`` <= 0 picks ``4 * sqrt(N)`` lists; ``rerank`` keeps the exact vectors and re-scores
    the ``rerank_factor * k`` best candidates of a compressed index exactly.
    """

    type: str = "flat"
    nlist: int = 0
    nprobe: int = 8
    pq_m: int = 64
    pq_bits: int = 8
    hnsw_m: int = 32
    ef_search: int = 128
    rerank: bool = False
    rerank_factor: int = 4

    def __post_init__(self) -> None:
        if self.type not in INDEX_TYPES:
            raise ValueError(f"unknown index type {self.type!r}; choose one of {', '.join(INDEX_TYPES)}")

    def factory_string(self, n: int, dim: int) -> str:
        nlist = self.nlist if self.nlist > 0 else max(1, min(int(4 * np.sqrt(n)), n // 39 or 1))
        body = {
            "flat": "Flat",
            "ivf": f"IVF{nlist},Flat",
            "ivfsq8": f"IVF{nlist},SQ8",
            "ivfpq": f"IVF{nlist},PQ{self.pq_m}x{self.pq_bits}",
            "hnsw": f"HNSW{self.hnsw_m},Flat",
        }[self.type]
        if self.type == "ivfpq" and dim % self.pq_m:
            raise ValueError(f"IVF-PQ needs dim ({dim}) divisible by pq_m ({self.pq_m})")
        return body + (",RFlat" if self.rerank and self.type in ("ivfsq8", "ivfpq") else "")


def _check_vectors(vectors: np.ndarray, what: str) -> np.ndarray:
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim != 2 or not np.isfinite(v).all():
        raise ValueError(f"{what} must be a finite (N, D) array, got shape {v.shape}")
    return v


def _build_one(vectors: np.ndarray, spec: IndexSpec, seed: int = 0) -> faiss.Index:
    index = faiss.index_factory(vectors.shape[1], spec.factory_string(len(vectors), vectors.shape[1]),
                                faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        sample = vectors
        limit = 256 * ivf.nlist
        if len(vectors) > limit:  # train on a deterministic sample of a large store
            sample = vectors[np.random.default_rng(seed).choice(len(vectors), limit, replace=False)]
        index.train(sample)
    index.add(vectors)
    _set_search_params(index, spec)
    return index


def _set_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    if spec.type in ("ivf", "ivfsq8", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = spec.nprobe
        if spec.rerank and spec.type != "ivf":
            faiss.downcast_index(index).k_factor = spec.rerank_factor
    elif spec.type == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = spec.ef_search


class EmbeddingIndex:
    """Shards of a FAISS index + the id of every stored vector + metadata."""

    def __init__(self, shards: list[faiss.Index], ids: list[str], spec: IndexSpec, meta: dict[str, Any]) -> None:
        if sum(s.ntotal for s in shards) != len(ids):
            raise ValueError(f"index holds {sum(s.ntotal for s in shards)} vectors but {len(ids)} ids")
        self.shards, self.ids, self.spec, self.meta = shards, ids, spec, meta
        self.offsets = np.cumsum([0] + [s.ntotal for s in shards[:-1]])

    @property
    def dim(self) -> int:
        return int(self.shards[0].d)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int, exclude: list[set[str]] | None = None,
               ) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` ids and scores per query, leaving out ``exclude[q]`` and refilling to ``k``."""
        q = _check_vectors(queries, "queries")
        if q.shape[1] != self.dim:
            raise IndexMismatchError(f"queries have dim {q.shape[1]} but the index holds dim {self.dim}")
        if exclude is not None and len(exclude) != len(q):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(q)} queries")
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        want = min(k + extra, len(self.ids))
        scores, rows = [], []
        for shard, offset in zip(self.shards, self.offsets):
            s, i = shard.search(q, min(want, shard.ntotal))
            scores.append(s)
            rows.append(np.where(i >= 0, i + offset, -1))
        all_s, all_i = np.concatenate(scores, axis=1), np.concatenate(rows, axis=1)
        order = np.argsort(-all_s, axis=1, kind="stable")
        out_ids, out_scores = [], np.full((len(q), k), -np.inf, dtype=np.float32)
        for r in range(len(q)):
            skip = exclude[r] if exclude else set()
            picked: list[str] = []
            for c in order[r]:
                row = int(all_i[r, c])
                if row < 0 or self.ids[row] in skip:
                    continue
                out_scores[r, len(picked)] = all_s[r, c]
                picked.append(self.ids[row])
                if len(picked) == k:
                    break
            out_ids.append(picked)
        return out_ids, out_scores

    def save(self, directory: str | os.PathLike) -> Path:
        """Write shards, ids and metadata (each file atomically)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for n, shard in enumerate(self.shards):
            with atomic_path(d / f"index_{n:03d}.faiss") as tmp:
                faiss.write_index(shard, str(tmp))
        with atomic_path(d / "ids.json") as tmp:
            tmp.write_text(json.dumps(self.ids, ensure_ascii=False))
        meta = {**self.meta, "count": len(self.ids), "dim": self.dim, "metric": "inner_product",
                "shards": len(self.shards), "spec": dataclasses.asdict(self.spec), "faiss": faiss.__version__}
        with atomic_path(d / "meta.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, expect_model_hash: str | None = None,
             expect_dim: int | None = None, mmap: bool = True) -> EmbeddingIndex:
        """Load a saved index; raise `IndexMismatchError` on another model hash or dimension."""
        d = Path(directory)
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no index in {d} (missing meta.json)")
        meta = json.loads(meta_path.read_text())
        if expect_model_hash is not None and meta.get("embedding_model") != expect_model_hash:
            raise IndexMismatchError(
                f"index {d} was built with embedding model {meta.get('embedding_model')!r}, "
                f"not the expected {expect_model_hash!r}; rebuild it with `tta index build`"
            )
        if expect_dim is not None and int(meta["dim"]) != expect_dim:
            raise IndexMismatchError(f"index {d} holds dim {meta['dim']} embeddings, expected {expect_dim}")
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        shards = []
        for n in range(int(meta["shards"])):
            path = str(d / f"index_{n:03d}.faiss")
            try:
                shards.append(faiss.read_index(path, flags))
            except RuntimeError as exc:  # index types FAISS cannot memory-map
                log.info("memory-mapping %s is not supported (%s); reading it into memory", path, exc)
                shards.append(faiss.read_index(path))
        spec = IndexSpec(**meta["spec"])
        for shard in shards:
            _set_search_params(shard, spec)
        keep = {k: v for k, v in meta.items() if k not in ("count", "metric", "shards", "spec", "faiss")}
        return cls(shards, json.loads((d / "ids.json").read_text()), spec, keep)


def build_index(vectors: np.ndarray, ids: list[str], spec: IndexSpec | None = None,
                meta: dict[str, Any] | None = None, shards: int = 1) -> EmbeddingIndex:
    """Index ``vectors`` (N, D) with ``ids``, split into ``shards`` contiguous chunks."""
    v = _check_vectors(vectors, "vectors")
    if len(ids) != len(v) or len(set(ids)) != len(ids):
        raise ValueError(f"need {len(v)} unique ids, got {len(ids)} ({len(set(ids))} unique)")
    if shards < 1 or shards > len(v):
        raise ValueError(f"shards must be in [1, {len(v)}], got {shards}")
    spec = spec or IndexSpec()
    if faiss.get_num_gpus() > 0:  # pragma: no cover - no GPU in CI
        log.info("faiss-gpu found: building on GPU is not wired yet; building on CPU")
    bounds = np.linspace(0, len(v), shards + 1).astype(int)
    parts = [_build_one(v[a:b], spec) for a, b in zip(bounds[:-1], bounds[1:])]
    return EmbeddingIndex(parts, list(ids), spec, dict(meta or {}))
