"""Neighbour tables: the top-k datastore neighbours of every training clip, precomputed.

Re-AudioLDM conditions each training clip on the pairs retrieved for its caption; the clip
itself (and any duplicate of it, e.g. the same audio under another id) must not be among them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tta.retrieval.index import EmbeddingIndex
from tta.utils.files import atomic_path

TABLE_FILE = "neighbours.json"


def build_neighbour_table(index: EmbeddingIndex, query_vectors: np.ndarray, query_ids: list[str], k: int = 50,
                          duplicate_groups: dict[str, set[str]] | None = None) -> dict[str, list[tuple[str, float]]]:
    """``{clip id: [(neighbour id, score), ...]}`` with each clip and its duplicates excluded."""
    if len(query_ids) != len(query_vectors):
        raise ValueError(f"{len(query_vectors)} query vectors for {len(query_ids)} ids")
    groups = duplicate_groups or {}
    exclude = [{i} | groups.get(i, set()) for i in query_ids]
    ids, scores = index.search(query_vectors, k, exclude=exclude)
    return {q: [(n, float(s)) for n, s in zip(row, srow)] for q, row, srow in zip(query_ids, ids, scores)}


def save_neighbour_table(table: dict[str, list[tuple[str, float]]], directory: str | os.PathLike) -> Path:
    path = Path(directory) / TABLE_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({q: [[n, s] for n, s in row] for q, row in table.items()}, ensure_ascii=False))
    return path


def load_neighbour_table(directory: str | os.PathLike) -> dict[str, list[tuple[str, float]]]:
    path = Path(directory) / TABLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no neighbour table in {directory} ({TABLE_FILE}); run `tta index build`")
    return {q: [(n, float(s)) for n, s in row] for q, row in json.loads(path.read_text()).items()}
