"""DreamAudio demo stage at several training budgets: does more training help customization?

Runs `tta.demo_dreamaudio.run_dreamaudio_stage` once per budget (each into ``OUT/steps_<N>``,
same data, prompts and seeds) on a finished ``tta demo`` folder and prints, per budget, CLAP_A and
the held-out zero-shot accuracy with and without references, the Re-AudioLDM row, and the
diagnostics (zero-projection weights, mel change caused by the references vs by the seed).

    python bench/dreamaudio_demo.py --demo /tmp/demo --budgets 150,300
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from tta.demo_dreamaudio import run_dreamaudio_stage

log = logging.getLogger("dreamaudio_demo")

ROWS = ("DreamAudio, with references", "DreamAudio, references dropped", "Re-AudioLDM (demo)", "chance")


def summary(budget: int, report: dict[str, Any]) -> list[str]:
    """Markdown rows of one budget's report."""
    lines = []
    for name in ROWS:
        row = report["rows"].get(name)
        if row is None:
            continue
        a, h = row["clap_a"], row["heldout_accuracy"]
        ci = f" [{a['low']:.3f}, {a['high']:.3f}]" if a["low"] is not None else ""
        lines.append(f"| {budget} | {name} | {a['mean']:.3f}{ci} | {h['mean']:.2f} |")
    d = report["diagnostics"]
    lines.append(f"| {budget} | diagnostics | zero-proj max {d['zero_projection_abs_max']:.3g}, mel change refs "
                 f"{d['mel_change_by_references']:.3f} vs seed {d['mel_change_by_seed']:.3f} | "
                 f"train {report['training']['seconds']:.0f} s |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, required=True, help="a finished `tta demo` output folder")
    p.add_argument("--out", type=Path, default=Path("outputs/dreamaudio_budgets"))
    p.add_argument("--budgets", default="150,300", help="training steps, comma-separated")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tta.utils.threads import set_threads

    set_threads(args.threads)
    lines = ["| steps | system | CLAP_A [95% CI] | held-out zero-shot acc. |", "|---|---|---|---|"]
    results = {}
    for budget in (int(b) for b in args.budgets.split(",")):
        report = run_dreamaudio_stage(args.out.resolve() / f"steps_{budget}", args.demo.resolve(), steps=budget)
        results[budget] = {"rows": report["rows"], "diagnostics": report["diagnostics"],
                           "training": report["training"]}
        lines += summary(budget, report)
    (args.out / "budgets.json").write_text(json.dumps(results, indent=2))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
