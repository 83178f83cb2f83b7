"""FAISS retrieval index: build/search/exclusion, save/load, mismatch errors, shards, recall,
calibration, neighbour tables."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tta.retrieval.index import (
    EmbeddingIndex,
    IndexMismatchError,
    IndexSpec,
    Retriever,
    auto_nlist,
    build_index,
)
from tta.retrieval.neighbours import (
    NeighbourTable,
    build_neighbour_table,
    duplicate_closure,
    load_neighbour_table,
    save_neighbour_table,
)

DIM = 32


def clustered(n: int = 3000, dim: int = DIM, centres: int = 30, noise: float = 0.35, seed: int = 0) -> np.ndarray:
    """Unit vectors drawn around Gaussian centres (the benchmark's data, scaled down)."""
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(1234).standard_normal((centres, dim))
    x = c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


def recall_at(found: list[list[str]], truth: np.ndarray, ids: list[str]) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f) & {ids[j] for j in t}) / k for f, t in zip(found, truth)]))


X = clustered()
IDS = [f"clip{i:05d}" for i in range(len(X))]
Q = clustered(n=100, seed=7)  # fresh queries from the same mixture
META = {"embedding_model": "sha-m1", "manifest": "train.jsonl"}


@pytest.fixture(scope="module")
def flat() -> EmbeddingIndex:
    return build_index(X, IDS, IndexSpec(type="flat"), meta=META)


def test_flat_search_is_exact(flat: EmbeddingIndex) -> None:
    ids, scores = flat.search(Q, k=10)
    truth = exact_topk(X, Q, 10)
    assert ids == [[IDS[j] for j in row] for row in truth]
    np.testing.assert_allclose(scores, np.take_along_axis(Q @ X.T, truth, 1), atol=1e-5)
    assert scores.dtype == np.float32 and np.all(np.diff(scores, axis=1) <= 0)


def test_exclusion_removes_ids_and_refills_to_k(flat: EmbeddingIndex) -> None:
    truth = exact_topk(X, X[:5], 30)
    # exclude the clip itself, two of its true neighbours and an id the index does not hold
    exclude = [{IDS[i], IDS[truth[i, 1]], IDS[truth[i, 4]], "not-indexed"} for i in range(5)]
    ids, scores = flat.search(X[:5], k=10, exclude=exclude)
    for i, row in enumerate(ids):
        assert len(row) == 10 and not set(row) & exclude[i]
        assert row == [IDS[j] for j in truth[i] if IDS[j] not in exclude[i]][:10]
    assert np.isfinite(scores).all()


def test_ivf_scores_are_inner_products_for_any_query_norm() -> None:
    """IVF indexes rank by L2 internally; the scores they return are still exact inner products."""
    index = build_index(X, IDS, IndexSpec(type="ivf", nlist=16, nprobe=16), meta=META)  # every list: exact
    q = Q[:5] * np.array([[0.5], [1.0], [2.0], [3.0], [1.0]], dtype=np.float32)
    ids, scores = index.search(q, 10)
    assert ids == [[IDS[j] for j in row] for row in exact_topk(X, q, 10)]
    np.testing.assert_allclose(scores, np.take_along_axis(q @ X.T, exact_topk(X, q, 10), 1), atol=1e-4)


def test_slightly_unnormalised_store_is_renormalised() -> None:
    """bf16 encoders leave norms off by ~1e-3: indexed as unit vectors, ranked like the exact cosine."""
    x = X * np.random.default_rng(3).uniform(0.995, 1.005, (len(X), 1)).astype(np.float32)
    ids, _ = build_index(x, IDS, IndexSpec(type="ivf", nlist=16, nprobe=16), meta=META).search(Q, 10)
    assert ids == [[IDS[j] for j in row] for row in exact_topk(X, Q, 10)]


def test_rows_shorter_than_k_are_padded_with_minus_inf() -> None:
    index = build_index(X, IDS, IndexSpec(type="ivf", nlist=32, nprobe=1), meta=META)
    ids, scores = index.search(Q[:3], k=1000)  # one probed list holds far fewer than 1000 clips
    for row, srow in zip(ids, scores):
        assert 0 < len(row) < 1000 and len(set(row)) == len(row)
        assert np.isfinite(srow[: len(row)]).all() and np.isneginf(srow[len(row) :]).all()


@pytest.mark.parametrize("shards", [3, 7])
def test_sharded_flat_returns_the_flat_top_k(flat: EmbeddingIndex, shards: int) -> None:
    sharded = build_index(X, IDS, IndexSpec(type="flat"), meta=META, shards=shards)
    assert len(sharded.shards) == shards and sum(s.ntotal for s in sharded.shards) == len(X)
    ids, scores = sharded.search(Q, 10)
    ref_ids, ref_scores = flat.search(Q, 10)
    assert ids == ref_ids
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)


def test_sharded_ivf_shares_its_coarse_quantizer() -> None:
    """Shards probe the same lists as the unsharded index, so IVF-Flat results are identical."""
    spec = IndexSpec(type="ivf", nlist=32, nprobe=3)
    ids, _ = build_index(X, IDS, spec, meta=META).search(Q, 10)
    assert build_index(X, IDS, spec, meta=META, shards=4).search(Q, 10)[0] == ids


@pytest.mark.parametrize(
    "spec",
    [IndexSpec(), IndexSpec(type="ivfrabitq"), IndexSpec(type="ivfpq", nbits=6, rerank=True), IndexSpec(type="hnsw")],
    ids=["default-ivfsq8", "ivfrabitq", "ivfpq+rerank", "hnsw"],
)
def test_approximate_recall_at_10_and_mmap_round_trip(spec: IndexSpec, tmp_path: Path) -> None:
    index = build_index(X, IDS, spec, meta=META, shards=2)
    found, scores = index.search(Q, 10)
    assert recall_at(found, exact_topk(X, Q, 10), IDS) >= 0.9
    index.save(tmp_path / "idx")
    for mmap in (True, False):
        loaded = EmbeddingIndex.load(tmp_path / "idx", expect_model_hash="sha-m1", expect_dim=DIM, mmap=mmap)
        assert loaded.spec == index.spec
        again, again_scores = loaded.search(Q, 10)
        assert again == found
        np.testing.assert_allclose(again_scores, scores, atol=1e-6)


def test_rerank_beats_the_compressed_scores() -> None:
    index = build_index(X, IDS, IndexSpec(type="ivfpq", m=4, nbits=6, nprobe=8, rerank=True), meta=META)
    truth = exact_topk(X, Q, 10)
    with_rerank = recall_at(index.search(Q, 10)[0], truth, IDS)
    without = recall_at(index.search(Q, 10, rerank=False)[0], truth, IDS)
    assert with_rerank >= 0.95 and with_rerank > without + 0.2, (with_rerank, without)
    plain = build_index(X, IDS, IndexSpec(type="ivfpq", m=4, nbits=6, nprobe=8), meta=META)
    with pytest.raises(ValueError, match="stored vectors"):
        plain.search(Q, 10, rerank=True)


def test_calibration_picks_the_smallest_nprobe_reaching_the_target() -> None:
    index = build_index(X, IDS, IndexSpec(type="ivf", nlist=64, target_recall=0.95), meta=META)
    cal = index.meta["calibration"]
    history = dict(cal["history"])
    assert cal["knob"] == "nprobe" and index.spec.nprobe == cal["value"] and history[cal["value"]] >= 0.95
    assert all(recall < 0.95 for value, recall in history.items() if value < cal["value"])
    assert cal["value"] < 64  # clustered data: far fewer lists than all of them


def test_calibration_stops_at_a_plateau_of_coarse_codes(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tta.retrieval.neighbours"):
        index = build_index(X, IDS, IndexSpec(type="ivfpq", m=2, nbits=4, nlist=64), meta=META)
    assert "plateaus" in caplog.text and "too coarse" in caplog.text
    assert index.spec.nprobe < 64 and index.meta["calibration"]["recall_at_10"] < 0.95


def test_default_is_ivfsq8_and_build_is_deterministic() -> None:
    assert (IndexSpec().type, IndexSpec().resolved(len(X), DIM).nbits) == ("ivfsq", 8)
    a = build_index(X, IDS, IndexSpec(), meta=META)
    b = build_index(X, IDS, IndexSpec(), meta=META)
    assert a.spec == b.spec and a.spec.nlist == auto_nlist(len(X)) and a.spec.nprobe is not None
    assert a.search(Q, 10)[0] == b.search(Q, 10)[0]


def test_saved_layout_and_metadata(tmp_path: Path) -> None:
    index = build_index(X, IDS, IndexSpec(type="ivfsq8", nprobe=4), meta=META, shards=3)
    index.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ids.json", "index-000.faiss", "index-001.faiss", "index-002.faiss", "meta.json"]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["embedding_model"] == "sha-m1" and meta["manifest"] == "train.jsonl"
    assert (meta["dim"], meta["count"], meta["metric"], meta["shards"]) == (DIM, len(X), "inner_product", 3)
    assert meta["spec"]["type"] == "ivfsq" and meta["spec"]["nbits"] == 8 and meta["spec"]["nprobe"] == 4
    assert meta["faiss_version"] and json.loads((tmp_path / "ids.json").read_text()) == IDS
    # rebuilding into the same folder with one shard removes the stale shard files
    build_index(X, IDS, IndexSpec(type="flat"), meta=META).save(tmp_path)
    assert not list(tmp_path.glob("index-*.faiss")) and (tmp_path / "index.faiss").is_file()
    assert EmbeddingIndex.load(tmp_path).spec.type == "flat"


def test_load_refuses_another_embedding_model_or_dimension(tmp_path: Path) -> None:
    build_index(X, IDS, IndexSpec(type="flat"), meta=META).save(tmp_path / "idx")
    with pytest.raises(IndexMismatchError, match="embedding model 'sha-m1', not the expected 'sha-m2'"):
        EmbeddingIndex.load(tmp_path / "idx", expect_model_hash="sha-m2")
    with pytest.raises(IndexMismatchError, match="holds dim 32 embeddings, expected dim 64"):
        EmbeddingIndex.load(tmp_path / "idx", expect_dim=64)
    loaded = EmbeddingIndex.load(tmp_path / "idx", expect_model_hash="sha-m1", expect_dim=32)
    with pytest.raises(IndexMismatchError, match="queries have dim 16 but the index holds dim 32"):
        loaded.search(np.ones((1, 16), np.float32), 5)
    with pytest.raises(FileNotFoundError, match="missing meta.json"):
        EmbeddingIndex.load(tmp_path / "nothing")
    build_index(X[:50], IDS[:50], IndexSpec(type="flat")).save(tmp_path / "nohash")
    with pytest.raises(IndexMismatchError, match="embedding model None"):
        EmbeddingIndex.load(tmp_path / "nohash", expect_model_hash="sha-m1")


def test_bad_inputs_have_clear_errors(flat: EmbeddingIndex) -> None:
    with pytest.raises(ValueError, match="duplicate id 'clip00000' at position 99"):
        build_index(X[:100], IDS[:99] + IDS[:1], meta=META)
    scaled = X[:10].copy()
    scaled[3] *= 2
    with pytest.raises(ValueError, match=r"row 3 \(id 'clip00003'\) has norm 2"):
        build_index(scaled, IDS[:10], meta=META)
    with pytest.raises(ValueError, match="finite"):
        build_index(np.full((3, 4), np.nan, np.float32), IDS[:3], meta=META)
    with pytest.raises(ValueError, match="unknown index type 'lsh'"):
        IndexSpec(type="lsh")
    with pytest.raises(ValueError, match="ivfsq supports nbits 4, 6, 8, not 5"):
        IndexSpec(type="ivfsq5")
    with pytest.raises(ValueError, match="'ivfsq8' means nbits=8, but nbits=6 was given"):
        IndexSpec(type="ivfsq8", nbits=6)
    with pytest.raises(ValueError, match="m dividing the dimension"):
        build_index(X, IDS, IndexSpec(type="ivfpq", m=5), meta=META)
    with pytest.raises(ValueError, match=r"meta\['dim'\] = 64 disagrees"):
        build_index(X, IDS, IndexSpec(type="flat"), meta={**META, "dim": 64})
    with pytest.raises(ValueError, match="reserved"):
        build_index(X, IDS, IndexSpec(type="flat"), meta={**META, "spec": "x"})
    with pytest.raises(ValueError, match="exclude has 1 entries for 2 queries"):
        flat.search(Q[:2], 5, exclude=[set()])
    assert IndexSpec(type="ivfsq6") == IndexSpec(type="ivfsq", nbits=6)


def test_retriever_interface_takes_torch_and_normalises(flat: EmbeddingIndex) -> None:
    assert isinstance(flat, Retriever)
    ids, scores = flat.retrieve(torch.from_numpy(Q[:4] * 3.0), k=5, exclude_ids=[{"clip00000"}] * 4)
    ref_ids, ref_scores = flat.search(Q[:4], 5, exclude=[{"clip00000"}] * 4)
    assert ids == ref_ids
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_duplicate_closure_is_transitive_and_symmetric() -> None:
    groups = duplicate_closure({"a": {"b"}, "c": {"a"}, "x": {"y"}})
    assert groups["b"] == {"a", "b", "c"} and groups["c"] == {"a", "b", "c"} and groups["y"] == {"x", "y"}


def test_neighbour_table_excludes_self_and_duplicates(tmp_path: Path) -> None:
    x = X[:400].copy()
    x[1] = x[0]  # clip00001 and clip00002 hold the same audio as clip00000
    x[2] = x[0]
    ids = IDS[:400]
    index = build_index(x, ids, IndexSpec(type="flat"), meta=META)
    table = build_neighbour_table(index, x[:20], ids[:20], k=8, duplicate_groups={ids[1]: {ids[0]}, ids[2]: {ids[1]}},
                                  batch_size=7)
    dup = {ids[0], ids[1], ids[2]}
    truth = exact_topk(x, x[:20], 30)
    for i, q in enumerate(ids[:20]):
        banned = dup if q in dup else {q}
        assert [n for n, _ in table[q]] == [ids[j] for j in truth[i] if ids[j] not in banned][:8]
    assert table.k == 8 and len(table) == 20
    table.save(tmp_path)
    loaded = load_neighbour_table(tmp_path, expect_model_hash="sha-m1")
    assert isinstance(loaded, dict) and loaded == dict(table.items())
    assert NeighbourTable.load(tmp_path).meta["embedding_model"] == "sha-m1"
    with pytest.raises(IndexMismatchError, match="not the expected 'sha-m2'"):
        load_neighbour_table(tmp_path, expect_model_hash="sha-m2")
    with pytest.raises(FileNotFoundError, match="no neighbour table"):
        load_neighbour_table(tmp_path / "none")


def test_plain_mapping_tables_save_too(tmp_path: Path) -> None:
    table = {"a": [("b", 0.9), ("c", 0.5)], "b": [("a", 0.9)]}
    save_neighbour_table(table, tmp_path)
    loaded = load_neighbour_table(tmp_path)
    assert loaded["a"] == [("b", pytest.approx(0.9)), ("c", pytest.approx(0.5))]
    assert loaded["b"] == [("a", pytest.approx(0.9))]
