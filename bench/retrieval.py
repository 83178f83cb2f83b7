"""Retrieval index benchmark: recall@10, queries/s, build time and bytes of FAISS index types vs flat.

Data (the issue's protocol): ``--n`` unit vectors of dim ``--d`` drawn from a mixture of
``--clusters`` Gaussian clusters (centres N(0, 1) per dimension, noise ``--noise`` = 0.35 per
dimension, then L2-normalised), and ``--queries`` fresh queries from the same mixture. Ground
truth is exact (flat) search. Every index is built, saved and searched through
`tta.retrieval.index` (the code `tta index build` runs), with ``--threads`` FAISS threads:

- flat (exact), IVF-Flat, IVF-SQ8, IVF-PQ without and with exact re-ranking, HNSW-Flat, and the
  default of `IndexSpec` (IVF-RaBitQ, 7 bits per dimension); every nprobe / efSearch is the one
  tta calibrates at build time (smallest reaching recall@10 >= 0.95 on store samples);
- ``--reference`` adds the issue's reference point, IVF-Flat with 4 x sqrt(N) lists, nprobe 8;
- uniformly random unit vectors (``--random-n``; no structure, every ANN index degrades on them)
  are run for the default only, as the worst case.

recall@10 = |returned top-10 ∩ exact top-10| / 10, averaged over queries; QPS = best of three
passes over all queries in one batch; bytes = the saved index files (+ ``vectors.npy`` when
re-ranking); build time includes training, adding and tta's nprobe calibration. Ratios are to
the flat index measured in the same run. Goal: recall@10 >= 0.95, QPS >= 40x flat, bytes <= 1/4
of flat. Run: ``python bench/retrieval.py`` (1,000,000 x 512; ``--n 100000`` for a quick run).
Nothing is asserted; results are printed (and written as JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from tta.retrieval.index import EmbeddingIndex, IndexSpec, auto_nlist, build_index

GOAL_RECALL, GOAL_QPS, GOAL_BYTES = 0.95, 40.0, 0.25


def mixture(n: int, d: int, centres: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` L2-normalised draws around random ``centres`` (float32, generated in chunks)."""
    out = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        x = centres[rng.integers(0, len(centres), hi - lo)] + noise * rng.standard_normal((hi - lo, d), dtype=np.float32)
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def random_unit(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """Uniformly random unit vectors (the worst case)."""
    return mixture(n, d, np.zeros((1, d), dtype=np.float32), 1.0, rng)


def best_qps(index: EmbeddingIndex, q: np.ndarray, k: int, repeats: int = 3, **kw: Any) -> tuple[float, list[list[str]]]:
    """Best queries/s over ``repeats`` passes (after a warm-up) and the last results."""
    index.search(q[: min(len(q), 64)], k, **kw)
    best, found = 0.0, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        found, _ = index.search(q, k, **kw)
        best = max(best, len(q) / (time.perf_counter() - t0))
    return best, found


def recall(found: list[list[str]], truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k]) & {str(t) for t in row[:k]}) / k for f, row in zip(found, truth)]))


def saved_bytes(index: EmbeddingIndex, workdir: Path, with_vectors: bool = True) -> int:
    """Bytes of the index files (and of the re-ranking vectors) as `EmbeddingIndex.save` writes them."""
    folder = workdir / "index"
    index.save(folder)
    files = list(folder.glob("index*.faiss")) + ([folder / "vectors.npy"] if with_vectors and index.vectors is not None else [])
    size = sum(p.stat().st_size for p in files)
    shutil.rmtree(folder)
    return size


def describe(index: EmbeddingIndex) -> str:
    s = index.spec
    parts = {"ivf": f"nlist {s.nlist}", "ivfsq": f"nlist {s.nlist}, SQ{s.nbits}", "ivfpq": f"nlist {s.nlist}, PQ{s.m}x{s.nbits}",
             "ivfrabitq": f"nlist {s.nlist}, RaBitQ {s.nbits} bit", "hnsw": f"M {s.hnsw_m}"}.get(s.type, "exact")
    if s.knob:
        parts += f", {s.knob} {getattr(s, s.knob)}"
    return parts


def run_rows(x: np.ndarray, q: np.ndarray, truth: np.ndarray, rows: list[tuple[str, IndexSpec]], k: int,
             workdir: Path) -> list[dict[str, Any]]:
    """Build, measure and drop each index in turn (flat first: the others are ratios to it)."""
    ids = [str(i) for i in range(len(x))]
    results: list[dict[str, Any]] = []
    for name, spec in rows:
        t0 = time.perf_counter()
        index = build_index(x, ids, spec, meta={"embedding_model": "bench"})
        build = time.perf_counter() - t0
        variants = [(name, None)] if not spec.rerank else [(name.replace("+rerank", ""), False), (name, True)]
        for label, rerank in variants:
            qps, found = best_qps(index, q, k, rerank=rerank)
            results.append({"index": label, "params": describe(index) + (f", rerank x{spec.rerank_factor}" if rerank else ""),
                            "recall@10": recall(found, truth, k), "qps": qps, "build_s": build,
                            "bytes": saved_bytes(index, workdir, with_vectors=rerank is not False)})
            print(f"  {label:<16} recall@10 {results[-1]['recall@10']:.4f}  {qps:9.1f} q/s  build {build:7.1f} s  "
                  f"{results[-1]['bytes'] / 2**20:9.1f} MiB  ({results[-1]['params']})", flush=True)
        del index
        gc.collect()
    return results


def print_table(title: str, results: list[dict[str, Any]]) -> None:
    flat = results[0]
    print(f"\n{title}")
    head = f"{'index':<16} {'params':<40} {'recall@10':>9} {'q/s':>9} {'x flat':>7} {'build s':>8} {'x flat':>7} {'MiB':>9} {'x flat':>7}  goal"
    print(head)
    print("-" * len(head))
    for r in results:
        r["qps_ratio"], r["build_ratio"], r["bytes_ratio"] = r["qps"] / flat["qps"], r["build_s"] / flat["build_s"], r["bytes"] / flat["bytes"]
        r["goal"] = r["recall@10"] >= GOAL_RECALL and r["qps_ratio"] >= GOAL_QPS and r["bytes_ratio"] <= GOAL_BYTES
        print(f"{r['index']:<16} {r['params']:<40} {r['recall@10']:>9.4f} {r['qps']:>9.1f} {r['qps_ratio']:>7.1f} "
              f"{r['build_s']:>8.1f} {r['build_ratio']:>7.1f} {r['bytes'] / 2**20:>9.1f} {r['bytes_ratio']:>7.3f}  "
              f"{'yes' if r['goal'] else '-'}")


def exact_truth(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return faiss.knn(q, x, k, faiss.METRIC_INNER_PRODUCT)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="stored vectors")
    parser.add_argument("--d", type=int, default=512, help="dimension")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.35, help="per-dimension noise around unit-variance centres")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--types", default="flat,ivf,ivfsq8,ivfpq+rerank,hnsw,default",
                        help="rows: flat, ivf, ivfsq8, ivfpq+rerank (two rows), hnsw, default")
    parser.add_argument("--reference", action="store_true", help="add IVF-Flat with 4 sqrt(N) lists, nprobe 8")
    parser.add_argument("--random-n", type=int, default=100_000, help="size of the random worst case (0: skip)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder for saved indexes (default: temp)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log tta's build/calibration steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    faiss.omp_set_num_threads(args.threads)
    presets = {"flat": IndexSpec(type="flat"), "ivf": IndexSpec(type="ivf"), "ivfsq8": IndexSpec(type="ivfsq8"),
               "ivfpq+rerank": IndexSpec(type="ivfpq", m=args.d // 4, rerank=True, rerank_factor=20), "hnsw": IndexSpec(type="hnsw"), "default": IndexSpec()}
    names = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in names if t not in presets]
    if unknown:
        parser.error(f"unknown --types {unknown}; choose from {', '.join(presets)}")
    rows = [("flat", presets["flat"])] + [(t, presets[t]) for t in names if t != "flat"]
    if args.reference:
        rows.insert(1, ("ivf-reference", IndexSpec(type="ivf", nlist=4 * auto_nlist(args.n), nprobe=8,
                                                   train_size=min(args.n, 32 * 4 * auto_nlist(args.n)))))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tta-bench-retrieval-"))
    started = time.perf_counter()
    print(f"faiss {faiss.__version__}, {args.threads} threads; N={args.n:,} D={args.d} clusters={args.clusters} "
          f"noise={args.noise} queries={args.queries}", flush=True)
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.d), dtype=np.float32)
    x = mixture(args.n, args.d, centres, args.noise, rng)
    q = mixture(args.queries, args.d, centres, args.noise, np.random.default_rng(args.seed + 1))
    truth = exact_truth(x, q, args.k)
    print(f"data + ground truth: {time.perf_counter() - started:.0f} s", flush=True)
    report: dict[str, Any] = {"config": vars(args) | {"json": str(args.json), "workdir": str(workdir)}}
    report["clustered"] = run_rows(x, q, truth, rows, args.k, workdir)
    print_table(f"clustered unit vectors, N={args.n:,}, D={args.d} (ratios to flat)", report["clustered"])
    del x
    gc.collect()
    if args.random_n:
        xr = random_unit(args.random_n, args.d, np.random.default_rng(args.seed + 2))
        qr = random_unit(args.queries, args.d, np.random.default_rng(args.seed + 3))
        worst = run_rows(xr, qr, exact_truth(xr, qr, args.k), [("flat", presets["flat"]), ("default", presets["default"])],
                         args.k, workdir)
        report["random"] = worst
        print_table(f"worst case: uniformly random unit vectors, N={args.random_n:,}, D={args.d}", worst)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
