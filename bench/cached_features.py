"""Training throughput of the demo LDM: VAE latents cached in shards vs the live frozen encoder.

Builds the demo sizes (``configs/demo/vae.yaml``'s mel VAE with random weights, saved as a
``vae`` checkpoint; ``configs/demo/audioldm.yaml``'s UNet and DDPM) on ``--n`` synthetic 3 s
clips, shards them with ``--with mel,latent`` (`tta.data.shards_write.write_shards` +
`tta.generators.vae.shard_latents.vae_latent_source`, what ``tta data shard --with mel,latent --vae``
runs), and trains the same `LatentDiffusionModule` through a Lightning ``Trainer`` from the
``shards`` datamodule twice:

- live: ``use_cached: [mel]`` (the VAE encodes every batch's mels, ``cache_frozen: false``);
- cached: ``use_cached: [mel, latent]`` (the batch carries the posterior moments).

Both read cached mels, so the difference is the frozen encoder alone. The CLAP FiLM is left out
(``film_dim: 0``): its prompt vectors are memoised by CLAP in both arms. Runs alternate
(live, cached, live, ...) so that load from other processes hits both; each reports the median
step time after ``--warmup`` steps, and the ratio uses the best run of each arm.
Run: ``python bench/cached_features.py --n 48 --steps 12 --repeats 2``. Nothing is asserted.
The paper-sized Re-AudioLDM step (VAE and CLAP text cached): ``bench/cached_features_paper.py``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from tta.data.mel import MelConfig
from tta.data.shards_datamodule import ShardDataModule
from tta.data.shards_write import write_shards
from tta.data.synth import synthesize
from tta.generators.vae.shard_latents import vae_latent_source
from tta.training.loading import build_model

log = logging.getLogger("bench.cached_features")
REPO = Path(__file__).resolve().parents[1]


class StepTimer(L.Callback):
    """Wall time of every training batch (data fetch excluded: measured from batch start to end)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0
        self._end = 0.0
        self.gaps: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        now = time.perf_counter()
        if self._end:
            self.gaps.append(now - self._end)  # data loading between steps
        self._t = now

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        self._end = time.perf_counter()
        self.times.append(self._end - self._t)


def random_checkpoint(cfg: dict[str, Any], path: Path) -> Path:
    """The module of model config ``cfg`` with random weights, saved as a checkpoint `load_trained` reads."""
    torch.manual_seed(0)
    module = build_model(cfg)
    ckpt: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    ckpt["tta"]["config"] = yaml.safe_dump({"model": cfg})
    torch.save(ckpt, path)
    return path


def vae_checkpoint(root: Path) -> Path:
    """The demo VAE (random weights) as a checkpoint `load_trained` reads."""
    cfg = yaml.safe_load((REPO / "configs" / "demo" / "vae.yaml").read_text())["model"]
    return random_checkpoint(cfg, root / "vae.ckpt")


def ldm_config(vae: Path) -> dict[str, Any]:
    cfg = yaml.safe_load((REPO / "configs" / "demo" / "audioldm.yaml").read_text())["model"]
    args = cfg["init_args"]
    args.update(vae_checkpoint=str(vae), cache_frozen=False)
    args.pop("clap_checkpoint")
    args.pop("film_scale")
    args["unet"]["init_args"]["film_dim"] = 0
    return cfg


def run(shards: Path, model_cfg: dict[str, Any], cached: list[str], steps: int, batch: int, warmup: int,
        mel: str = "demo", seconds: float = 3.0) -> tuple[float, float]:
    """Median step time and median data gap (s) of ``steps`` training steps of ``model_cfg``
    from the shards (``seconds`` segments of the ``mel`` preset), using the cached arrays ``cached``."""
    torch.manual_seed(0)
    model = build_model(model_cfg)
    dm = ShardDataModule(str(shards), mel=mel, segment_seconds=seconds, batch_size=batch, use_cached=cached)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer])
    trainer.fit(model, datamodule=dm)
    return statistics.median(timer.times[warmup:]), statistics.median(timer.gaps[warmup:] or [0.0])


def parse_bench_args(description: str, n: int, n_help: str, steps: int, warmup: int, batch: int, repeats: int,
                     threads: int, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The common options of the cached-features benches (with their defaults), parsed; quiets
    Lightning / tta logging and sets the torch threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--n", type=int, default=n, help=n_help)
    if extra is not None:
        extra(parser)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=threads)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lightning", "lightning.pytorch", "tta"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = parse_bench_args(__doc__.splitlines()[0], n=48, n_help="synthetic 3 s clips (22.05 kHz)", steps=12,
                            warmup=2, batch=8, repeats=2, threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = synthesize(root / "synth", n=args.n, seed=0, sample_rate=22050, duration=3.0, heldout=0)
        vae = vae_checkpoint(root)
        mel = MelConfig.preset("demo")
        t = time.perf_counter()
        index = write_shards(manifest, root / "shards", shard_size=16, split="train", mel=mel, store_mel=True,
                             sources={"latent": vae_latent_source(vae, mel)},
                             segment_frames=round(3.0 * mel.sample_rate) // mel.hop_length)
        log.info("sharded %d clips with mel + latent caches in %.1f s", index.total, time.perf_counter() - t)
        results: dict[str, list[tuple[float, float]]] = {"live": [], "cached": []}
        for r in range(args.repeats):
            for arm, cached in (("live", ["mel"]), ("cached", ["mel", "latent"])):
                step, gap = run(root / "shards", ldm_config(vae), cached, args.steps, args.batch, args.warmup)
                results[arm].append((step, gap))
                log.info("repeat %d %-6s: %.3f s/step (%.2f steps/s), data wait %.3f s", r, arm, step, 1 / step, gap)
    live = min(s + g for s, g in results["live"])
    cached = min(s + g for s, g in results["cached"])
    log.info("demo LDM, batch %d x 3 s, %d thread(s): live encoder %.2f steps/s, cached latents %.2f steps/s, "
             "ratio cached/live = %.2f", args.batch, args.threads, 1 / live, 1 / cached, live / cached)


if __name__ == "__main__":
    main()
