"""Writing an evaluation: ``eval.json`` (everything), ``eval.md`` (tables) and PNG plots."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from tta.data.mel import MelConfig
from tta.utils.files import atomic_path
from tta.utils.plots import safe_name, save_spectrograms

log = logging.getLogger(__name__)

LABELS = {
    "fad": "FAD ↓", "fad_inf": "FAD-inf ↓", "kl_softmax": "KL softmax ↓", "kl_sigmoid": "KL sigmoid (MMKL) ↓",
    "is": "IS ↑", "clap_score": "CLAP score ↑", "clap_a": "CLAP_A ↑", "psnr": "PSNR (dB) ↑", "spec_fid": "spec. FID ↓",
    "mel_fid": "FID (mel classifier) ↓", "mmkl": "MMKL (mel classifier) ↓", "mmkl_bernoulli": "MMKL Bernoulli ↓",
}  # fmt: skip
BUCKET_METRICS = ("clap_score", "kl_sigmoid", "kl_softmax", "mmkl", "clap_a", "psnr", "fad")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _table(
    rows: dict[str, dict[str, Any]], key_name: str, columns: list[str]
) -> list[str]:
    lines = [f"| {key_name} | " + " | ".join(LABELS.get(c, c) for c in columns) + " |",
             "|" + "---|" * (len(columns) + 1)]  # fmt: skip
    for key, row in rows.items():
        lines.append(
            f"| {key} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |"
        )
    return lines


def plot_buckets(breakdown: dict[str, Any], path: Path) -> Path | None:
    """Bar charts: each per-clip metric by class-frequency decade and by head/tail."""
    groups = [
        ("decades", breakdown.get("decades") or {}),
        ("head / tail", breakdown.get("head_tail") or {}),
    ]
    names = [
        m
        for m in BUCKET_METRICS
        if any(m in row for _, g in groups for row in g.values())
    ]
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(names),
        2,
        figsize=(9, 2.6 * len(names)),
        squeeze=False,
        layout="constrained",
    )
    for r, name in enumerate(names):
        for c, (title, rows) in enumerate(groups):
            ax = axes[r, c]
            keys = [k for k, row in rows.items() if row.get(name) is not None]
            ax.bar(range(len(keys)), [rows[k][name] for k in keys], color="tab:blue")
            ax.set_xticks(range(len(keys)), keys)
            for k_i, k in enumerate(keys):
                ax.annotate(
                    f"n={rows[k]['n_clips']}",
                    (k_i, 0),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
            ax.set_title(f"{LABELS.get(name, name)} by {title}")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_report(
    report: dict[str, Any], out_dir: Path, examples: dict[str, dict[str, torch.Tensor]]
) -> dict[str, Path]:
    """Write ``eval.json``, ``eval.md`` and the plots into ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    mel = MelConfig.from_dict(report["protocol"]["spectrogram_mel"])
    figures = []
    for clip_id, mels in examples.items():
        path = save_spectrograms(out_dir / "plots" / f"example_{safe_name(clip_id)}.png",
                                 {f"{k}: {clip_id}": v for k, v in mels.items()}, mel)  # fmt: skip
        figures.append(path)
    if report.get("breakdown"):
        bucket_png = plot_buckets(
            report["breakdown"], out_dir / "plots" / "metrics_by_frequency.png"
        )
        if bucket_png is not None:
            written["buckets_png"] = bucket_png
    report = dict(
        report,
        plots=[str(p.relative_to(out_dir)) for p in [*figures, *written.values()]],
    )
    with atomic_path(out_dir / "eval.json") as tmp:
        tmp.write_text(
            json.dumps(report, indent=2, sort_keys=True, default=str) + "\n",
            encoding="utf-8",
        )
    written["json"] = out_dir / "eval.json"
    with atomic_path(out_dir / "eval.md") as tmp:
        tmp.write_text(render_markdown(report) + "\n", encoding="utf-8")
    written["md"] = out_dir / "eval.md"
    log.info("evaluation written to %s", out_dir)
    return written


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable summary of a report dict."""
    p = report["protocol"]
    emb = p.get("embedder") or {}
    lines = ["# Evaluation", ""]
    lines += _table(
        {"all clips": report["metrics"]},
        "set",
        [k for k in LABELS if k in report["metrics"]],
    )
    lines += ["", "## Protocol", ""]
    if emb:
        lines.append(f"- embedder / classifier: **{emb.get('name')}** (sha256 `{str(emb.get('weight_sha256'))[:16]}`), "
                     f"{emb.get('sample_rate')} Hz, {emb.get('dim')}-d, {emb.get('num_classes')} classes")  # fmt: skip
    if p.get("melception"):
        m = p["melception"]["classifier"]
        lines.append(f"- mel classifier (Melception stand-in): {m['source']} (sha256 `{str(m['weight_sha256'])[:16]}`), "
                     f"{m['front_end']['name']} mels, {m['labels']} labels, MMKL: {p['melception']['mmkl']}")  # fmt: skip
    if p.get("clap"):
        c = p["clap"]
        lines.append(f"- CLAP: {c['audio_encoder']} + {c['text_encoder']}, joint {c['joint_dim']}-d, "
                     f"{c['sample_rate']} Hz (sha256 `{str(c['weight_sha256'])[:16]}`)")  # fmt: skip
    lines += [
        f"- resampler: {p['resampler']}",
        f"- crop/pad: {p['crop_pad_seconds'] if p['crop_pad_seconds'] else 'none'} ({p['crop_pad_rule']})",
        f"- clips: {p['n_generated']} generated, {p['n_reference']} reference, {p['n_scored']} scored",
        f"- guidance: {_fmt(p.get('guidance'))}, steps: {_fmt(p.get('steps'))}",
        f"- KL: {p['kl']}",
    ]  # fmt: skip
    flagged = report["flagged"]
    lines += ["", f"## Silent or non-finite generations: {flagged['count']}", ""]
    lines += [f"- `{c['id']}`: {c['reason']}" for c in flagged["clips"]] or ["none"]
    b = report.get("breakdown")
    if b:
        cols = [m for m in BUCKET_METRICS if any(m in r for r in b["decades"].values())]
        lines += [
            "",
            f"## By class frequency (counted on {b['counted_on']}; median {b['median_frequency']})",
            "",
        ]
        lines += _table(b["decades"], "frequency", ["n_clips", *cols])
        lines += [""] + _table(b["head_tail"], "group", ["n_clips", *cols])
        lines += ["", "## Per class", ""]
        pc_cols = [
            m
            for m in BUCKET_METRICS
            if m != "fad" and any(m in r for r in b["per_class"].values())
        ]
        lines += _table(b["per_class"], "class", ["frequency", "n_clips", *pc_cols])
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [
            f"![{Path(x).stem}]({x})" for x in report["plots"]
        ]
    return "\n".join(lines)
