"""``tta index build|search``: a FAISS index of a manifest's CLAP embeddings, and queries."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def build(args: argparse.Namespace) -> int:
    """Embed the manifest, write the index, the id map, metadata and the neighbour table."""
    from tta.encoders.clap_towers import load_clap_network
    from tta.retrieval.embed import embed_manifest, file_hash
    from tta.retrieval.index import IndexSpec, build_index
    from tta.retrieval.neighbours import build_neighbour_table, save_neighbour_table

    clap = load_clap_network(args.clap)
    store = embed_manifest(clap, args.manifest, splits=args.splits, clip_seconds=args.clip_seconds)
    knobs = {name: getattr(args, name) for name in ("nbits", "nlist", "nprobe") if getattr(args, name) is not None}
    spec = IndexSpec(**({"type": args.type} if args.type else {}), **knobs)
    meta = {
        "embedding_model": file_hash(args.clap),
        "embedding_checkpoint": str(Path(args.clap).resolve()),
        "dim": int(store.audio.shape[1]),
        "manifest": str(Path(args.manifest).resolve()),
        "modality": "audio",
    }
    index = build_index(store.audio, store.ids, spec, meta=meta, shards=args.shards)
    out = Path(args.out)
    index.save(out)
    (out / "captions.json").write_text(json.dumps(dict(zip(store.ids, store.captions)), ensure_ascii=False))
    np.save(out / "text_embeddings.npy", store.text)
    k = min(args.neighbours, len(store.ids) - 1)
    save_neighbour_table(build_neighbour_table(index, store.text, store.ids, k=k), out)
    log.info("indexed %d clips (%d skipped) into %s", len(store.ids), len(store.skipped), out)
    return 0


def search(args: argparse.Namespace) -> int:
    """Print the top-k clips for a text query."""
    from rich.console import Console
    from rich.table import Table

    from tta.encoders.clap_towers import load_clap_network
    from tta.retrieval.embed import file_hash
    from tta.retrieval.index import EmbeddingIndex

    meta = json.loads((Path(args.index) / "meta.json").read_text())
    ckpt = Path(args.clap or meta.get("meta", meta).get("embedding_checkpoint", ""))
    if not ckpt.is_file():
        raise FileNotFoundError(f"CLAP checkpoint {ckpt} not found; pass --clap")
    index = EmbeddingIndex.load(args.index, expect_model_hash=file_hash(ckpt))
    clap = load_clap_network(ckpt)
    with torch.no_grad():
        query = clap.embed_text([args.query]).float().numpy()
    ids, scores = index.search(np.ascontiguousarray(query, dtype=np.float32), k=args.k)
    captions = json.loads((Path(args.index) / "captions.json").read_text())
    table = Table(title=f"top {args.k} for {args.query!r}")
    for col in ("rank", "id", "score", "caption"):
        table.add_column(col)
    for rank, (i, s) in enumerate(zip(ids[0], scores[0]), start=1):
        table.add_row(str(rank), i, f"{float(s):.4f}", captions.get(i, ""))
    Console().print(table)
    return 0


def main(argv: list[str]) -> int:
    """``tta index build ...`` / ``tta index search DIR "query" -k 10``."""
    parser = argparse.ArgumentParser(prog="tta index")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="embed a manifest with a CLAP checkpoint and index it")
    b.add_argument("--manifest", required=True, type=Path)
    b.add_argument("--clap", required=True, type=Path, help="checkpoint of a `clap_trainer` run")
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("--type", choices=("flat", "ivf", "ivfsq", "ivfsq8", "ivfsq6", "ivfsq4", "ivfpq", "ivfrabitq", "hnsw"),
                   default=None,
                   help="index type (default: the benchmarked default of IndexSpec)")
    b.add_argument("--nbits", type=int, default=None,
                   help="bits a dimension (ivfsq: 4/6/8, ivfrabitq: 1-9) or per PQ sub-quantizer (ivfpq)")
    b.add_argument("--nlist", type=int, default=None, help="IVF lists (default: ~2 sqrt(N), a power of two)")
    b.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (default: calibrated at build)")
    b.add_argument("--shards", type=int, default=1)
    b.add_argument("--splits", nargs="*", default=None, help="manifest splits to index (default: all)")
    b.add_argument("--clip-seconds", type=float, default=None, help="embed only the first N seconds")
    b.add_argument("--neighbours", type=int, default=50, help="neighbours per clip in the table")
    s = sub.add_parser("search", help="query an index with text")
    s.add_argument("index", type=Path)
    s.add_argument("query")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--clap", type=Path, default=None, help="CLAP checkpoint (default: the one recorded)")
    args = parser.parse_args(argv)
    return build(args) if args.command == "build" else search(args)
