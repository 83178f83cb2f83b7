"""Paper-sized Re-AudioLDM training step on CPU: frozen VAE and CLAP live vs cached in shards.

Builds ``configs/re_audioldm.yaml``'s model with random weights: the paper VAE (``configs/vae.yaml``,
saved as a ``vae`` checkpoint), the paper CLAP (``configs/clap.yaml``: HTSAT and a GPT2-base-sized
text tower, 12 x 768, with a small BPE tokenizer; a ``clap_trainer`` checkpoint), the
Re-AudioLDM-S UNet (FiLM 1024, retrieval context 768) and its retrieval conditioner over a random
neighbour store (k = 3; AudioMAE 1 x 32, T5 50 x 1024). ``--n`` synthetic clips of ``--seconds``
(10.24) at 16 kHz are sharded with ``--with mel,latent,clap`` (`write_shards` with the
``vae_latents`` and ``clap_embeddings`` sources, what ``tta data shard`` runs). The same module then
trains through a Lightning ``Trainer`` from the ``shards`` datamodule (fp32, batch ``--batch``):

- live: ``use_cached: [mel]``: the VAE encodes every batch's mels and CLAP embeds every caption
  (the paper CLAP's text tower is trainable in its own config, so CLAP memoises nothing);
- cached: ``use_cached: [mel, latent, clap]``: the batch carries the posterior moments and the
  caption embeddings.

Both read cached mels. Runs alternate (live, cached, ...); each reports the median step time after
``--warmup`` steps; the ratio uses the best run of each arm. Nothing is asserted. The text
encoders come from ``tests/hf_fixtures.py`` (tiny tokenizers, no download).
Run: ``python bench/cached_features_paper.py --n 4 --steps 4 --batch 1`` (about 3-5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from cached_features import REPO, parse_bench_args, random_checkpoint, run

from tta.data.manifest import read_manifest
from tta.data.mel import MelConfig
from tta.data.shards_write import write_shards
from tta.data.synth import synthesize
from tta.generators.ldm.shard_conditions import clap_embedding_sources
from tta.generators.vae.shard_latents import vae_latent_source

sys.path.insert(0, str(REPO))  # the tiny tokenizer / random-weight builders of the tests
from tests.hf_fixtures import make_gpt2_folder
from tests.ldm_fixtures import make_store_and_table

log = logging.getLogger("bench.cached_features_paper")


def _config(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "configs" / name).read_text())["model"]


def paper_components(root: Path) -> tuple[Path, Path]:
    """Random-weight ``vae`` and ``clap_trainer`` checkpoints of the paper configs."""
    vae = random_checkpoint(_config("vae.yaml"), root / "vae.ckpt")
    clap = _config("clap.yaml")
    gpt2 = make_gpt2_folder(root / "gpt2", n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    clap["init_args"]["clap"]["init_args"]["text_encoder"]["init_args"]["path"] = str(gpt2)
    return vae, random_checkpoint(clap, root / "clap.ckpt")


def re_audioldm_config(vae: Path, clap: Path, ids: list[str], root: Path) -> dict[str, Any]:
    """``configs/re_audioldm.yaml``'s model over these components and a random neighbour store of ``ids``."""
    cfg = _config("re_audioldm.yaml")
    args = cfg["init_args"]
    retrieval = args["retrieval"]["init_args"]
    extra = [f"datastore_{i}" for i in range(retrieval["k"] + 1)]  # enough neighbours for a few clips
    features, index = make_store_and_table(ids + extra, root / "retrieval", k=retrieval["k"],
                                           audio_dim=retrieval["audio_dim"], text_dim=retrieval["text_dim"],
                                           audio_len=1, text_len=50)
    retrieval.update(features=str(features), index=str(index))
    args.update(vae_checkpoint=str(vae), clap_checkpoint=str(clap))
    return cfg


def main() -> None:
    def seconds(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--seconds", type=float, default=10.24, help="clip and training segment length")

    args = parse_bench_args(__doc__.splitlines()[0], n=4, n_help="synthetic clips (16 kHz)", steps=4, warmup=1,
                            batch=1, repeats=1, threads=2, extra=seconds)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = synthesize(root / "synth", n=args.n, seed=0, sample_rate=16000, duration=args.seconds, heldout=0)
        t = time.perf_counter()
        vae, clap = paper_components(root)
        log.info("paper VAE and CLAP (random weights) built in %.1f s", time.perf_counter() - t)
        mel = MelConfig.preset("audioldm")
        t = time.perf_counter()
        sources = {"latent": vae_latent_source(vae, mel), **clap_embedding_sources(clap, ["clap"], mel.sample_rate)}
        index = write_shards(manifest, root / "shards", shard_size=16, split=None, mel=mel, store_mel=True,
                             sources=sources, segment_frames=round(args.seconds * mel.sample_rate) // mel.hop_length)
        log.info("sharded %d clips with mel + latent + clap caches in %.1f s", index.total, time.perf_counter() - t)
        cfg = re_audioldm_config(vae, clap, [item.id for item in read_manifest(manifest)], root)
        results: dict[str, list[tuple[float, float]]] = {"live": [], "cached": []}
        for r in range(args.repeats):
            for arm, cached in (("live", ["mel"]), ("cached", ["mel", "latent", "clap"])):
                step, gap = run(root / "shards", cfg, cached, args.steps, args.batch, args.warmup, mel="audioldm",
                                seconds=args.seconds)
                results[arm].append((step, gap))
                log.info("repeat %d %-6s: %.2f s/step, data wait %.3f s", r, arm, step, gap)
    live = min(s + g for s, g in results["live"])
    cached = min(s + g for s, g in results["cached"])
    log.info("paper Re-AudioLDM-S, batch %d x %.2f s, %d thread(s): live encoders %.2f s/step, cached %.2f s/step, "
             "ratio live/cached = %.2f (cached steps/s over live steps/s)", args.batch, args.seconds, args.threads,
             live, cached, live / cached)


if __name__ == "__main__":
    main()
