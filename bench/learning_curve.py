"""Learning curve of the demo's text-to-audio generators, scored by the demo's judge.

Trains a demo config (``--system audioldm | re_audioldm | audioldm_rfm``, i.e.
``configs/demo/<system>.yaml``) once up to the largest step budget and, at every budget, samples
every captioned test prompt with the EMA weights and scores it with `tta.evaluation.judge`:
classifier accuracy (all / head / tail), CLAP score, share of silent and noise-only clips, each
with a bootstrap 95 % interval, beside the real test clips, the VAE-reconstructed real clips
(the ceiling of this VAE + vocoder) and chance. ``--sample-steps`` sweeps the sampler's step
count at the last budget. Prints the table, writes ``curve.json`` and ``curve.png``.

It needs the demo's frozen VAE and CLAP (and index, for Re-AudioLDM): ``--demo DIR`` is a
``tta demo`` output folder; one is made with ``tta demo --ldm-steps 0`` when it has none.

    python bench/learning_curve.py --system audioldm --system audioldm_rfm --budgets 250,500,1000,2000
    python bench/learning_curve.py --system audioldm --set=--model.init_args.objective=eps   # a variant
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from tta.data.manifest import read_manifest
from tta.demo_ldm import (
    JUDGE_VOCODER,
    SAMPLE_STEPS,
    SECONDS,
    build_features,
    fit_judge,
    generate_mels,
    train_only_ids,
    vocode,
)
from tta.evaluation.judge import Judge, Scores, format_table

log = logging.getLogger("learning_curve")


class BudgetProbe(L.Callback):
    """Scores the EMA weights (``score(module, step, train_seconds)``) at every step budget."""

    def __init__(self, budgets: list[int], score: Any) -> None:
        self.budgets, self.score, self.t0 = set(budgets), score, time.time()
        self.train_seconds = 0.0

    def on_train_batch_end(self, trainer: Any, module: Any, *_: Any) -> None:
        if module.batches_trained not in self.budgets:
            return
        self.train_seconds += time.time() - self.t0
        with_ema(module, lambda: self.score(module, module.batches_trained, self.train_seconds))
        self.t0 = time.time()


def with_ema(module: Any, fn: Any) -> Any:
    """Run ``fn()`` with the module's EMA weights in eval mode, then restore the raw weights."""
    raw = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    was_training = module.training
    if module.ema is not None:
        module.ema.copy_to(module.model)
    module.eval()
    try:
        with torch.no_grad():
            return fn()
    finally:
        module.model.load_state_dict(raw)
        module.train(was_training)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", action="append", required=True, help="demo config name (repeatable)")
    p.add_argument("--budgets", default="250,500,1000,2000", help="training step budgets, comma-separated")
    p.add_argument("--demo", type=Path, default=Path("outputs/demo"), help="a `tta demo` output folder")
    p.add_argument("--out", type=Path, default=Path("outputs/learning_curve"))
    p.add_argument("--prompts", type=int, default=None, help="test prompts (default: all captioned test clips)")
    p.add_argument("--sample-steps", default=str(SAMPLE_STEPS),
                   help="sampling steps; several (comma-separated) are swept at the last budget")
    p.add_argument("--set", action="append", default=[], dest="overrides",
                   help="a `tta fit` override for every system, e.g. --set=--model.init_args.lr=2e-3")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tta.utils.threads import set_threads

    set_threads(args.threads)
    budgets = sorted({int(b) for b in args.budgets.split(",")})
    sweep = [int(s) for s in args.sample_steps.split(",")]
    demo = args.demo.resolve()
    vae, clap_ckpt, index = demo / "train" / "vae_final.ckpt", demo / "train_clap" / "clap_final.ckpt", demo / "index"
    if not (vae.is_file() and clap_ckpt.is_file() and index.is_dir()):
        from tta.demo import run_demo

        log.info("no demo VAE / CLAP in %s: running `tta demo --ldm-steps 0` first", demo)
        run_demo(demo, ldm_steps=0)
    results = run(args.system, budgets, sweep, demo, args.out.resolve(), args.prompts, args.overrides)
    sys.stdout.write(results["table"] + "\n")
    return 0


def run(systems: list[str], budgets: list[int], sweep: list[int], demo: Path, out: Path, n_prompts: int | None,
        overrides: list[str]) -> dict[str, Any]:
    """Train each system to the largest budget, scoring at every budget; the results dict."""
    from tta.demo import demo_config_path
    from tta.demo_clap import instantiate_config
    from tta.encoders.clap_towers import load_clap_network
    from tta.vocoders.factory import build_vocoder

    clap_ckpt = str(demo / "train_clap" / "clap_final.ckpt")
    clap = load_clap_network(clap_ckpt).eval()
    features = None
    rows: dict[str, Scores] = {}
    points: list[dict[str, Any]] = []
    judge: Judge | None = None
    for system in systems:
        extra = [f"--model.init_args.vae_checkpoint={demo / 'train' / 'vae_final.ckpt'}",
                 f"--model.init_args.clap_checkpoint={clap_ckpt}", "--trainer.val_check_interval=100000",
                 *overrides]
        if system.startswith("re_"):
            features = features or build_features(out, clap_ckpt, demo_config_path("retrieval_features"), None)
            extra += [f"--model.init_args.retrieval.init_args.features={features}",
                      f"--model.init_args.retrieval.init_args.index={demo / 'index'}"]
        module, datamodule, trainer = instantiate_config(demo_config_path(system), out / f"train_{system}",
                                                         max(budgets), None, extra)
        items = read_manifest(datamodule.manifest_path())
        sr = module.mel_config.sample_rate
        voc = build_vocoder(JUDGE_VOCODER, module.mel_config)
        samples = round(SECONDS * sr)
        if judge is None:
            judge, ceilings = fit_judge(clap, items, module, voc, n_prompts)
            rows.update(ceilings)
        prompts, banned = [i.captions[0] for i in judge.test], train_only_ids(items)

        def score(m: Any, step: int, seconds: float, system: str = system, judge: Judge = judge, voc: Any = voc,
                  prompts: list[str] = prompts, banned: set[str] = banned, samples: int = samples) -> None:
            for steps in (sweep if step == max(budgets) else sweep[:1]):
                t0 = time.time()
                wav = vocode(voc, generate_mels(m, prompts, banned, steps=steps), samples)
                scores = judge.score(wav)
                name = f"{system} @ {step} steps (sampling {steps})"
                rows[name] = scores
                points.append({"system": system, "train_steps": step, "train_seconds": round(seconds, 1),
                               "sample_steps": steps, "sampler": m.model.process.fast_sampler,
                               "sample_seconds": round(time.time() - t0, 1), **scores.summary()})
                log.info("%s: accuracy %.3f, CLAP %.3f", name, scores.correct.mean(), scores.clap.mean())

        trainer.callbacks.append(BudgetProbe(budgets, score))
        trainer.fit(module, datamodule=datamodule)
    assert judge is not None
    table = format_table(rows, judge.chance)
    results = {"budgets": budgets, "prompts": len(judge.test), "chance": judge.chance, "judge_vocoder": JUDGE_VOCODER,
               "points": points, "rows": {k: v.summary() for k, v in rows.items()}, "table": table}
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps(results, indent=2))
    plot(points, results["rows"], judge.chance, out / "curve.png")
    return results


def plot(points: list[dict[str, Any]], rows: dict[str, Any], chance: float, path: Path) -> None:
    """Accuracy and CLAP score (with 95 % intervals) against training steps, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "accuracy_all", "classifier accuracy"), (axes[1], "clap", "CLAP score")):
        for system in dict.fromkeys(p["system"] for p in points):
            first = {}
            for p in points:  # the first sampling setting of every budget
                if p["system"] == system:
                    first.setdefault(p["train_steps"], p)
            xs = sorted(first)
            mean = [first[x][key]["mean"] for x in xs]
            err = [[m - first[x][key]["low"] for x, m in zip(xs, mean)], [first[x][key]["high"] - m for x, m in zip(xs, mean)]]
            ax.errorbar(xs, mean, yerr=err, marker="o", capsize=3, label=system)
        for name, style in (("real test clips", "--"), ("VAE-reconstructed real clips", ":")):
            ax.axhline(rows[name][key]["mean"], linestyle=style, color="gray", label=name)
        if key == "accuracy_all":
            ax.axhline(chance, linestyle="-.", color="red", label="chance")
        ax.set_xscale("log")
        ax.set_xlabel("training steps")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
