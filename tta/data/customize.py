"""DreamAudio customized datasets (paper section IV-B): ``tta data customize``.

From any base manifest, `build_customized` writes a folder with ``manifest.jsonl`` whose items
carry reference concepts in the ``references`` field (`tta.data.customize_refs`):

- ``concat`` (Customized-Concatenation): short clips concatenated to the target length, grouped
  into ``refs`` reference clips;
- ``overlay`` (Customized-Overlay): a base clip plus a "front" and a "back" short clip mixed at
  random SNRs;
- ``general``: ordinary items (clip padded/cropped to the target length), empty references.

Every item and its references come from base clips of ONE split, and keep that split. The output
is a pure function of the base manifest, its audio and the arguments (byte-identical files). The
folder layout and all rules are in ``docs/dreamaudio_data.md``; the training-time reference
masking/dropping are in `tta.data.customize_augment`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tta.data.audio import audio_info
from tta.data.customize_build import Built, ClipLoader, SplitPool, concat_item, general_item, make_clip, overlay_item
from tta.data.customize_refs import manifest_lines
from tta.data.customize_text import CaptionError
from tta.data.manifest import ManifestError, write_manifest
from tta.utils.errors import UsageError, check_float, check_int
from tta.utils.files import atomic_dir

log = logging.getLogger(__name__)

__all__ = ["KINDS", "CustomizeConfig", "add_customize_parser", "build_customized", "load_pools", "run_customize"]

KINDS = ("concat", "overlay", "general")
SUMMARY = "customize.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CustomizeConfig:
    """What to build. ``n`` items per split; ``splits`` None = every split of the base manifest."""

    kind: str
    n: int
    seed: int = 0
    refs: int = 3
    seconds: float = 10.0
    max_short: float = 5.0
    max_clips: int = 5
    sample_rate: int = 16000
    snr_db: tuple[float, float] = (-15.0, 15.0)
    splits: tuple[str, ...] | None = None

    def validate(self) -> None:
        """Raise `UsageError` naming the first invalid argument."""
        if self.kind not in KINDS:
            raise UsageError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        check_int("n", self.n)
        check_int("seed", self.seed, minimum=0)
        check_int("refs", self.refs)
        check_int("max_clips", self.max_clips)
        check_int("sample_rate", self.sample_rate, minimum=1000)
        seconds = check_float("seconds", self.seconds, low=0.0, low_open=True)
        limit = seconds / 2 if self.kind == "overlay" else seconds
        why = "half the target length: front and back clips each fit in one half" if self.kind == "overlay" else (
            "the target length")
        check_float("max_short", self.max_short, low=0.0, high=limit, low_open=True, what_high=why)
        lo, hi = (check_float(f"snr_db[{j}]", v) for j, v in enumerate(self.snr_db))
        if lo > hi:
            raise UsageError(f"snr_db must be (low, high) with low <= high, got {self.snr_db}")
        if self.splits is not None and not self.splits:
            raise UsageError("splits must name at least one split (or be None for all)")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_pools(base: str | os.PathLike, config: CustomizeConfig) -> dict[str | None, SplitPool]:
    """The base clips grouped by split (only ``config.splits`` when given), each split's clips
    divided into short (header duration < ``max_short``) and long ones.

    Raises `ManifestError` for a clip with neither captions nor labels, `AudioLoadError` for an
    unreadable clip and `UsageError` for a requested split the base manifest lacks."""
    base = Path(base)
    pools: dict[str | None, SplitPool] = {}
    for line, item in manifest_lines(base):
        if config.splits is not None and item.split not in config.splits:
            continue
        info = audio_info(item.audio)
        frames = -(-info.frames * config.sample_rate // info.sample_rate)  # torchaudio's resampled length
        try:
            clip = make_clip(item, line, frames)
        except CaptionError as exc:
            raise ManifestError(base, line, str(exc), "captions") from exc
        pool = pools.setdefault(item.split, SplitPool(item.split))
        (pool.short if info.duration < config.max_short else pool.long).append(clip)
    missing = [s for s in config.splits or () if s not in pools]
    if missing:
        have = sorted(str(s) for s in {i.split for _, i in manifest_lines(base)})
        raise UsageError(f"{base}: no clips of split(s) {missing} (its splits: {', '.join(have) or 'none'})")
    return dict(sorted(pools.items(), key=lambda kv: str(kv[0])))


def _check_pool(pool: SplitPool, config: CustomizeConfig, base: Path) -> None:
    need = {"concat": [("short", 1)], "overlay": [("short", 2), ("long", 1)], "general": []}[config.kind]
    for name, count in need:
        if len(getattr(pool, name)) < count:
            rule = f"< {config.max_short:g} s" if name == "short" else f">= {config.max_short:g} s"
            raise UsageError(f"{base}: split {pool.split!r} has {len(getattr(pool, name))} {name} clips ({rule}); "
                             f"--kind {config.kind} needs at least {count} (choose --split / --max-short)")


def _item_rng(config: CustomizeConfig, split: str | None, *extra: int) -> np.random.Generator:
    key = zlib.crc32(str(split).encode("utf-8"))
    return np.random.default_rng([config.seed, KINDS.index(config.kind), key, *extra])


def _build_split(pool: SplitPool, config: CustomizeConfig, loader: ClipLoader, out: Path) -> list[Built]:
    target = round(config.seconds * config.sample_rate)
    tag = "nosplit" if pool.split is None else pool.split
    built: list[Built] = []
    if config.kind == "general":  # every clip once per cycle, in a fresh random order each cycle
        clips = pool.clips
        order_rng = _item_rng(config, pool.split)
        order = np.concatenate([order_rng.permutation(len(clips)) for _ in range(-(-config.n // len(clips)))])
    for i in range(config.n):
        ident, rng = f"{config.kind}_{tag}_{i:06d}", _item_rng(config, pool.split, i)
        if config.kind == "concat":
            built.append(concat_item(ident, pool, rng, loader, out, target, config.refs, config.max_clips))
        elif config.kind == "overlay":
            built.append(overlay_item(ident, pool, rng, loader, out, target, config.snr_db))
        else:
            built.append(general_item(ident, clips[int(order[i])], pool.split, rng, loader, out, target))
    return built


def build_customized(base: str | os.PathLike, out: str | os.PathLike, config: CustomizeConfig) -> Path:
    """Write ``config.n`` customized items per split of ``base`` into the new folder ``out``
    (``manifest.jsonl``, ``audio/``, ``references/``, ``components/`` for overlay, ``customize.json``).

    ``out`` must not exist or be empty; it appears complete or not at all. Returns the manifest
    path. Raises `UsageError` for bad arguments or a split too small for ``config.kind``."""
    config.validate()
    base, out = Path(base), Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"output folder {out} exists and is not empty; choose a new --out")
    pools = load_pools(base, config)
    for pool in pools.values():
        _check_pool(pool, config, base)
    loader = ClipLoader(config.sample_rate)
    with atomic_dir(out) as tmp:
        built = [b for pool in pools.values() for b in _build_split(pool, config, loader, tmp)]
        write_manifest([b.item for b in built], tmp / "manifest.jsonl")
        rejected = sum(b.rejected for b in built)
        summary = {
            "version": FORMAT_VERSION, "config": asdict(config), "base": str(base), "base_sha256": _sha256(base),
            "items": {str(p.split): config.n for p in pools.values()}, "rejected_draws": rejected,
        }  # fmt: skip
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if rejected:
        log.info("overlay: %d draws rejected (a silent base segment or a silent clip) and redrawn", rejected)
    log.info("%s: %d %s items from %s (splits: %s)", out / "manifest.jsonl", len(built), config.kind, base,
             ", ".join(str(s) for s in pools))
    return out / "manifest.jsonl"


def add_customize_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``customize`` to the ``tta data`` subcommands; returns its parser."""
    p = subparsers.add_parser("customize", help="build a DreamAudio customized dataset from a base manifest",
                              description="Build a DreamAudio customized dataset (docs/dreamaudio_data.md).")
    p.add_argument("--base", type=Path, required=True, help="base manifest (captions and/or labels)")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--out", type=Path, required=True, help="new output folder")
    p.add_argument("--n", type=int, required=True, help="items per split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refs", type=int, default=3, help="concat: reference clips per item (K)")
    p.add_argument("--seconds", type=float, default=10.0, help="target length in seconds")
    p.add_argument("--split", action="append", dest="splits", metavar="SPLIT",
                   help="base split to build from (repeatable; default: every split)")
    p.add_argument("--max-short", type=float, default=5.0, help="short clips are shorter than this (s)")
    p.add_argument("--max-clips", type=int, default=5, help="concat: most clips per item")
    p.add_argument("--sample-rate", type=int, default=16000, help="output sample rate")
    p.add_argument("--snr", type=float, nargs=2, default=(-15.0, 15.0), metavar=("LOW", "HIGH"),
                   help="overlay: SNR range in dB (base over inserted clip)")
    return p


def run_customize(args: argparse.Namespace) -> int:
    """Run ``tta data customize`` from parsed ``args``; returns 0 (errors raise, with a message
    naming the argument, file or line)."""
    config = CustomizeConfig(
        kind=args.kind, n=args.n, seed=args.seed, refs=args.refs, seconds=args.seconds, max_short=args.max_short,
        max_clips=args.max_clips, sample_rate=args.sample_rate, snr_db=tuple(args.snr),
        splits=None if args.splits is None else tuple(args.splits),
    )  # fmt: skip
    path = build_customized(args.base, args.out, config)
    log.info("customized dataset: %s", path)
    return 0
