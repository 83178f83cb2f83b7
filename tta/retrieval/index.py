"""FAISS index over L2-normalised embeddings (Re-AudioLDM retrieval): build, save, load, search.

`build_index` trains and fills one FAISS index, or ``shards`` indexes over contiguous chunks of
the store (searched and merged by score). `EmbeddingIndex.save` writes, each file atomically,
``index.faiss`` (or ``index-000.faiss``, ... per shard), ``ids.json`` (id of every row),
``vectors.npy`` (float32, only with ``rerank``) and last ``meta.json`` (embedding model hash,
dim, metric, count, resolved spec, calibration, faiss version). `EmbeddingIndex.load`
memory-maps the index files read-only (DDP ranks share the page cache instead of rebuilding)
and raises `IndexMismatchError` for another embedding model or dimension. Scores are inner
products (cosines): higher is closer. The default (IVF-SQ8 of the residual, nprobe calibrated
to recall@10 >= 0.95) was chosen with ``bench/retrieval.py``; see ``docs/retrieval.md``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import faiss
import numpy as np

from tta.retrieval.faiss_build import check_single_faiss
from tta.utils.files import atomic_path

__all__ = ["INDEX_TYPES", "EmbeddingIndex", "IndexMismatchError", "IndexSpec", "Retriever", "auto_nlist", "build_index"]

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivf", "ivfsq", "ivfpq", "ivfrabitq", "hnsw")
FORMAT = "tta-index/1"
META_FILE, IDS_FILE, VECTORS_FILE = "meta.json", "ids.json", "vectors.npy"
HASH_KEY = "embedding_model"  # meta key holding the embedding model's hash
CONTENT_KEY = "embedding_content"  # meta key: `tta.retrieval.compat.clap_content_hashes` of the embedding model
_OWN_KEYS = ("format", "spec", "shards", "shard_files", "faiss_version", "calibration", "vectors_file", "build_seconds",
             "search_device")
_SQ_TYPES = {4: "QT_4bit", 6: "QT_6bit", 8: "QT_8bit"}
_DEFAULT_NBITS = {"ivfsq": 8, "ivfpq": 8, "ivfrabitq": 7}
_NORM_TOL = 1e-2  # bf16 CLAP outputs are normalised only to ~1e-3
_CHUNK = 65536


class IndexMismatchError(ValueError):
    """An index was built with another embedding model or dimension than the caller expects."""



@dataclass(frozen=True)
class IndexSpec:
    """How to index: the type and its knobs; ``None`` knobs are resolved at build time.

    type: ``flat`` (exact), ``ivf`` (IVF-Flat), ``ivfsq`` (IVF + scalar quantizer of the residual,
    ``nbits`` 4/6/8; ``ivfsq8`` etc. accepted), ``ivfpq`` (IVF-PQ, ``m`` sub-quantizers of
    ``nbits``), ``ivfrabitq`` (IVF + RaBitQ, ``nbits`` a dimension), ``hnsw`` (HNSW-Flat).
    nlist None: `auto_nlist`. nprobe / ef_search None: calibrated at build time to the smallest
    value whose recall@10 on ``calibration_queries`` store vectors (themselves excluded) reaches
    ``target_recall``. rerank: keep the float32 vectors and re-score ``k * rerank_factor``
    candidates exactly. Scores are always inner products (``metric="ip"``).
    """

    type: str = "ivfsq"
    nlist: int | None = None
    nprobe: int | None = None
    nbits: int | None = None
    m: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int | None = None
    rerank: bool = False
    rerank_factor: int = 10
    train_size: int | None = None
    target_recall: float = 0.95
    calibration_queries: int = 256
    metric: str = "ip"
    seed: int = 0
    use_gpu: bool = True

    def __post_init__(self) -> None:
        kind = self.type.lower().replace("-", "").replace("_", "")
        kind = "ivf" if kind == "ivfflat" else kind
        if kind.startswith("ivfsq") and kind[5:].isdigit():
            kind, bits = "ivfsq", int(kind[5:])
            if self.nbits is not None and self.nbits != bits:
                raise ValueError(f"index type {self.type!r} means nbits={bits}, but nbits={self.nbits} was given")
            object.__setattr__(self, "nbits", bits)
        if kind not in INDEX_TYPES:
            raise ValueError(f"unknown index type {self.type!r}; choose one of {', '.join(INDEX_TYPES)} or ivfsq4/6/8")
        object.__setattr__(self, "type", kind)
        if self.metric != "ip":
            raise ValueError(f"metric {self.metric!r} is not supported: tta ranks unit vectors by inner product ('ip')")
        bits = {"ivfsq": tuple(_SQ_TYPES), "ivfrabitq": tuple(range(1, 10))}.get(kind)
        if bits and self.nbits is not None and self.nbits not in bits:
            raise ValueError(f"{kind} supports nbits {', '.join(map(str, bits))}, not {self.nbits}")
        for name in ("nlist", "nprobe", "nbits", "m", "ef_search", "train_size", "rerank_factor", "hnsw_m"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"IndexSpec.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")

    @property
    def is_ivf(self) -> bool:
        """True for the inverted-file types."""
        return self.type.startswith("ivf")

    @property
    def knob(self) -> str | None:
        """The search-time speed/recall knob of this type (``nprobe``, ``ef_search`` or None)."""
        return "nprobe" if self.is_ivf else "ef_search" if self.type == "hnsw" else None

    def resolved(self, count: int, dim: int) -> IndexSpec:
        """A copy with nlist, nbits, m and train_size filled in for ``count`` vectors of ``dim``."""
        spec = replace(self, nbits=self.nbits or _DEFAULT_NBITS.get(self.type))
        if spec.is_ivf:
            nlist = min(spec.nlist or auto_nlist(count), count)
            spec = replace(spec, nlist=nlist, train_size=min(count, spec.train_size or max(40 * nlist, 10_000)))
        if spec.type == "ivfpq":
            m = spec.m or max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)
            if dim % m:
                raise ValueError(f"ivfpq needs m dividing the dimension: m={m}, dim={dim}")
            if spec.train_size < 2**spec.nbits:
                raise ValueError(f"ivfpq with nbits={spec.nbits} needs >= {2**spec.nbits} vectors to train, got "
                                 f"{spec.train_size}; lower nbits or choose another type")
            spec = replace(spec, m=m)
        return spec


def auto_nlist(count: int) -> int:
    """IVF list count for ``count`` vectors: the power of two nearest 2 sqrt(count), >= 39 vectors a list."""
    nlist = 2 ** round(math.log2(max(1.0, 2 * math.sqrt(count))))
    return int(max(1, min(nlist, count // 39)))


@runtime_checkable
class Retriever(Protocol):
    """Query embeddings -> top-k (ids, scores), excluding given ids per query (DESIGN.md section 3)."""

    def retrieve(self, query_embeddings: Any, k: int,
                 exclude_ids: Sequence[set[str]] | None = None) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` ids and scores ``(Q, k)`` per query, best first (see `EmbeddingIndex.search`)."""
        ...


def _new_faiss_index(spec: IndexSpec, dim: int) -> faiss.Index:
    """An empty, untrained FAISS index for a resolved spec.

    IVF types rank by L2 distance, which orders unit vectors exactly as inner product does, but
    makes residual codes about twice as precise: the coding error enters as ``<q - x, e>``
    (``|q - x|`` ~ 0.5 for near neighbours) instead of ``<q, e>`` (``|q|`` = 1).
    """
    if spec.type == "flat":
        return faiss.IndexFlatIP(dim)
    if spec.type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        return index
    quantizer, l2 = faiss.IndexFlatL2(dim), faiss.METRIC_L2
    if spec.type == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, spec.nlist, l2)
    elif spec.type == "ivfsq":
        qtype = getattr(faiss.ScalarQuantizer, _SQ_TYPES[spec.nbits])
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, spec.nlist, qtype, l2, True)  # codes the residual
    elif spec.type == "ivfpq":
        index = faiss.IndexIVFPQ(quantizer, dim, spec.nlist, spec.m, spec.nbits, l2)
    else:
        if not hasattr(faiss, "IndexIVFRaBitQ"):
            raise RuntimeError(f"faiss {faiss.__version__} has no IndexIVFRaBitQ; install a newer faiss-cpu "
                               "(tested: 1.15) or choose another type (e.g. ivfsq8)")
        index = faiss.IndexIVFRaBitQ(quantizer, dim, spec.nlist, l2, True, spec.nbits)
        index.qb = 8  # 8-bit query quantization: the same recall as float queries, much faster scans
    quantizer.this.disown()  # the IVF index owns (and frees) its coarse quantizer
    index.own_fields = True
    index.cp.seed = spec.seed + 1234
    return index


def _set_knob(index: faiss.Index, spec: IndexSpec, value: int) -> None:
    """Set nprobe (IVF; a GPU IVF index takes it directly) or efSearch (HNSW)."""
    if spec.is_ivf:
        ivf = faiss.try_extract_index_ivf(index)
        (index if ivf is None else ivf).nprobe = value
    elif spec.type == "hnsw":
        index.hnsw.efSearch = value


def _as_matrix(x: Any, name: str) -> np.ndarray:
    """A C-contiguous 2-D float32 array (float32 inputs, memory maps included, are not copied)."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().to("cpu").float().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a (N, D) matrix, got shape {x.shape}")
    return x if x.dtype == np.float32 and x.flags.c_contiguous else np.ascontiguousarray(x, dtype=np.float32)


def _check_store(vectors: np.ndarray, ids: list[str]) -> float:
    """One unique non-empty string id per row; finite, L2-normalised rows. Returns max |norm - 1|."""
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    if not len(vectors):
        raise ValueError("cannot index an empty set of vectors")
    seen: set[str] = set()
    for i, item in enumerate(ids):
        if not isinstance(item, str) or not item:
            raise ValueError(f"id at position {i} must be a non-empty string, got {item!r}")
        if item in seen:
            raise ValueError(f"duplicate id {item!r} at position {i}: ids must be unique (the same audio under "
                             "two ids is fine, one id twice is not)")
        seen.add(item)
    worst = 0.0
    for start in range(0, len(vectors), _CHUNK):
        norms = np.linalg.norm(vectors[start : start + _CHUNK], axis=1)
        bad = np.flatnonzero(~np.isfinite(norms) | (np.abs(norms - 1.0) > _NORM_TOL))
        if bad.size:
            row = start + int(bad[0])
            raise ValueError(f"embeddings must be finite and L2-normalised: row {row} (id {ids[row]!r}) has norm "
                             f"{norms[bad[0]]:.4g}; divide each row by its norm before indexing")
        worst = max(worst, float(np.abs(norms - 1.0).max()))
    return worst


class EmbeddingIndex:
    """A searchable store of L2-normalised embeddings with string ids (one or more FAISS shards)."""

    def __init__(self, shards: list[faiss.Index], ids: list[str], spec: IndexSpec, meta: dict[str, Any],
                 vectors: np.ndarray | None = None) -> None:
        if sum(s.ntotal for s in shards) != len(ids):
            raise ValueError(f"the index holds {sum(s.ntotal for s in shards)} vectors but {len(ids)} ids")
        self.ids, self.spec, self.meta, self.vectors = ids, spec, meta, vectors
        self._shards = shards
        self._offsets = np.cumsum([0] + [s.ntotal for s in shards])[:-1].tolist()
        self._position: dict[str, int] | None = None
        self._search_shards = self._maybe_gpu(shards)

    @property
    def shards(self) -> list[faiss.Index]:
        """The FAISS index of each shard (CPU copies)."""
        return list(self._shards)

    @property
    def search_device(self) -> str:
        """Where searches run: ``"gpu"`` when faiss-gpu took the shards, else ``"cpu"`` (``spec.use_gpu``
        only asks for a GPU; ``meta.json`` records this, the device actually used)."""
        return "cpu" if all(a is b for a, b in zip(self._search_shards, self._shards)) else "gpu"

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.meta["dim"])

    @property
    def model_hash(self) -> str | None:
        """Hash of the embedding model that produced the vectors (``meta["embedding_model"]``)."""
        return self.meta.get(HASH_KEY)

    def __len__(self) -> int:
        return len(self.ids)

    def position(self, item: str) -> int | None:
        """Row of id ``item`` in the store (None when absent)."""
        if self._position is None:
            self._position = {x: i for i, x in enumerate(self.ids)}
        return self._position.get(item)

    # -- search -------------------------------------------------------------------------------
    def search(self, queries: Any, k: int, exclude: Sequence[set[str]] | None = None,
               rerank: bool | None = None) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` ids and scores ``(Q, k)`` (inner products, best first) for each query row.

        ``exclude[i]`` holds ids never returned for query ``i`` (the clip itself, its
        duplicates): the search goes ``k + max(len(exclude[i]))`` deep, so the list is refilled to
        ``k`` after dropping them. A row with fewer than ``k`` eligible hits (a tiny store, an IVF
        probe of few vectors) comes back shorter, its unused scores ``-inf``.
        ``rerank`` overrides the spec's exact re-ranking (which needs the stored vectors).
        """
        q = _as_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise IndexMismatchError(f"queries have dim {q.shape[1]} but the index holds dim {self.dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if exclude is not None and len(exclude) != len(q):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(q)} queries")
        rerank = self.spec.rerank if rerank is None else rerank
        if rerank and self.vectors is None:
            raise ValueError("re-ranking needs the stored vectors: build with IndexSpec(rerank=True)")
        banned = [np.array([p for p in map(self.position, e) if p is not None], dtype=np.int64) for e in exclude] \
            if exclude else None
        depth = min(len(self), k + max((len(b) for b in banned), default=0) if banned else k)
        scores, positions = self.search_positions(q, depth, rerank)  # deep enough to refill after exclusions
        out_ids: list[list[str]] = []
        out_scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        for row in range(len(q)):
            keep = positions[row] >= 0
            if banned is not None and banned[row].size:
                keep &= ~np.isin(positions[row], banned[row])
            chosen = np.flatnonzero(keep)[:k]
            out_ids.append([self.ids[p] for p in positions[row, chosen]])
            out_scores[row, : len(chosen)] = scores[row, chosen]
        return out_ids, out_scores

    def retrieve(self, query_embeddings: Any, k: int,
                 exclude_ids: Sequence[set[str]] | None = None) -> tuple[list[list[str]], np.ndarray]:
        """`Retriever` interface: L2-normalises ``(B, D)`` numpy or torch queries, then `search`."""
        q = _as_matrix(query_embeddings, "query_embeddings")
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return self.search(q, k, exclude=exclude_ids)

    def search_positions(self, q: np.ndarray, depth: int, rerank: bool) -> tuple[np.ndarray, np.ndarray]:
        """Raw search of float32 queries: scores and store rows ``(Q, depth)``, best first (-inf / -1: none)."""
        want = min(len(self), depth * self.spec.rerank_factor if rerank else depth)
        parts_s, parts_p = [], []
        half_norms = 0.5 * (np.einsum("qd,qd->q", q, q)[:, None] + 1.0)
        for shard, offset in zip(self._search_shards, self._offsets):
            scores, pos = shard.search(q, min(want, shard.ntotal))
            if self.spec.is_ivf:  # squared L2 to unit vectors -> inner product
                scores = half_norms - 0.5 * scores
            parts_s.append(np.where(pos >= 0, scores, -np.inf).astype(np.float32))
            parts_p.append(np.where(pos >= 0, pos + offset, -1))
        scores, pos = np.concatenate(parts_s, axis=1), np.concatenate(parts_p, axis=1)
        if rerank:
            scores = self._exact_scores(q, pos)
        if len(parts_p) > 1 or rerank:  # merge shards / re-sort by exact score
            order = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
            scores, pos = np.take_along_axis(scores, order, 1), np.take_along_axis(pos, order, 1)
        return scores[:, :depth], pos[:, :depth]

    def _exact_scores(self, q: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Exact inner products of each query with its candidates, read from the stored vectors."""
        assert self.vectors is not None
        out = np.full(pos.shape, -np.inf, dtype=np.float32)
        for lo in range(0, len(q), 256):
            p = pos[lo : lo + 256]
            cand = np.asarray(self.vectors[np.maximum(p, 0).ravel()]).reshape(*p.shape, self.dim)
            out[lo : lo + 256] = np.where(p >= 0, np.einsum("qcd,qd->qc", cand, q[lo : lo + 256]), -np.inf)
        return out

    def set_knob(self, value: int) -> None:
        """Set the search-time knob (nprobe for IVF, ef_search for HNSW): higher = better recall, slower."""
        if self.spec.knob is None:
            raise ValueError(f"a {self.spec.type} index has no search-time knob")
        self.spec = replace(self.spec, **{self.spec.knob: value})
        for shard in self._shards + self._search_shards:
            _set_knob(shard, self.spec, value)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the index file(s), ids, vectors (with rerank) and ``meta.json`` last, each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        n = len(self._shards)
        files = ["index.faiss"] if n == 1 else [f"index-{i:03d}.faiss" for i in range(n)]
        for name, shard in zip(files, self._shards):
            with atomic_path(directory / name) as tmp:
                faiss.write_index(shard, str(tmp))
        with atomic_path(directory / IDS_FILE) as tmp:
            tmp.write_text(json.dumps(self.ids, ensure_ascii=False))
        if self.vectors is not None:
            with atomic_path(directory / VECTORS_FILE) as tmp, open(tmp, "wb") as fh:
                np.save(fh, np.asarray(self.vectors, dtype=np.float32))
        meta = dict(self.meta, spec=asdict(self.spec), shards=n, search_device=self.search_device,
                    vectors_file=VECTORS_FILE if self.vectors is not None else None,
                    shard_files=[{"file": f, "count": int(s.ntotal)} for f, s in zip(files, self._shards)])
        with atomic_path(directory / META_FILE) as tmp:
            tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False))
        stale = [p for p in directory.glob("index*.faiss") if p.name not in files]
        stale += [directory / VECTORS_FILE] if self.vectors is None and (directory / VECTORS_FILE).exists() else []
        for path in stale:  # left by an earlier build with other shards / rerank settings
            path.unlink()
        log.info("saved %s index of %d vectors to %s", self.spec.type, len(self), directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path, expect_model_hash: str | None = None, expect_dim: int | None = None,
             mmap: bool = True) -> EmbeddingIndex:
        """Open a saved index (memory-mapped read-only by default), checking model hash and dimension."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"no index in {directory} (missing {META_FILE}); build one with `tta index build`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}; rebuild the index")
        rebuild = "rebuild it with `tta index build`"
        if expect_model_hash is not None and meta.get(HASH_KEY) != expect_model_hash:
            raise IndexMismatchError(f"index {directory} was built with embedding model {meta.get(HASH_KEY)!r}, "
                                     f"not the expected {expect_model_hash!r}; {rebuild}")
        if expect_dim is not None and int(meta["dim"]) != int(expect_dim):
            raise IndexMismatchError(f"index {directory} holds dim {meta['dim']} embeddings, expected dim "
                                     f"{expect_dim}; {rebuild}")
        spec = IndexSpec(**meta["spec"])
        ids = json.loads((directory / IDS_FILE).read_text())
        shards = [_read_faiss(directory / s["file"], spec, mmap) for s in meta["shard_files"]]
        for shard, info in zip(shards, meta["shard_files"]):
            if shard.ntotal != info["count"] or shard.d != meta["dim"]:
                raise ValueError(f"{directory / info['file']}: {shard.ntotal} vectors of dim {shard.d}, but meta.json "
                                 f"says {info['count']} of dim {meta['dim']}")
            if spec.knob is not None:
                _set_knob(shard, spec, getattr(spec, spec.knob))
        if len(ids) != meta["count"]:
            raise ValueError(f"{directory / IDS_FILE} holds {len(ids)} ids, but meta.json says {meta['count']}")
        vectors = None
        if meta.get("vectors_file"):
            vectors = np.load(directory / meta["vectors_file"], mmap_mode="r" if mmap else None)
            if vectors.shape != (meta["count"], meta["dim"]):
                raise ValueError(f"{directory / meta['vectors_file']} has shape {vectors.shape}, expected "
                                 f"({meta['count']}, {meta['dim']})")
        return cls(shards, ids, spec, meta, vectors)

    def _maybe_gpu(self, shards: list[faiss.Index]) -> list[faiss.Index]:
        """GPU copies of the shards for searching when faiss-gpu sees a GPU (flat and IVF-Flat/SQ/PQ)."""
        if not self.spec.use_gpu or self.spec.type in ("hnsw", "ivfrabitq"):
            return list(shards)
        check_single_faiss()  # faiss-cpu beside faiss-gpu: the GPU build may be hidden, say so
        if faiss.get_num_gpus() < 1:
            return list(shards)
        try:  # pragma: no cover - needs faiss-gpu and a GPU
            moved = [faiss.index_cpu_to_all_gpus(s) for s in shards]
            log.info("searching the %s index on %d GPU(s)", self.spec.type, faiss.get_num_gpus())
            return moved
        except (RuntimeError, AttributeError) as exc:  # pragma: no cover
            log.warning("faiss-gpu could not take the %s index (%s); searching on CPU", self.spec.type, exc)
            return list(shards)


def _read_faiss(path: Path, spec: IndexSpec, mmap: bool) -> faiss.Index:
    """Read one index file, memory-mapped read-only when asked and this FAISS can (else logged)."""
    if not path.is_file():
        raise FileNotFoundError(f"index file {path} is missing")
    flag = getattr(faiss, "IO_FLAG_MMAP" if spec.is_ivf else "IO_FLAG_MMAP_IFC", None)  # lists / flat codes
    try:
        if mmap and flag is not None:
            return faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as exc:
        log.info("faiss %s cannot memory-map %s (%s)", faiss.__version__, path, str(exc).splitlines()[0])
    if mmap:
        log.info("reading %s into memory", path)
    return faiss.read_index(str(path))


def build_index(vectors: Any, ids: Sequence[str], spec: IndexSpec | None = None, meta: dict[str, Any] | None = None,
                shards: int = 1) -> EmbeddingIndex:
    """Index ``vectors`` (N, D), L2-normalised float32 embeddings named by unique ``ids``.

    ``meta`` should hold ``embedding_model`` (the embedding model's hash, checked by `load`);
    ``dim``, ``count`` and ``metric`` are filled in (given values must agree); other keys are
    stored in ``meta.json`` as they are. ``shards`` > 1 splits the store into contiguous chunks,
    each its own index (IVF shards share one trained coarse quantizer). IVF training uses a
    seeded sample of ``spec.train_size`` vectors; unset nprobe / ef_search are calibrated.
    """
    started = time.perf_counter()
    x, ids = _as_matrix(vectors, "vectors"), list(ids)
    if _check_store(x, ids) > 1e-5:  # e.g. bf16 encoders: renormalise, ranks must not depend on norms
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n, dim = x.shape
    meta = dict(meta or {})
    for key, value in (("dim", dim), ("count", n), ("metric", "inner_product")):
        if meta.get(key, value) != value:
            raise ValueError(f"meta[{key!r}] = {meta[key]!r} disagrees with the data ({value!r})")
        meta[key] = value
    if set(meta) & set(_OWN_KEYS):
        raise ValueError(f"meta keys {sorted(set(meta) & set(_OWN_KEYS))} are reserved for the index itself")
    if not meta.get(HASH_KEY):
        log.warning("meta has no %r: loading cannot check that queries come from the same embedding model", HASH_KEY)
    if not 1 <= shards <= n:
        raise ValueError(f"shards must be in [1, {n}], got {shards}")
    spec = (spec or IndexSpec()).resolved(n, dim)
    template = _new_faiss_index(spec, dim)
    if spec.is_ivf:
        t0 = time.perf_counter()
        rng = np.random.default_rng(spec.seed)
        rows = rng.choice(n, spec.train_size, replace=False) if spec.train_size < n else None
        template.train(x if rows is None else np.ascontiguousarray(x[np.sort(rows)]))
        log.info("trained %s (nlist %d) on %d vectors in %.1fs", spec.type, spec.nlist, spec.train_size,
                 time.perf_counter() - t0)
    bounds = np.linspace(0, n, shards + 1).astype(np.int64)
    built = []
    for lo, hi in itertools.pairwise(bounds):
        index = faiss.clone_index(template) if spec.is_ivf else _new_faiss_index(spec, dim)
        for start in range(lo, hi, _CHUNK):
            index.add(np.ascontiguousarray(x[start : min(hi, start + _CHUNK)]))
        if spec.knob is not None and getattr(spec, spec.knob) is not None:
            _set_knob(index, spec, getattr(spec, spec.knob))
        built.append(index)
    meta.update(format=FORMAT, faiss_version=faiss.__version__)
    result = EmbeddingIndex(built, ids, spec, meta, vectors=x if spec.rerank else None)
    if spec.knob is not None and getattr(spec, spec.knob) is None:
        from tta.retrieval.neighbours import calibrate  # neighbours imports this module

        result.meta["calibration"] = calibrate(result, x)
    result.meta["build_seconds"] = round(time.perf_counter() - started, 3)
    log.info("built %s index of %d x %d in %.1fs (%d shards)", spec.type, n, dim, result.meta["build_seconds"], shards)
    return result
