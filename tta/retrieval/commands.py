"""``tta index build|search``: a FAISS index of a manifest's CLAP embeddings, and queries."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from tta.utils.errors import check_int

log = logging.getLogger(__name__)


def build(args: argparse.Namespace) -> int:
    """Embed the manifest, write the index, the id map, metadata and the neighbour table."""
    from tta.encoders.clap_towers import load_clap_network
    from tta.retrieval.compat import CONTENT_KEY, clap_content_hashes
    from tta.retrieval.embed import embed_manifest, file_hash
    from tta.retrieval.index import IndexSpec, build_index
    from tta.retrieval.neighbours import build_neighbour_table, save_neighbour_table

    clap = load_clap_network(args.clap)
    store = embed_manifest(clap, args.manifest, splits=args.splits, clip_seconds=args.clip_seconds)
    knobs = {name: getattr(args, name) for name in ("nbits", "nlist", "nprobe") if getattr(args, name) is not None}
    spec = IndexSpec(**({"type": args.type} if args.type else {}), **knobs)
    meta = {
        "embedding_model": file_hash(args.clap),
        CONTENT_KEY: clap_content_hashes(clap),
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
    """Print the top-k clips of each text query (full ids; ``--json``: one JSON document), the CLAP
    loaded once; a CLAP whose towers differ from the index's (`tta.retrieval.compat`) is refused."""
    from tta.encoders.clap_towers import load_clap_network
    from tta.retrieval.compat import CONTENT_KEY, check_embedding_content, clap_content_hashes
    from tta.retrieval.embed import file_hash
    from tta.retrieval.index import META_FILE, EmbeddingIndex

    check_int("-k", args.k)
    meta_path = Path(args.index) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no index in {args.index} (missing {META_FILE}); build one with `tta index build`")
    meta = json.loads(meta_path.read_text())
    ckpt = Path(args.clap or meta.get("embedding_checkpoint", ""))
    if not ckpt.is_file():
        raise FileNotFoundError(f"CLAP checkpoint {ckpt} not found; pass --clap")
    clap = load_clap_network(ckpt)
    if meta.get(CONTENT_KEY):
        check_embedding_content(meta, clap_content_hashes(clap), str(args.index), f"CLAP {ckpt}")
        index = EmbeddingIndex.load(args.index)
    else:  # an index from before content hashes: the checkpoint file's hash
        index = EmbeddingIndex.load(args.index, expect_model_hash=file_hash(ckpt))
    with torch.no_grad():
        query = clap.embed_text(list(args.query)).float().numpy()
    ids, scores = index.search(np.ascontiguousarray(query, dtype=np.float32), k=args.k)
    captions = json.loads((Path(args.index) / "captions.json").read_text())
    results = [{"query": q, "results": [{"rank": r, "id": i, "score": round(float(sc), 6), "caption": captions.get(i, "")}
                                        for r, (i, sc) in enumerate(zip(row_ids, row_scores), start=1)]}
               for q, row_ids, row_scores in zip(args.query, ids, scores)]
    if args.json:
        sys.stdout.write(json.dumps(results, ensure_ascii=False, indent=2) + "\n")
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for res in results:
        table = Table(title=f"top {args.k} for {res['query']!r}")
        table.add_column("rank")
        table.add_column("id", overflow="fold")  # ids are never cut: wrapped onto more lines if needed
        table.add_column("score")
        table.add_column("caption", overflow="fold")
        for hit in res["results"]:
            table.add_row(str(hit["rank"]), hit["id"], f"{hit['score']:.4f}", hit["caption"])
        console.print(table)
    return 0


def main(argv: list[str]) -> int:
    """``tta index build ...`` / ``tta index search DIR "query" ["query" ...] -k 10 [--json]``."""
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
    s.add_argument("query", nargs="+", help="one or more text queries (one CLAP load for all)")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--json", action="store_true", help="print the results as JSON (query, rank, id, score, caption)")
    s.add_argument("--clap", type=Path, default=None, help="CLAP checkpoint (default: the one recorded)")
    args = parser.parse_args(argv)
    return build(args) if args.command == "build" else search(args)
