"""Validate a manifest's clips: existence, readability, length, channels, rate, captions, samples.

`check_manifest` returns a `CheckReport` (counts and example ids per problem, one problem row
per clip and kind); the CLI prints it. A clip is *unusable* when its path is missing or not a
file, the file is unreadable or truncated (a WAV holding less audio than its header declares),
empty, shorter than ``min_duration`` or than the mel front-end can analyse (`mel_min_samples`),
all silent (peak at or below ``silence_threshold``) or holds non-finite samples; wrong channel
counts / sample rates make it unusable only when the caller asked for a specific value
(``channels`` / ``sample_rate``). A declared-rate mismatch alone is reported but does not make a
clip unusable (loading resamples from the file's real rate).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from tta.data.audio import truncation
from tta.data.manifest import ManifestError, ManifestItem, read_manifest
from tta.data.mel import MelConfig

__all__ = ["DEFAULT_SILENCE_THRESHOLD", "PROBLEMS", "CheckReport", "check_items", "check_manifest",
           "mel_min_samples", "resampled_length", "undecodable_line"]

PROBLEMS = (
    "missing_file", "not_a_file", "unreadable", "empty", "wrong_channels", "too_short", "too_short_for_mel",
    "missing_caption", "sample_rate", "non_finite", "silent",
)  # fmt: skip
ALWAYS_UNUSABLE = frozenset({"missing_file", "not_a_file", "unreadable", "empty", "too_short", "too_short_for_mel",
                             "non_finite", "silent"})
#: peak amplitude at or below which a clip counts as silent (as `tta eval`'s default)
DEFAULT_SILENCE_THRESHOLD = 1e-4
_BLOCK = 1 << 20


def mel_min_samples(mel: MelConfig) -> int:
    """The fewest samples (at ``mel.sample_rate``) the mel front-end analyses: the STFT's reflect
    padding must be shorter than the clip (``stft``: ``(n_fft - hop) // 2 + 1``, ``stft_db``:
    ``n_fft // 2 + 1``; ``kaldi_fbank``: one window), rounded up to whole hops (loaders crop to hops)."""
    hop = mel.hop_length
    if mel.kind == "stft":
        pad = (mel.n_fft - hop) // 2
        need = max(pad + 1, mel.n_fft - 2 * pad)
    elif mel.kind == "stft_db":
        need = mel.n_fft // 2 + 1
    else:
        need = mel.win_length
    return -(-need // hop) * hop


def resampled_length(frames: int, sample_rate: int, target_rate: int) -> int:
    """Samples of ``frames`` samples at ``sample_rate`` once resampled to ``target_rate``."""
    return frames if sample_rate == target_rate else -(-frames * target_rate // sample_rate)


def undecodable_line(path: Path) -> tuple[int, str] | None:
    """``(line number, reason)`` of the first line of ``path`` that is not valid UTF-8, or None."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return lineno, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
    return None


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


@dataclass(frozen=True)
class _Limits:
    """What a clip is checked against (see `check_items`)."""

    sample_rate: int | None
    channels: int | None
    min_duration: float | None
    read_samples: bool
    mel: MelConfig | None
    silence_threshold: float | None


def _check_one(item: ManifestItem, lim: _Limits) -> tuple[list[str], str]:
    """Problems of one clip and a one-line detail of the first serious one."""
    problems: list[str] = []
    if not any(c.strip() for c in item.captions):
        problems.append("missing_caption")
    path = item.audio
    if path.is_dir():
        return problems + ["not_a_file"], f"{path} is a directory, not an audio file"
    if not path.is_file():
        return problems + ["missing_file"], f"no such file {path}"
    try:
        cut = truncation(path)
        if cut is not None:
            return problems + ["unreadable"], cut
        with sf.SoundFile(str(path)) as f:
            sr, ch, frames = int(f.samplerate), int(f.channels), int(f.frames)
            if frames == 0:
                return problems + ["empty"], "zero-length audio"
            detail = ""
            if lim.channels is not None and ch != lim.channels:
                problems.append("wrong_channels")
            if (item.sample_rate is not None and sr != item.sample_rate) or (
                lim.sample_rate is not None and sr != lim.sample_rate
            ):
                problems.append("sample_rate")
            if lim.min_duration is not None and frames / sr < lim.min_duration:
                problems.append("too_short")
            if lim.mel is not None:
                have, need = resampled_length(frames, sr, lim.mel.sample_rate), mel_min_samples(lim.mel)
                if have < need:
                    problems.append("too_short_for_mel")
                    detail = (f"{have} samples at {lim.mel.sample_rate} Hz; the mel front-end {lim.mel.name!r} "
                              f"needs at least {need} (n_fft {lim.mel.n_fft}, hop {lim.mel.hop_length})")
            if lim.read_samples:
                read, peak = 0, 0.0
                while read < frames:
                    block = f.read(min(_BLOCK, frames - read), dtype="float32", always_2d=True)
                    if block.shape[0] == 0:
                        return problems + ["unreadable"], f"truncated: {read} of {frames} frames readable"
                    read += block.shape[0]
                    if not np.isfinite(block).all():
                        problems.append("non_finite")
                        break
                    peak = max(peak, float(np.abs(block).max()))
                if "non_finite" not in problems and lim.silence_threshold is not None and peak <= lim.silence_threshold:
                    problems.append("silent")
                    detail = detail or f"silent: peak {peak:.3g} <= silence threshold {lim.silence_threshold:g}"
    except (sf.SoundFileError, RuntimeError, OSError) as exc:
        return problems + ["unreadable"], (str(exc).splitlines() or [type(exc).__name__])[0]
    return problems, detail


def check_items(
    items: Iterable[ManifestItem],
    sample_rate: int | None = None,
    channels: int | None = None,
    min_duration: float | None = None,
    read_samples: bool = True,
    max_examples: int = 5,
    workers: int = 1,
    mel: str | MelConfig | None = "audioldm",
    silence_threshold: float | None = DEFAULT_SILENCE_THRESHOLD,
) -> CheckReport:
    """Check every clip of ``items`` (whose ``audio`` paths are absolute, as `read_manifest` gives).

    ``sample_rate``/``channels``/``min_duration`` are the expected values (None: not checked,
    except that a clip's declared ``sample_rate`` is always compared with its file).
    ``read_samples`` decodes every sample to find non-finite values, silence and truncated files.
    ``mel`` (a preset name or config; None: not checked): clips shorter than `mel_min_samples` at
    its rate are ``too_short_for_mel``. ``silence_threshold`` (None: not checked): clips whose peak
    is at or below it are ``silent``.
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
    limits = _Limits(sample_rate, channels, min_duration, read_samples,
                     MelConfig.preset(mel) if isinstance(mel, str) else mel, silence_threshold)

    def run(item: ManifestItem) -> tuple[list[str], str]:
        return _check_one(item, limits)

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
    mel: str | MelConfig | None = "audioldm",
    silence_threshold: float | None = DEFAULT_SILENCE_THRESHOLD,
) -> CheckReport:
    """Read the manifest at ``path`` and `check_items` its clips; a line that is not UTF-8 raises
    `ManifestError` with its line number; a directory given as the manifest, `ManifestError`."""
    path = Path(path)
    if path.is_dir():
        raise ManifestError(path, None, "is a directory; give the manifest file (.jsonl)")
    if path.is_file() and (bad := undecodable_line(path)) is not None:
        raise ManifestError(path, bad[0], bad[1])
    report = check_items(
        read_manifest(path), sample_rate=sample_rate, channels=channels, min_duration=min_duration,
        read_samples=read_samples, max_examples=max_examples, workers=workers, mel=mel,
        silence_threshold=silence_threshold,
    )  # fmt: skip
    report.manifest = path
    return report
