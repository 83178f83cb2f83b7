"""Evaluation inputs: a manifest, a folder of audio or in-memory clips, paired by id.

A folder is read with the ``folder`` adapter (ids are relative paths without extension, so the
file stem in a flat folder; captions from sidecar ``<stem>.txt`` files). Generated clips that are
all-silent or non-finite are *flagged* (`SilenceReport`), never scored.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tta.data.audio import AudioLoadError, load_audio, pad_or_crop, resample
from tta.data.check import mel_min_samples, resampled_length
from tta.data.manifest import ManifestItem, read_manifest, select_split
from tta.data.mel import MelConfig
from tta.metrics.pairing import IdMismatchError
from tta.utils.errors import TTAError, UsageError

log = logging.getLogger(__name__)

RESAMPLER = "torchaudio.functional.resample (windowed sinc, default parameters)"


class SilentGenerationError(RuntimeError):
    """Generated clips are all-silent or non-finite and the caller asked to fail on them."""


class ClipTooShortError(TTAError, ValueError):
    """Clips are shorter than the evaluation's mel front-end can analyse (its STFT's reflect padding)."""


@dataclass
class Clip:
    """One clip to evaluate: from a file (``path``) or in memory (``wav`` (T,) at ``sample_rate``)."""

    id: str
    captions: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    path: Path | None = None
    wav: torch.Tensor | None = None
    sample_rate: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_item(cls, item: ManifestItem) -> Clip:
        return cls(item.id, list(item.captions), list(item.labels), Path(item.audio), None, item.sample_rate,
                   dict(item.extra))  # fmt: skip


def load_clips(
    source: str | os.PathLike | Sequence[Clip] | Sequence[ManifestItem], what: str, split: str | None = None
) -> list[Clip]:
    """Clips of a manifest (``.jsonl``; with ``split``, only that split's items), a folder of audio,
    or a list of `Clip`/`ManifestItem`."""
    if split is not None and not (isinstance(source, (str, os.PathLike)) and Path(source).is_file()):
        raise ValueError(f"{what}: a split ({split!r}) can only be selected from a manifest, not from {source}")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            from tta.data.adapters import folder

            result = folder(path)
            if not result.ok:
                raise AudioLoadError(
                    path,
                    f"{what}: unreadable audio files: {', '.join(result.unreadable[:10])}",
                )
            clips = [Clip.from_item(i) for i in result.items]
        elif path.is_file():
            clips = [Clip.from_item(i) for i in select_split(read_manifest(path), split, path)]
        else:
            raise FileNotFoundError(
                f"{what}: {path} is neither a manifest nor a folder of audio"
            )
    else:
        clips = [c if isinstance(c, Clip) else Clip.from_item(c) for c in source]
    if not clips:
        raise ValueError(
            f"{what}: no clips in {source if isinstance(source, (str, os.PathLike)) else 'the list'}"
        )
    seen: set[str] = set()
    for c in clips:
        if c.id in seen:
            raise ValueError(f"{what}: duplicate clip id {c.id!r}")
        seen.add(c.id)
    return clips


def check_pairing(gen: list[Clip], ref: list[Clip]) -> None:
    """Raise `IdMismatchError` unless generated and reference clips have the same ids."""
    g, r = {c.id for c in gen}, {c.id for c in ref}
    if g == r:
        return
    parts = []
    for name, ids in (("generated clips have no reference", sorted(g - r)),
                      ("reference clips were not generated", sorted(r - g))):  # fmt: skip
        if ids:
            parts.append(
                f"{len(ids)} {name} ({', '.join(ids[:10])}{', ...' if len(ids) > 10 else ''})"
            )
    raise IdMismatchError(
        "generated and reference ids do not match: " + "; ".join(parts)
    )


@dataclass
class SilenceReport:
    """Generated clips that were not scored: ``{id: reason}``."""

    threshold: float
    flagged: dict[str, str] = field(default_factory=dict)

    def check(self, clip_id: str, wav: torch.Tensor) -> bool:
        """True when ``wav`` is usable; otherwise records why not."""
        if not torch.isfinite(wav).all():
            self.flagged[clip_id] = (
                f"{int((~torch.isfinite(wav)).sum())} non-finite samples"
            )
        elif wav.numel() == 0 or float(wav.abs().max()) <= self.threshold:
            peak = float(wav.abs().max()) if wav.numel() else 0.0
            self.flagged[clip_id] = f"silent (peak {peak:.2e} <= {self.threshold:.0e})"
        else:
            return True
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "count": len(self.flagged),
                "clips": [{"id": k, "reason": v} for k, v in self.flagged.items()]}  # fmt: skip


def read_wav(
    clip: Clip, silence: SilenceReport | None = None
) -> tuple[torch.Tensor, int]:
    """The clip's mono waveform (T,) at its own sample rate.

    A generated file with non-finite samples is flagged in ``silence`` (when given) and returned
    as read; other read errors raise.
    """
    if clip.wav is not None:
        if clip.sample_rate is None:
            raise ValueError(
                f"clip {clip.id!r}: an in-memory waveform needs its sample_rate"
            )
        wav = clip.wav.detach().float().cpu()
        if wav.dim() != 1:
            raise ValueError(
                f"clip {clip.id!r}: expected a mono waveform (T,), got {tuple(wav.shape)}"
            )
        return wav, int(clip.sample_rate)
    if clip.path is None:
        raise ValueError(f"clip {clip.id!r} has neither a path nor a waveform")
    try:
        return load_audio(clip.path)
    except AudioLoadError as exc:
        if silence is None or "non-finite" not in exc.reason:
            raise
        import soundfile as sf

        data, sr = sf.read(str(clip.path), dtype="float32", always_2d=True)
        return torch.from_numpy(data.mean(axis=1)), int(sr)


def _length(clip: Clip) -> tuple[int, int] | None:
    """``(samples, sample rate)`` of a clip from its file header (None: unreadable, reported on reading)."""
    if clip.wav is not None:
        return (int(clip.wav.shape[-1]), int(clip.sample_rate)) if clip.sample_rate else None
    if clip.path is None:
        return None
    import soundfile as sf

    try:
        info = sf.info(str(clip.path))
    except (sf.SoundFileError, RuntimeError, OSError):
        return None
    return int(info.frames), int(info.samplerate)


def check_lengths(clips: list[Clip], what: str, mel: MelConfig, seconds: float | None = None,
                  pad: bool = False) -> list[Clip]:
    """The clips, each long enough for the mel front-end ``mel``: at least `mel_min_samples` at its
    rate once resampled (the check of the data loaders and ``tta data check``).

    Shorter clips raise `ClipTooShortError` naming each (id, file, length) and the minimum, or with
    ``pad`` come back zero-padded at their end to that minimum (in-memory clips; logged). With
    ``seconds`` every clip is padded/cropped to it, so only ``seconds`` itself is checked."""
    need = mel_min_samples(mel)
    if seconds is not None:
        if round(seconds * mel.sample_rate) < need:
            raise UsageError(f"seconds={seconds} (--seconds) is shorter than the {need / mel.sample_rate:.3f} s "
                             f"({need} samples at {mel.sample_rate} Hz) the evaluation spectrogram needs")
        return clips
    short: list[tuple[int, Clip, int, int]] = []
    for i, clip in enumerate(clips):
        length = _length(clip)
        if length is not None and resampled_length(length[0], length[1], mel.sample_rate) < need:
            short.append((i, clip, *length))
    if not short:
        return clips
    minimum = (f"at least {need} samples at {mel.sample_rate} Hz ({need / mel.sample_rate:.3f} s; n_fft "
               f"{mel.n_fft}, hop {mel.hop_length})")
    listed = "; ".join(f"{c.id} ({c.path if c.path is not None else 'in memory'}): {n} samples at {sr} Hz"
                       for _, c, n, sr in short[:10]) + ("; ..." if len(short) > 10 else "")
    if not pad:
        raise ClipTooShortError(f"{len(short)} {what} clip(s) too short for the evaluation spectrogram, which needs "
                                f"{minimum}: {listed}. Pass --pad-short-clips (pad_short_clips=True) to zero-pad "
                                "them, or --seconds to pad/crop every clip")
    out = list(clips)
    for i, clip, _, _ in short:
        wav, sr = read_wav(clip, SilenceReport(0.0))  # as read: non-finite samples are flagged later
        target = -(-need * sr // mel.sample_rate)  # resampled to mel's rate: >= need samples
        out[i] = Clip(clip.id, list(clip.captions), list(clip.labels), clip.path,
                      torch.nn.functional.pad(wav, (0, target - wav.shape[-1])), sr, dict(clip.extra))
    log.warning("%d %s clip(s) shorter than the evaluation spectrogram needs (%s) are zero-padded: %s",
                len(short), what, minimum, listed)
    return out


def fit(
    wav: torch.Tensor, sr: int, target_sr: int, seconds: float | None
) -> torch.Tensor:
    """Resample to ``target_sr`` and, with ``seconds``, zero-pad or crop (from the start)."""
    wav = resample(wav, sr, target_sr)
    return pad_or_crop(wav, round(seconds * target_sr)) if seconds is not None else wav


def batches(clips: list[Clip], size: int) -> Iterator[list[Clip]]:
    for start in range(0, len(clips), size):
        yield clips[start : start + size]


def stack_by_length(
    wavs: list[torch.Tensor],
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Groups of equal-length waveforms: ``(indices, (b, T))`` (no padding between clips)."""
    groups: dict[int, list[int]] = {}
    for i, w in enumerate(wavs):
        groups.setdefault(w.shape[-1], []).append(i)
    for idx in groups.values():
        yield idx, torch.stack([wavs[i] for i in idx])
