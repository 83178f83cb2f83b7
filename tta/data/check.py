"""Validate a manifest's clips: existence, readability, length, channels, rate, captions, samples.

`check_manifest` returns a `CheckReport` (counts and example ids per problem); the CLI prints it.
A clip is *unusable* when its file is missing, unreadable, empty, too short or holds non-finite
samples; wrong channel counts / sample rates make it unusable only when the caller asked for a
specific value (``channels`` / ``sample_rate``). A declared-rate mismatch alone is reported but
does not make a clip unusable (loading resamples from the file's real rate).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from tta.data.manifest import ManifestItem, read_manifest

__all__ = ["PROBLEMS", "CheckReport", "check_items", "check_manifest"]

PROBLEMS = (
    "missing_file", "unreadable", "empty", "wrong_channels", "too_short", "missing_caption", "sample_rate",
    "non_finite",
)  # fmt: skip
ALWAYS_UNUSABLE = frozenset({"missing_file", "unreadable", "empty", "too_short", "non_finite"})
_BLOCK = 1 << 20


@dataclass
class CheckReport:
    """Result of checking a manifest."""

    total: int
    counts: dict[str, int]
    examples: dict[str, list[str]]
    unusable: list[str] = field(default_factory=list)
    manifest: Path | None = None
    details: dict[str, str] = field(default_factory=dict)  # id -> reason of a missing/unreadable/empty clip
    blocking: tuple[str, ...] = tuple(sorted(ALWAYS_UNUSABLE))  # problems that made clips unusable

    @property
    def ok(self) -> bool:
        """True when every clip is usable."""
        return not self.unusable

    @property
    def usable(self) -> int:
        return self.total - len(self.unusable)

    def rows(self) -> list[tuple[str, int, str]]:
        """``(problem, count, example ids)`` for every problem, in `PROBLEMS` order."""
        return [(p, self.counts[p], ", ".join(self.examples[p])) for p in PROBLEMS]


def _check_one(
    item: ManifestItem,
    sample_rate: int | None,
    channels: int | None,
    min_duration: float | None,
    read_samples: bool,
) -> tuple[list[str], str]:
    """Problems of one clip and a one-line detail of the first serious one."""
    problems: list[str] = []
    if not any(c.strip() for c in item.captions):
        problems.append("missing_caption")
    path = item.audio
    if not path.is_file():
        return problems + ["missing_file"], f"no such file {path}"
    try:
        with sf.SoundFile(str(path)) as f:
            sr, ch, frames = int(f.samplerate), int(f.channels), int(f.frames)
            if frames == 0:
                return problems + ["empty"], "zero-length audio"
            if channels is not None and ch != channels:
                problems.append("wrong_channels")
            if (item.sample_rate is not None and sr != item.sample_rate) or (
                sample_rate is not None and sr != sample_rate
            ):
                problems.append("sample_rate")
            if min_duration is not None and frames / sr < min_duration:
                problems.append("too_short")
            read = 0
            if read_samples:
                while read < frames:
                    block = f.read(min(_BLOCK, frames - read), dtype="float32", always_2d=True)
                    if block.shape[0] == 0:
                        return problems + ["unreadable"], f"truncated: {read} of {frames} frames readable"
                    read += block.shape[0]
                    if not np.isfinite(block).all():
                        problems.append("non_finite")
                        break
    except (sf.SoundFileError, RuntimeError, OSError) as exc:
        return problems + ["unreadable"], (str(exc).splitlines() or [type(exc).__name__])[0]
    return problems, ""


def check_items(
    items: Iterable[ManifestItem],
    sample_rate: int | None = None,
    channels: int | None = None,
    min_duration: float | None = None,
    read_samples: bool = True,
    max_examples: int = 5,
    workers: int = 1,
) -> CheckReport:
    """Check every clip of ``items`` (whose ``audio`` paths are absolute, as `read_manifest` gives).

    ``sample_rate``/``channels``/``min_duration`` are the expected values (None: not checked,
    except that a clip's declared ``sample_rate`` is always compared with its file).
    ``read_samples`` decodes every sample to find non-finite values and truncated files.
    """
    items = list(items)
    counts = {p: 0 for p in PROBLEMS}
    examples: dict[str, list[str]] = {p: [] for p in PROBLEMS}
    hard = set(ALWAYS_UNUSABLE)
    if channels is not None:
        hard.add("wrong_channels")
    if sample_rate is not None:
        hard.add("sample_rate")
    unusable: list[str] = []
    details: dict[str, str] = {}

    def run(item: ManifestItem) -> tuple[list[str], str]:
        return _check_one(item, sample_rate, channels, min_duration, read_samples)

    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(run, items))
    else:
        results = [run(item) for item in items]
    for item, (problems, detail) in zip(items, results):
        for p in problems:
            counts[p] += 1
            if len(examples[p]) < max_examples:
                examples[p].append(item.id)
        if hard.intersection(problems):
            unusable.append(item.id)
        if detail:
            details[item.id] = detail
    return CheckReport(
        total=len(items), counts=counts, examples=examples, unusable=unusable, details=details,
        blocking=tuple(p for p in PROBLEMS if p in hard),
    )  # fmt: skip


def check_manifest(
    path: str | os.PathLike,
    sample_rate: int | None = None,
    channels: int | None = None,
    min_duration: float | None = None,
    read_samples: bool = True,
    max_examples: int = 5,
    workers: int = 1,
) -> CheckReport:
    """Read the manifest at ``path`` and `check_items` its clips."""
    report = check_items(
        read_manifest(path), sample_rate=sample_rate, channels=channels, min_duration=min_duration,
        read_samples=read_samples, max_examples=max_examples, workers=workers,
    )  # fmt: skip
    report.manifest = Path(path)
    return report
