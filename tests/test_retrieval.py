"""FAISS index: build/search/exclusion, save/load, mismatch errors, shards, neighbour tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tta.retrieval.index import EmbeddingIndex, IndexMismatchError, IndexSpec, build_index
from tta.retrieval.neighbours import build_neighbour_table, load_neighbour_table, save_neighbour_table


def clustered(n: int = 2000, dim: int = 32, centres: int = 20, noise: float = 0.35, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim))
    x = c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


IDS = [f"clip{i:05d}" for i in range(2000)]


def test_flat_search_is_exact_and_excludes_then_refills() -> None:
    x = clustered()
    index = build_index(x, IDS, IndexSpec(type="flat"), meta={"embedding_model": "m1"})
    ids, scores = index.search(x[:5], k=10)
    expect = exact_topk(x, x[:5], 10)
    assert ids == [[IDS[j] for j in row] for row in expect]
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    ids_ex, _ = index.search(x[:5], k=10, exclude=[{IDS[i]} for i in range(5)])
    for i, row in enumerate(ids_ex):
        assert IDS[i] not in row and len(row) == 10
        assert row == [IDS[j] for j in exact_topk(x, x[i : i + 1], 11)[0] if j != i][:10]


def test_save_load_round_trip_and_mismatch_errors(tmp_path: Path) -> None:
    x = clustered()
    index = build_index(x, IDS, IndexSpec(type="ivf", nprobe=4), meta={"embedding_model": "m1"})
    index.save(tmp_path / "idx")
    loaded = EmbeddingIndex.load(tmp_path / "idx", expect_model_hash="m1", expect_dim=32)
    assert loaded.search(x[:3], 5) [0] == index.search(x[:3], 5)[0]
    with pytest.raises(IndexMismatchError, match="embedding model 'm1', not the expected 'm2'"):
        EmbeddingIndex.load(tmp_path / "idx", expect_model_hash="m2")
    with pytest.raises(IndexMismatchError, match="dim 32 embeddings, expected 64"):
        EmbeddingIndex.load(tmp_path / "idx", expect_dim=64)
    with pytest.raises(IndexMismatchError, match="queries have dim 16"):
        loaded.search(np.ones((1, 16), np.float32), 5)
    with pytest.raises(FileNotFoundError, match="missing meta.json"):
        EmbeddingIndex.load(tmp_path / "nothing")


def test_sharded_flat_equals_flat() -> None:
    x = clustered()
    flat = build_index(x, IDS, IndexSpec(type="flat"))
    sharded = build_index(x, IDS, IndexSpec(type="flat"), shards=3)
    assert len(sharded.shards) == 3
    q = clustered(n=20, seed=1)
    assert flat.search(q, 10)[0] == sharded.search(q, 10)[0]


@pytest.mark.parametrize("spec", [IndexSpec(type="ivfpq", pq_m=8, nprobe=16, rerank=True),
                                  IndexSpec(type="ivfsq8", nprobe=16), IndexSpec(type="hnsw")],
                         ids=["ivfpq+rerank", "ivfsq8", "hnsw"])
def test_approximate_indexes_recall(spec: IndexSpec, tmp_path: Path) -> None:
    x = clustered()
    q = clustered(n=50, seed=2)
    index = build_index(x, IDS, spec)
    index.save(tmp_path / "i")
    found = EmbeddingIndex.load(tmp_path / "i").search(q, 10)[0]
    truth = exact_topk(x, q, 10)
    recall = np.mean([len(set(f) & {IDS[j] for j in t}) / 10 for f, t in zip(found, truth)])
    assert recall >= 0.9, recall


def test_bad_inputs() -> None:
    x = clustered(n=100)
    with pytest.raises(ValueError, match="unique ids"):
        build_index(x, IDS[:99] + IDS[:1])
    with pytest.raises(ValueError, match="unknown index type"):
        IndexSpec(type="lsh")
    with pytest.raises(ValueError, match="finite"):
        build_index(np.full((3, 4), np.nan, np.float32), IDS[:3])


def test_neighbour_table_excludes_self_and_duplicates(tmp_path: Path) -> None:
    x = clustered(n=200)
    x[1] = x[0]  # clip1 is a duplicate of clip0
    ids = IDS[:200]
    index = build_index(x, ids, IndexSpec(type="flat"))
    table = build_neighbour_table(index, x[:10], ids[:10], k=5, duplicate_groups={ids[0]: {ids[1]}, ids[1]: {ids[0]}})
    assert all(q not in [n for n, _ in row] and len(row) == 5 for q, row in table.items())
    assert ids[1] not in [n for n, _ in table[ids[0]]] and ids[0] not in [n for n, _ in table[ids[1]]]
    save_neighbour_table(table, tmp_path)
    assert load_neighbour_table(tmp_path) == table
