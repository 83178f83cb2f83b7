"""``tta data {synth,manifest,check}``: command-line front-end of the data layer.

`main` takes the arguments after ``data`` and returns the process exit code (0 = success,
1 = the data has problems, 2 = bad usage or unreadable metadata).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tta.data.adapters import (
    ADAPTERS,
    DEFAULT_TEMPLATE,
    AdapterResult,
    MetadataError,
    build_manifest,
)
from tta.data.check import CheckReport, check_manifest
from tta.data.manifest import ManifestError, write_manifest
from tta.data.synth import STAMP, ensure_synth

log = logging.getLogger("tta.data")

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``tta data``."""
    parser = argparse.ArgumentParser(prog="tta data", description="Build, check and synthesise audio datasets.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic captioned dataset")
    p.add_argument("--out", type=Path, required=True, help="output folder (manifest.jsonl, classes.json, audio/)")
    p.add_argument("--n", type=int, default=300, help="number of clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--duration", type=float, default=4.0, help="clip length in seconds")
    p.add_argument("--zipf", type=float, default=1.0, help="class-frequency exponent (0 = uniform)")
    p.add_argument("--heldout", type=int, default=4, help="classes kept out of train/val/test")
    p.add_argument("--force", action="store_true", help="regenerate even if a matching dataset exists")

    p = sub.add_parser("manifest", help="turn a public dataset's metadata into a JSONL manifest")
    p.add_argument("--format", required=True, choices=sorted(ADAPTERS), dest="fmt")
    p.add_argument("--root", type=Path, required=True, help="dataset folder (wavcaps: a JSON file or folder)")
    p.add_argument("--out", type=Path, required=True, help="manifest path to write")
    p.add_argument("--audio-dir", type=Path, help="audio folder (audiocaps, clotho, wavcaps)")
    p.add_argument("--test-fold", type=int, help="esc50 (default 5) / us8k (default 10) test fold")
    p.add_argument("--val-fold", type=int, help="esc50 / us8k fold used as validation split")
    p.add_argument("--caption-template", default=DEFAULT_TEMPLATE, help="esc50 / us8k caption template")
    p.add_argument("--labels-from-dirs", action="store_true", help="folder: label clips by parent folder")
    p.add_argument("--split", help="folder / wavcaps: split name for every clip (default train)")
    p.add_argument("--strict", action="store_true", help="fail (exit 1, nothing written) if any audio is missing")

    p = sub.add_parser("check", help="validate the clips of a manifest")
    p.add_argument("manifest", type=Path)
    p.add_argument("--sample-rate", type=int, help="required sample rate")
    p.add_argument("--channels", type=int, help="required channel count")
    p.add_argument("--min-duration", type=float, help="minimum duration in seconds")
    p.add_argument("--header-only", action="store_true", help="do not decode samples (faster, no NaN check)")
    p.add_argument("--workers", type=int, default=1, help="threads reading files")
    p.add_argument("--examples", type=int, default=5, help="example ids shown per problem")
    return parser


def _adapter_options(args: argparse.Namespace) -> dict[str, object]:
    opts: dict[str, object] = {}
    if args.fmt in ("audiocaps", "clotho", "wavcaps") and args.audio_dir is not None:
        opts["audio_dir"] = args.audio_dir
    if args.fmt in ("esc50", "us8k"):
        if args.test_fold is not None:
            opts["test_fold"] = args.test_fold
        opts["val_fold"] = args.val_fold
        opts["template"] = args.caption_template
    if args.fmt in ("folder", "wavcaps") and args.split:
        opts["split"] = args.split
    if args.fmt == "folder":
        opts["labels_from_dirs"] = args.labels_from_dirs
    ignored = [
        flag for flag, value, fmts in (
            ("--audio-dir", args.audio_dir, ("audiocaps", "clotho", "wavcaps")),
            ("--test-fold", args.test_fold, ("esc50", "us8k")),
            ("--val-fold", args.val_fold, ("esc50", "us8k")),
            ("--labels-from-dirs", args.labels_from_dirs, ("folder",)),
            ("--split", args.split, ("folder", "wavcaps")),
        ) if value not in (None, False) and args.fmt not in fmts
    ]  # fmt: skip
    if ignored:
        raise ValueError(f"tta data manifest: {', '.join(ignored)} do(es) not apply to --format {args.fmt}")
    return opts


def _print_adapter_summary(console: Console, result: AdapterResult, out: Path | None) -> None:
    s = result.summary()
    table = Table(title=f"{s['format']} -> {out if out else '(not written)'}")
    table.add_column("count")
    table.add_column("value", justify="right")
    for key in ("rows", "items", "captions", "missing", "unreadable", "no_caption"):
        table.add_row(key, str(s[key]))
    for split, count in s["splits"].items():
        table.add_row(f"split {split}", str(count))
    console.print(table)


def _cmd_manifest(args: argparse.Namespace, console: Console) -> int:
    result = build_manifest(args.fmt, args.root, **_adapter_options(args))
    lost = result.missing + result.unreadable
    if lost and args.strict:
        _print_adapter_summary(console, result, None)
        log.error("--strict: %d clips have missing or unreadable audio; no manifest written", len(lost))
        return 1
    write_manifest(result.items, args.out)
    if lost:
        lost_path = args.out.with_name(args.out.name + ".missing.txt")
        lines = [f"{i}\tmissing\n" for i in result.missing] + [f"{i}\tunreadable\n" for i in result.unreadable]
        lost_path.write_text("".join(lines), encoding="utf-8")
        log.warning("%d clips left out of %s; their ids are listed in %s", len(lost), args.out, lost_path)
    _print_adapter_summary(console, result, args.out)
    return 0


def _print_check(console: Console, report: CheckReport, hard: set[str]) -> None:
    table = Table(title=f"{report.manifest}: {report.total} clips, {report.usable} usable")
    table.add_column("problem")
    table.add_column("clips", justify="right")
    table.add_column("makes unusable")
    table.add_column("examples")
    for problem, count, examples in report.rows():
        table.add_row(problem, str(count), "yes" if problem in hard else "no", examples)
    console.print(table)
    for clip_id in report.unusable[:10]:
        if clip_id in report.details:
            console.print(f"  {clip_id}: {report.details[clip_id]}")


def _cmd_check(args: argparse.Namespace, console: Console) -> int:
    report = check_manifest(
        args.manifest, sample_rate=args.sample_rate, channels=args.channels, min_duration=args.min_duration,
        read_samples=not args.header_only, max_examples=args.examples, workers=args.workers,
    )  # fmt: skip
    _print_check(console, report, set(report.blocking))
    if not report.ok:
        log.error("%d of %d clips are unusable", len(report.unusable), report.total)
        return 1
    return 0


def _cmd_synth(args: argparse.Namespace, console: Console) -> int:
    kwargs = dict(
        n=args.n, seed=args.seed, sample_rate=args.sample_rate, duration=args.duration, zipf=args.zipf,
        heldout=args.heldout,
    )  # fmt: skip
    if args.force:
        (args.out / STAMP).unlink(missing_ok=True)
    path = ensure_synth(args.out, **kwargs)
    console.print(f"synthetic dataset: {path} ({args.n} clips)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``tta data`` with ``argv`` (the arguments after ``data``); returns the exit code."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        if args.command == "synth":
            return _cmd_synth(args, console)
        if args.command == "manifest":
            return _cmd_manifest(args, console)
        return _cmd_check(args, console)
    except (ManifestError, MetadataError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
