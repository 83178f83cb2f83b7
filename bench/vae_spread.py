"""Spread of the demo VAE over torch thread counts and seeds: is a recipe robust?

The demo's text-to-audio systems are capped by the demo VAE (docs/demo.md). The same config and
seed gave a VAE-reconstruction judge accuracy of 0.82 with 1 torch thread and 0.40 with 2: the
thread count changes the order of floating-point sums, and a fragile recipe turns that into a
different minimum. This bench trains ``configs/demo/vae.yaml`` (plus ``--set`` overrides) for every
``--threads`` x ``--seeds`` combination, each run in its own process (the thread count is fixed
before torch computes anything), and prints the held-out reconstruction mel L1 (the trained weights, which the LDM loads; the
first segment of ``--clips`` validation clips, no vocoder; also with the EMA weights) of each run, with the spread
(max - min) of the recipe. Lower is better; a robust recipe has a small spread.

    python bench/vae_spread.py --threads 1,2 --seeds 0,1
    python bench/vae_spread.py --threads 1,2 --set=--model.init_args.lr=1e-3 --label lr1e-3
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("vae_spread")


def one_run(args: argparse.Namespace) -> dict:
    """Train once in this process and return its scores (``--one``)."""
    from tta.demo import _eval_batch, demo_config_path
    from tta.demo_clap import instantiate_config

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        extra = [f"--seed_everything={args.seed}", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
                 "--trainer.max_time=null", *args.set]
        module, dm, trainer = instantiate_config(demo_config_path("vae"), Path(tmp), args.steps, None, extra)
        dm.prepare_data()
        dm.setup("fit")
        batch = _eval_batch(dm, args.clips)
        t0 = time.time()
        trainer.fit(module, datamodule=dm)
        seconds = time.time() - t0
        module.eval()
        with torch.no_grad():
            l1 = float((module.reconstruct(batch["mel"]) - batch["mel"]).abs().mean())
            ema = None
            if module.ema is not None:
                module.ema.copy_to(module.ema_target())
                ema = float((module.reconstruct(batch["mel"]) - batch["mel"]).abs().mean())
    return {"threads": args.threads, "seed": args.seed, "label": args.label, "mel_l1": l1, "ema_mel_l1": ema,
            "steps": module.batches_trained, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (seed_everything)")
    parser.add_argument("--steps", type=int, default=500, help="VAE training steps (the demo's 500)")
    parser.add_argument("--clips", type=int, default=64, help="validation clips scored")
    parser.add_argument("--set", action="append", default=[], help="a `tta fit` override, e.g. --set=--model...")
    parser.add_argument("--label", default="demo", help="name of the recipe in the table")
    parser.add_argument("--parallel", type=int, default=1, help="1-thread runs at once (results do not depend on it)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lightning", "lightning.pytorch", "tta"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.one:
        args.threads = int(args.threads)
        sys.stdout.write(json.dumps(one_run(args)) + "\n")
        return
    runs = [(int(t), int(s)) for t in args.threads.split(",") for s in args.seeds.split(",")]
    base = [sys.executable, __file__, "--one", "--steps", str(args.steps), "--clips", str(args.clips),
            "--label", args.label, *[f"--set={s}" for s in args.set]]
    results: list[dict] = []
    pending = list(runs)
    while pending:  # 1-thread runs side by side, others alone
        batch = [pending.pop(0)]
        while pending and batch[0][0] == 1 and pending[0][0] == 1 and len(batch) < args.parallel:
            batch.append(pending.pop(0))
        procs = [subprocess.Popen([*base, "--threads", str(t), "--seed", str(s)], stdout=subprocess.PIPE, text=True)
                 for t, s in batch]
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"a run failed (exit {proc.returncode})")
            results.append(json.loads(out.strip().splitlines()[-1]))
            log.info("%s", results[-1])
    log.info("\n| recipe | threads | seed | steps | held-out mel L1 | with EMA weights | train s |\n"
             "|---|---|---|---|---|---|---|")
    for r in results:
        ema = "-" if r["ema_mel_l1"] is None else f"{r['ema_mel_l1']:.3f}"
        log.info("| %s | %d | %d | %d | %.3f | %s | %.0f |", r["label"], r["threads"], r["seed"], r["steps"],
                 r["mel_l1"], ema, r["seconds"])
    values = [r["mel_l1"] for r in results]
    log.info("recipe %s: mel L1 mean %.3f, spread (max - min) %.3f over %d runs", args.label,
             sum(values) / len(values), max(values) - min(values), len(values))


if __name__ == "__main__":
    main()
