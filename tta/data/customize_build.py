"""Rendering of DreamAudio customized items (Concatenation, Overlay, General) from base clips.

The pieces `tta.data.customize.build_customized` composes: the base clips of one split
(`SplitPool`: short clips, long clips), a clip loader at the target rate, and one function per
kind that draws an item from a per-item `numpy.random.Generator` and writes its audio. The rules
(grouping, padding/cropping, SNR) are documented in ``docs/dreamaudio_data.md``.

Audio is written as 16-bit PCM through `tta.data.audio.save_audio`. Each kind builds its
waveforms on the integer PCM grid (values ``k / 32767``), so what is written is exactly what was
computed: a concatenation item's audio equals its references' samples, and an overlay item's
audio is exactly its base component plus its scaled inserts.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tta.data.audio import load_audio, save_audio
from tta.data.customize_refs import REFERENCES_KEY, Reference, references_field
from tta.data.customize_text import clip_caption, join_captions, overlay_caption
from tta.data.manifest import ManifestItem

log = logging.getLogger(__name__)

__all__ = ["POWER_FLOOR", "Clip", "ClipLoader", "SplitPool", "concat_item", "general_item", "group_sizes",
           "overlay_item", "quantize"]

PCM = 32767.0
#: mean power (full scale = 1) below which a base segment or an inserted clip counts as silent
POWER_FLOOR = 1e-6
#: the peak an overlay mix is scaled down to when louder (keeps rounding inside 16 bits)
HEADROOM = 0.95
MAX_DRAWS = 32


@dataclass(frozen=True)
class Clip:
    """A base clip: its manifest item, line, length at the target rate and standing caption."""

    item: ManifestItem
    line: int
    frames: int
    caption: str


@dataclass
class SplitPool:
    """The base clips of one split: ``short`` (< the short threshold) and ``long`` (the others)."""

    split: str | None
    short: list[Clip] = field(default_factory=list)
    long: list[Clip] = field(default_factory=list)

    @property
    def clips(self) -> list[Clip]:
        """Every clip, in manifest order."""
        return sorted(self.short + self.long, key=lambda c: c.line)


@dataclass
class Built:
    """An item written by a kind's function plus its number of rejected draws."""

    item: ManifestItem
    rejected: int = 0


class ClipLoader:
    """Loads base clips mono at ``sample_rate`` (float64), keeping the most recently used ones in
    memory up to ``capacity`` samples in all."""

    def __init__(self, sample_rate: int, capacity: int = 1 << 25) -> None:
        self.sample_rate = sample_rate
        self.capacity = capacity
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._held = 0

    def __call__(self, clip: Clip) -> np.ndarray:
        key = str(clip.item.audio)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        wav, _ = load_audio(clip.item.audio, self.sample_rate)
        x = wav.numpy().astype(np.float64)
        if len(x) != clip.frames:
            raise RuntimeError(f"{clip.item.audio}: decoded {len(x)} samples at {self.sample_rate} Hz, "
                               f"its header announced {clip.frames}")
        self._cache[key] = x
        self._held += len(x)
        while self._held > self.capacity and len(self._cache) > 1:
            self._held -= len(self._cache.popitem(last=False)[1])
        return x


def quantize(x: np.ndarray) -> np.ndarray:
    """``x`` on the 16-bit PCM grid (``round(clip(x) * 32767)``, as float64 integers)."""
    return np.round(np.clip(x, -1.0, 1.0) * PCM)


def _write(path: Path, pcm: np.ndarray, sample_rate: int) -> Path:
    """Write integer PCM values ``pcm`` exactly (``save_audio`` maps ``k / 32767`` back to ``k``)."""
    return save_audio(path, pcm / PCM, sample_rate).absolute()


def group_sizes(m: int, k: int) -> list[int]:
    """Sizes of the reference groups of ``m`` consecutive clips for ``k`` references: ``k`` groups
    as even as possible (the first ones one clip larger) when ``m >= k``, else ``m`` single clips."""
    if m < 1 or k < 1:
        raise ValueError(f"group_sizes needs m >= 1 and k >= 1, got m={m}, k={k}")
    if m < k:
        return [1] * m
    return [m // k + (1 if j < m % k else 0) for j in range(k)]


def _labels(clips: list[Clip]) -> list[str]:
    return list(dict.fromkeys(label for c in clips for label in c.item.labels))


def _item(ident: str, audio: Path, caption: list[str], clips: list[Clip], target: int, sr: int, split: str | None,
          refs: list[Reference], out: Path, meta: dict[str, Any]) -> ManifestItem:  # fmt: skip
    extra = {REFERENCES_KEY: references_field(refs, out), "customize": meta}
    return ManifestItem(ident, audio, caption, _labels(clips), target / sr, sr, split, extra)


def _draw_group(pool: list[Clip], rng: np.random.Generator, target: int, max_clips: int, tries: int = 8) -> list[Clip]:
    """Distinct random clips whose lengths fit in ``target`` samples, drawn until ``max_clips`` or
    ``tries`` draws in a row did not fit."""
    chosen: list[int] = []
    free, misses = target, 0
    while len(chosen) < max_clips and misses < tries:
        j = int(rng.integers(len(pool)))
        if j in chosen or pool[j].frames > free:
            misses += 1
            continue
        chosen.append(j)
        free -= pool[j].frames
        misses = 0
    return [pool[j] for j in chosen]


def concat_item(ident: str, pool: SplitPool, rng: np.random.Generator, loader: ClipLoader, out: Path, target: int,
                refs: int, max_clips: int) -> Built:  # fmt: skip
    """A Concatenation item: short clips filling ``target`` samples back to back (zero tail), grouped
    into consecutive reference clips (`group_sizes`)."""
    sr = loader.sample_rate
    clips = _draw_group(pool.short, rng, target, max_clips)
    if not clips:
        raise ValueError(f"concat item {ident}: no short clip of split {pool.split!r} fits in {target} samples")
    pcm = [quantize(loader(c)) for c in clips]
    audio = np.zeros(target)
    audio[: sum(len(x) for x in pcm)] = np.concatenate(pcm)
    references: list[Reference] = []
    start = 0
    for j, size in enumerate(group_sizes(len(clips), refs)):
        group = clips[start : start + size]
        path = _write(out / "references" / f"{ident}_{j}.wav", np.concatenate(pcm[start : start + size]), sr)
        caption = join_captions([c.caption for c in group], rng)
        references.append(Reference(path, caption, tuple(c.item.id for c in group)))
        start += size
    caption = join_captions([c.caption for c in clips], rng)
    offsets = np.cumsum([0] + [len(x) for x in pcm[:-1]]).tolist()
    meta = {"kind": "concat", "sources": [c.item.id for c in clips],
            "segments": [[int(o), len(x)] for o, x in zip(offsets, pcm)]}  # fmt: skip
    path = _write(out / "audio" / f"{ident}.wav", audio, sr)
    return Built(_item(ident, path, [caption], clips, target, sr, pool.split, references, out, meta))


def _fit(x: np.ndarray, target: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """``x`` cropped at a random offset when longer than ``target``, right-padded with zeros when shorter."""
    if len(x) > target:
        offset = int(rng.integers(len(x) - target + 1))
        return x[offset : offset + target], offset
    return np.pad(x, (0, target - len(x))), 0


def general_item(ident: str, clip: Clip, split: str | None, rng: np.random.Generator, loader: ClipLoader, out: Path,
                 target: int) -> Built:  # fmt: skip
    """A General item: the clip padded/cropped to ``target`` samples, its own captions, no references."""
    audio, offset = _fit(quantize(loader(clip)), target, rng)
    path = _write(out / "audio" / f"{ident}.wav", audio, loader.sample_rate)
    captions = [c for c in clip.item.captions if c.strip()] or [clip.caption]
    meta = {"kind": "general", "sources": [clip.item.id], "offset": offset}
    return Built(_item(ident, path, captions, [clip], target, loader.sample_rate, split, [], out, meta))


def _pick(pool: list[Clip], rng: np.random.Generator, exclude: Clip | None = None) -> Clip:
    while True:
        clip = pool[int(rng.integers(len(pool)))]
        if clip is not exclude:
            return clip


def _draw_overlay(pool: SplitPool, rng: np.random.Generator, loader: ClipLoader, target: int,
                  snr_db: tuple[float, float]) -> dict[str, Any] | None:  # fmt: skip
    """One draw of an overlay item (float waveforms and placement), or None when rejected (a silent
    base segment or inserted clip, or a clip longer than its half)."""
    base_clip, half = _pick(pool.long, rng), target // 2
    front = _pick(pool.short, rng)
    back = _pick(pool.short, rng, exclude=front)
    base, offset = _fit(loader(base_clip), target, rng)
    inserts = []
    for role, clip, lo, hi in (("front", front, 0, half), ("back", back, half, target)):
        x = loader(clip)
        if len(x) > hi - lo:
            return None
        start = lo + int(rng.integers(hi - lo - len(x) + 1))
        snr = round(float(rng.uniform(*snr_db)), 3)
        p_base, p_clip = float(np.mean(base[start : start + len(x)] ** 2)), float(np.mean(x**2))
        if p_base < POWER_FLOOR or p_clip < POWER_FLOOR:
            return None
        gain = np.sqrt(p_base / (p_clip * 10.0 ** (snr / 10.0)))
        inserts.append({"role": role, "clip": clip, "x": x, "start": start, "snr_db": snr, "gain": gain})
    return {"base_clip": base_clip, "base": base, "offset": offset, "inserts": inserts}


def overlay_item(ident: str, pool: SplitPool, rng: np.random.Generator, loader: ClipLoader, out: Path, target: int,
                 snr_db: tuple[float, float]) -> Built:  # fmt: skip
    """An Overlay item: a long base clip fitted to ``target`` samples with a "front" short clip
    inserted in the first half and a "back" one in the second, each at an SNR drawn from ``snr_db``
    (base power over the inserted segment / inserted power). The mix is scaled down as a whole to
    a peak of `HEADROOM` when louder; the scaled base is written as ``components/<id>_base.wav``."""
    sr = loader.sample_rate
    rejected = 0
    while (draw := _draw_overlay(pool, rng, loader, target, snr_db)) is None:
        rejected += 1
        if rejected >= MAX_DRAWS:
            raise ValueError(f"overlay item {ident}: {MAX_DRAWS} draws from split {pool.split!r} all put a clip "
                             f"on a silent base segment (power < {POWER_FLOOR:g}) or drew a silent clip")
    mix = draw["base"].copy()
    for ins in draw["inserts"]:
        mix[ins["start"] : ins["start"] + len(ins["x"])] += ins["gain"] * ins["x"]
    scale = min(1.0, HEADROOM / float(np.max(np.abs(mix))))
    base = quantize(scale * draw["base"])
    audio = base.copy()
    references, records = [], []
    for ins in draw["inserts"]:
        clip, x, start = ins["clip"], ins["x"], ins["start"]
        audio[start : start + len(x)] += quantize(scale * ins["gain"] * x)
        path = _write(out / "references" / f"{ident}_{ins['role']}.wav", quantize(x), sr)
        references.append(Reference(path, clip.caption, (clip.item.id,)))
        records.append({"role": ins["role"], "source": clip.item.id, "start": start, "length": len(x),
                        "snr_db": ins["snr_db"], "gain": float(scale * ins["gain"])})  # fmt: skip
    base_path = _write(out / "components" / f"{ident}_base.wav", base, sr)
    path = _write(out / "audio" / f"{ident}.wav", audio, sr)
    front, back = references
    caption = overlay_caption(front.caption, back.caption, draw["base_clip"].caption, rng)
    meta = {"kind": "overlay", "sources": [draw["base_clip"].item.id, front.sources[0], back.sources[0]],
            "base": {"source": draw["base_clip"].item.id, "audio": base_path.relative_to(out).as_posix(),
                     "offset": draw["offset"]},
            "inserts": records}  # fmt: skip
    clips = [draw["base_clip"]] + [ins["clip"] for ins in draw["inserts"]]
    return Built(_item(ident, path, [caption], clips, target, sr, pool.split, references, out, meta), rejected)


def make_clip(item: ManifestItem, line: int, frames: int) -> Clip:
    """A `Clip` with its standing caption (`clip_caption`)."""
    return Clip(item, line, frames, clip_caption(item))
