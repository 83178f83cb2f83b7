"""Neighbour tables: the top-k datastore neighbours of every training clip, precomputed.

Re-AudioLDM conditions each training clip on the pairs retrieved for it; the clip itself and
its duplicates (the same audio under another id) must never be among them, or the model learns
to copy its target. `build_neighbour_table` searches an `EmbeddingIndex` with those ids excluded
(the list refilled to ``k``) and returns a `NeighbourTable`, a read-only mapping
``{clip id: [(neighbour id, score), ...]}`` backed by arrays. It is saved next to the index as
``neighbours.npz``: ``query_ids`` (Q,), ``ids`` (the index's ids), ``positions`` (Q, k) int64
into ``ids`` (-1 = no neighbour), ``scores`` (Q, k) float32 and a JSON ``meta`` (k, embedding
model hash, index size). `calibrate` measures the same self-excluded store neighbours to pick an
index's nprobe / ef_search at build time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from tta.retrieval.index import HASH_KEY, EmbeddingIndex, IndexMismatchError
from tta.utils.files import atomic_path

__all__ = ["TABLE_FILE", "NeighbourTable", "build_neighbour_table", "calibrate", "duplicate_closure",
           "load_neighbour_table", "save_neighbour_table"]

log = logging.getLogger(__name__)

TABLE_FILE = "neighbours.npz"
FORMAT = "tta-neighbours/1"


class NeighbourTable(Mapping[str, list[tuple[str, float]]]):
    """Top-k neighbours (id, score), best first, of each query clip; arrays underneath."""

    def __init__(self, query_ids: Sequence[str], ids: Sequence[str], positions: np.ndarray, scores: np.ndarray,
                 meta: dict[str, Any]) -> None:
        if positions.shape != scores.shape or positions.shape[0] != len(query_ids):
            raise ValueError(f"neighbour table shapes disagree: {len(query_ids)} queries, positions "
                             f"{positions.shape}, scores {scores.shape}")
        self.query_ids, self.ids = list(query_ids), list(ids)
        self.positions, self.scores, self.meta = positions, scores, meta
        self._row = {q: i for i, q in enumerate(self.query_ids)}

    @property
    def k(self) -> int:
        """Neighbours kept per clip."""
        return int(self.positions.shape[1])

    def __getitem__(self, query_id: str) -> list[tuple[str, float]]:
        row = self._row[query_id]
        return [(self.ids[p], float(s)) for p, s in zip(self.positions[row], self.scores[row]) if p >= 0]

    def __iter__(self) -> Iterator[str]:
        return iter(self.query_ids)

    def __len__(self) -> int:
        return len(self.query_ids)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``neighbours.npz`` into ``directory`` (atomically)."""
        path = Path(directory) / TABLE_FILE
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, query_ids=np.array(self.query_ids, dtype=str), ids=np.array(self.ids, dtype=str),
                     positions=self.positions.astype(np.int64), scores=self.scores.astype(np.float32),
                     meta=np.array(json.dumps(dict(self.meta, format=FORMAT))))
        log.info("saved neighbour table (%d clips x %d) to %s", len(self), self.k, path)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike, expect_model_hash: str | None = None) -> NeighbourTable:
        """Read ``neighbours.npz`` from ``directory``; check the embedding model hash when given."""
        path = Path(directory) / TABLE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no neighbour table in {directory} ({TABLE_FILE}); run `tta index build`")
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}; rebuild the table")
            if expect_model_hash is not None and meta.get(HASH_KEY) != expect_model_hash:
                raise IndexMismatchError(f"neighbour table {path} was built with embedding model "
                                         f"{meta.get(HASH_KEY)!r}, not the expected {expect_model_hash!r}")
            return cls(data["query_ids"].tolist(), data["ids"].tolist(), data["positions"], data["scores"], meta)


def duplicate_closure(groups: Mapping[str, set[str]] | None) -> dict[str, set[str]]:
    """Every id named in ``groups`` -> all ids of its duplicate group (transitive and symmetric)."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for key, dups in (groups or {}).items():
        for other in dups:
            parent[root(other)] = root(key)
        root(key)
    members: dict[str, set[str]] = {}
    for x in parent:
        members.setdefault(root(x), set()).add(x)
    return {x: members[root(x)] for x in parent}


def calibrate(index: EmbeddingIndex, vectors: np.ndarray) -> dict[str, Any] | None:
    """Set ``index``'s smallest nprobe / ef_search whose recall@10 on store samples reaches the target.

    Store vectors serve as queries with themselves excluded, exactly as in a neighbour table.
    ``vectors`` is the indexed store. Recall saturating below the target (codes too coarse) stops
    the search at the plateau with a warning. Returns the calibration record (kept in meta.json).
    """
    knob, started = index.spec.knob, time.perf_counter()
    if knob is None:
        return None
    n, k, spec = len(index), min(10, len(index) - 1), index.spec
    top = spec.nlist if spec.is_ivf else 1024
    ladder = sorted({min(2**i, top) for i in range(0 if spec.is_ivf else 4, int(math.log2(top)) + 2)})
    if k < 1:
        index.set_knob(ladder[-1])
        return None
    qpos = np.sort(np.random.default_rng(spec.seed + 1).choice(n, min(spec.calibration_queries, n), replace=False))
    queries = np.ascontiguousarray(vectors[qpos])
    _, exact = faiss.knn(queries, vectors, k + 1, faiss.METRIC_INNER_PRODUCT)
    truth = [set([p for p in row if p != own][:k]) for row, own in zip(exact, qpos)]
    history: list[tuple[int, float]] = []
    for value in ladder:
        index.set_knob(value)
        _, found = index.search_positions(queries, k + 1, spec.rerank)
        hits = sum(len(t & set([p for p in row if p != own][:k])) for t, row, own in zip(truth, found, qpos))
        history.append((value, hits / (k * len(qpos))))
        if history[-1][1] >= spec.target_recall:
            break
        if len(history) > 2 and history[-1][1] - history[-2][1] < 1e-3:  # quantization-limited plateau
            history.pop()
            log.warning("recall@%d plateaus at %.3f < target %.2f for %s (nbits %s): the codes are too coarse "
                        "for this data; use more bits, rerank=True or another type", k, history[-1][1],
                        spec.target_recall, spec.type, spec.nbits)
            break
    else:
        log.warning("recall@%d reaches only %.3f < target %.2f", k, history[-1][1], spec.target_recall)
    value, recall = history[-1]
    if knob == "ef_search" and recall >= spec.target_recall:
        value *= 2  # store vectors sit in the graph: easier queries than new ones, so keep a margin
    elif spec.is_ivf and spec.nlist >= 8 and value >= spec.nlist // 2:
        log.warning("nprobe %d of %d lists is needed for recall@%d %.2f: the store has little cluster structure; "
                    "a flat index is likely faster", value, spec.nlist, k, recall)
    index.set_knob(value)
    log.info("calibrated %s=%d: recall@%d %.3f on %d store samples", knob, value, k, recall, len(qpos))
    return {"knob": knob, "value": value, "recall_at_10": round(recall, 4), "queries": len(qpos),
            "history": [[v, round(r, 4)] for v, r in history], "seconds": round(time.perf_counter() - started, 3)}


def build_neighbour_table(index: EmbeddingIndex, query_vectors: Any, query_ids: Sequence[str], k: int = 50,
                          duplicate_groups: Mapping[str, set[str]] | None = None,
                          batch_size: int = 4096) -> NeighbourTable:
    """Top-``k`` neighbours of each query clip, the clip and its duplicates excluded.

    ``duplicate_groups`` maps an id to ids holding the same audio; groups are closed
    transitively and symmetrically (``{a: {b}, c: {a}}`` makes ``a, b, c`` one group).
    Rows with fewer than ``k`` eligible neighbours are padded (-1 positions, ``-inf`` scores).
    """
    query_ids = list(query_ids)
    if len(query_ids) != len(query_vectors):
        raise ValueError(f"{len(query_vectors)} query vectors for {len(query_ids)} query ids")
    if k >= len(index):
        log.warning("k=%d >= the %d indexed clips: some rows will be shorter than k", k, len(index))
    closure = duplicate_closure(duplicate_groups)
    positions = np.full((len(query_ids), k), -1, dtype=np.int64)
    scores = np.full((len(query_ids), k), -np.inf, dtype=np.float32)
    for lo in range(0, len(query_ids), batch_size):
        chunk = query_ids[lo : lo + batch_size]
        exclude = [closure.get(q, set()) | {q} for q in chunk]
        found, found_scores = index.search(query_vectors[lo : lo + batch_size], k, exclude=exclude)
        for row, hits in enumerate(found):
            positions[lo + row, : len(hits)] = [index.position(h) for h in hits]
        scores[lo : lo + len(chunk)] = found_scores
    meta = {"k": k, HASH_KEY: index.model_hash, "index_count": len(index), "duplicate_ids": len(closure)}
    return NeighbourTable(query_ids, index.ids, positions, scores, meta)


def save_neighbour_table(table: NeighbourTable | Mapping[str, list[tuple[str, float]]],
                         directory: str | os.PathLike) -> Path:
    """Save a `NeighbourTable` (or a plain ``{id: [(id, score), ...]}`` mapping) as ``neighbours.npz``."""
    if not isinstance(table, NeighbourTable):
        ids = sorted({n for row in table.values() for n, _ in row})
        where = {x: i for i, x in enumerate(ids)}
        k = max((len(row) for row in table.values()), default=0)
        positions = np.full((len(table), k), -1, dtype=np.int64)
        scores = np.full((len(table), k), -np.inf, dtype=np.float32)
        for r, row in enumerate(table.values()):
            positions[r, : len(row)] = [where[n] for n, _ in row]
            scores[r, : len(row)] = [s for _, s in row]
        table = NeighbourTable(list(table), ids, positions, scores, {"k": k})
    return table.save(directory)


def load_neighbour_table(directory: str | os.PathLike,
                         expect_model_hash: str | None = None) -> dict[str, list[tuple[str, float]]]:
    """``{clip id: [(neighbour id, score), ...]}`` read from ``directory/neighbours.npz``."""
    return dict(NeighbourTable.load(directory, expect_model_hash=expect_model_hash).items())
