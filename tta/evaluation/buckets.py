"""Per-class and class-frequency breakdown of per-clip metrics (Re-AudioLDM's long-tail analysis).

Rule (docs/evaluation.md): a class's frequency is the number of clips carrying its label in the
counting manifest (``--train-manifest``, else the reference set). Each evaluated clip counts for
every class among its labels (the reference clip's labels, else the generated one's).

- decade buckets: ``unseen`` (0), ``1-9``, ``10-99``, ``100-999``, ``1000+``;
- head / tail: ``head`` when the frequency is at least the median frequency of the classes with
  a non-zero count in the counting manifest, ``tail`` when below it, ``unseen`` at 0.

A bucket's value of a per-clip metric is the mean over its (clip, class) memberships; FAD per
bucket is computed when the bucket holds at least two generated and two reference clips.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter
from typing import Any

from tta.data.manifest import read_manifest
from tta.metrics.fad import FrechetAudioDistance, frechet_distance_sets

DECADES = ("unseen", "1-9", "10-99", "100-999", "1000+")


def decade(count: int) -> str:
    """The decade bucket of a class frequency."""
    if count <= 0:
        return "unseen"
    return DECADES[min(len(str(count)), 4)]


def class_counts(
    source: str | os.PathLike | None, reference: list[Any]
) -> tuple[Counter[str], str]:
    """Label frequencies of the counting manifest (or the reference clips) and a description."""
    if source is not None:
        items = read_manifest(source)
        return Counter(
            label for item in items for label in set(item.labels)
        ), f"train manifest {source}"
    return Counter(
        label for clip in reference for label in set(clip.labels)
    ), "the reference set"


def _mean_by(
    groups: dict[str, list[str]], per_item: dict[str, dict[str, float]]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for group, ids in sorted(groups.items()):
        row: dict[str, Any] = {"n_clips": len(set(ids))}
        names = sorted({m for i in ids for m in per_item.get(i, {})})
        for name in names:
            values = [per_item[i][name] for i in ids if name in per_item.get(i, {})]
            row[name] = sum(values) / len(values) if values else None
        out[group] = row
    return out


def _fad_by(
    groups: dict[str, list[str]], fad: FrechetAudioDistance | None
) -> dict[str, float]:
    if fad is None:
        return {}
    gen_ids, gen = fad.items(real=False)
    ref_ids, ref = fad.items(real=True)
    gen_pos = {i: k for k, i in enumerate(gen_ids)}
    ref_pos = {i: k for k, i in enumerate(ref_ids)}
    out = {}
    for group, ids in groups.items():
        g = [gen_pos[i] for i in ids if i in gen_pos]
        r = [ref_pos[i] for i in ids if i in ref_pos]
        if len(g) >= 2 and len(r) >= 2:
            out[group] = frechet_distance_sets(gen[g], ref[r])
    return out


def breakdown(
    per_item: dict[str, dict[str, float]], labels: dict[str, list[str]], train_manifest: str | os.PathLike | None,
    reference: list[Any], fad: FrechetAudioDistance | None, flagged: dict[str, str],
) -> dict[str, Any]:  # fmt: skip
    """Per-class table, decade buckets and head/tail split of the per-clip metrics."""
    counts, source = class_counts(train_manifest, reference)
    seen = [c for c in counts.values() if c > 0]
    median = statistics.median(seen) if seen else 0
    by_class: dict[str, list[str]] = {}
    by_decade: dict[str, list[str]] = {}
    by_head: dict[str, list[str]] = {}
    for clip_id, classes in labels.items():
        if clip_id in flagged:
            continue
        for cls in set(classes):
            n = counts.get(cls, 0)
            by_class.setdefault(cls, []).append(clip_id)
            by_decade.setdefault(decade(n), []).append(clip_id)
            by_head.setdefault(
                "unseen" if n == 0 else ("head" if n >= median else "tail"), []
            ).append(clip_id)
    per_class = _mean_by(by_class, per_item)
    for cls, row in per_class.items():
        row["frequency"] = counts.get(cls, 0)
    decades = _mean_by(by_decade, per_item)
    head_tail = _mean_by(by_head, per_item)
    for table, groups in ((decades, by_decade), (head_tail, by_head)):
        for group, value in _fad_by(groups, fad).items():
            table[group]["fad"] = value
    return {
        "counted_on": source, "median_frequency": median, "per_class": per_class,
        "decades": {k: decades[k] for k in DECADES if k in decades},
        "head_tail": {k: head_tail[k] for k in ("head", "tail", "unseen") if k in head_tail},
    }  # fmt: skip
