"""``tta data {synth,manifest,check,shard,text-cache}``: command-line front-end of the data layer.

`main` takes the arguments after ``data`` and returns the process exit code (0 = success,
1 = the data has problems, 2 = bad usage or unreadable metadata).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tta.data.adapters import ADAPTERS, DEFAULT_TEMPLATE, AdapterResult, build_manifest
from tta.data.check import DEFAULT_SILENCE_THRESHOLD, CheckReport, check_manifest
from tta.data.manifest import write_manifest
from tta.data.synth import STAMP, ensure_synth
from tta.data.text_cache import T5_LENGTH
from tta.utils.errors import UsageError, check_float, check_int

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
    p.add_argument("--root", type=Path, required=True,
                   help="dataset folder (wavcaps: a JSON file or folder; jsonl-caption-label: the JSONL file)")
    p.add_argument("--out", type=Path, required=True, help="manifest path to write")
    p.add_argument("--audio-dir", type=Path, help="audio folder (audiocaps, clotho, wavcaps, jsonl-caption-label)")
    p.add_argument("--test-fold", type=int, help="esc50 (default 5) / us8k (default 10) test fold")
    p.add_argument("--val-fold", type=int, help="esc50 / us8k fold used as validation split")
    p.add_argument("--caption-template", default=DEFAULT_TEMPLATE, help="esc50 / us8k caption template")
    p.add_argument("--labels-from-dirs", action="store_true", help="folder: label clips by parent folder")
    p.add_argument("--split", help="folder / wavcaps: split name for every clip (default train)")
    p.add_argument("--strict", action="store_true", help="fail (exit 1, nothing written) if any audio is missing")
    p.add_argument("--path-field", help="jsonl-caption-label: field of the audio path (default path)")
    p.add_argument("--caption-field", help="jsonl-caption-label: field of the caption(s) (default caption)")
    p.add_argument("--label-field", help="jsonl-caption-label: field of the label(s) (default label)")
    p.add_argument("--audioset-segments", type=Path, action="append",
                   help="audiocaps: an AudioSet segment list (e.g. unbalanced_train_segments.csv; repeat for "
                        "several), for the clips' AudioSet labels")
    p.add_argument("--audioset-classes", type=Path, help="audiocaps: AudioSet's class_labels_indices.csv or ontology.json")

    p = sub.add_parser("check", help="validate the clips of a manifest")
    p.add_argument("manifest", type=Path)
    p.add_argument("--sample-rate", type=int, help="required sample rate")
    p.add_argument("--channels", type=int, help="required channel count")
    p.add_argument("--min-duration", type=float, help="minimum duration in seconds")
    p.add_argument("--header-only", action="store_true", help="do not decode samples (faster, no NaN check)")
    p.add_argument("--mel", default="audioldm",
                   help="mel preset the clips must be long enough for (default audioldm; 'none': not checked)")
    p.add_argument("--silence-threshold", type=float, default=DEFAULT_SILENCE_THRESHOLD,
                   help="peak at or below which a clip is silent (unusable; default %(default)g)")
    p.add_argument("--workers", type=int, default=1, help="threads reading files")
    p.add_argument("--examples", type=int, default=5, help="example ids shown per problem")

    p = sub.add_parser("shard", help="write WebDataset-layout tar shards of a manifest split (streaming training)")
    p.add_argument("--manifest", type=Path, required=True, help="JSONL manifest")
    p.add_argument("--out", type=Path, required=True, help="output folder (index.json, shard-NNNNNN.tar)")
    p.add_argument("--shard-size", type=int, default=1000, help="items per shard (default %(default)s)")
    p.add_argument("--split", default="train", help="manifest split to shard (default train; 'all': every item)")
    p.add_argument("--with", dest="with_", default="",
                   help="cached arrays, comma-separated: mel (whole-clip log-mels), latent (VAE posterior of the "
                        "fixed training segment; needs --vae and --segment-seconds), clap (CLAP text embedding of "
                        "every caption; needs --clap), clap_audio (CLAP audio embedding of the fixed training "
                        "segment; needs --clap and --segment-seconds), t5 (T5 token states and mask of every "
                        "caption at --t5-length tokens; needs --t5)")
    p.add_argument("--mel", default="audioldm", help="mel preset of the cached arrays and the length check")
    p.add_argument("--segment-seconds", type=float,
                   help="training segment of the latent / clap_audio caches (the datamodule's segment_seconds)")
    p.add_argument("--vae", type=Path, help="a `vae` checkpoint (tta fit) for --with latent")
    p.add_argument("--clap", type=Path, help="for --with clap / clap_audio: the model's CLAP, a `clap_trainer` "
                                             "checkpoint (its clap_checkpoint) or a LAION CLAP transformers folder")
    p.add_argument("--t5", type=Path, help="for --with t5: the model's local (Flan-)T5 folder (its t5_text path)")
    p.add_argument("--t5-length", type=int,
                   help=f"for --with t5: tokens per caption, the model's t5_text max_length (default {T5_LENGTH})")
    p.add_argument("--pad-short-clips", action="store_true", help="keep clips too short for the mel (zero-padded)")
    p.add_argument("--strict", action="store_true", help="fail (exit 1, nothing written) if any clip is unusable")
    p.add_argument("--force", action="store_true", help="replace the shards already in --out")

    p = sub.add_parser("text-cache", help="cache the T5 token states of a manifest's captions and reference "
                                          "captions (the audio / reference_audio datamodules' text_cache)")
    p.add_argument("--manifest", type=Path, required=True, help="JSONL manifest")
    p.add_argument("--t5", type=Path, help="the model's local (Flan-)T5 folder (its t5_text path); required")
    p.add_argument("--t5-length", type=int, default=T5_LENGTH,
                   help="tokens per caption, the model's t5_text max_length (default %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="output folder (index.json, captions.json, t5.npy, "
                                                           "t5_mask.npy)")
    p.add_argument("--split", default="all",
                   help="manifest split whose captions are cached (default all: every split the datamodule serves)")
    p.add_argument("--force", action="store_true", help="replace the cache already in --out")

    from tta.data.customize import add_customize_parser

    add_customize_parser(sub)
    return parser


def _adapter_options(args: argparse.Namespace) -> dict[str, object]:
    opts: dict[str, object] = {}
    jsonl = "jsonl-caption-label"
    if args.fmt in ("audiocaps", "clotho", "wavcaps", jsonl) and args.audio_dir is not None:
        opts["audio_dir"] = args.audio_dir
    if args.fmt == jsonl:
        opts.update({f"{name}_field": getattr(args, f"{name}_field") for name in ("path", "caption", "label")
                     if getattr(args, f"{name}_field") is not None})
    if args.fmt == "audiocaps" and (args.audioset_segments or args.audioset_classes):
        if not (args.audioset_segments and args.audioset_classes):
            raise UsageError("--audioset-segments and --audioset-classes go together")
        opts.update(audioset_segments=args.audioset_segments, audioset_classes=args.audioset_classes)
    if args.fmt in ("esc50", "us8k"):
        if args.test_fold is not None:
            opts["test_fold"] = args.test_fold
        opts["val_fold"] = args.val_fold
        opts["template"] = args.caption_template
    if args.fmt in ("folder", "wavcaps", jsonl) and args.split:
        opts["split"] = args.split
    if args.fmt == "folder":
        opts["labels_from_dirs"] = args.labels_from_dirs
    ignored = [
        flag for flag, value, fmts in (
            ("--audio-dir", args.audio_dir, ("audiocaps", "clotho", "wavcaps", jsonl)),
            ("--path-field", args.path_field, (jsonl,)),
            ("--caption-field", args.caption_field, (jsonl,)),
            ("--label-field", args.label_field, (jsonl,)),
            ("--test-fold", args.test_fold, ("esc50", "us8k")),
            ("--val-fold", args.val_fold, ("esc50", "us8k")),
            ("--labels-from-dirs", args.labels_from_dirs, ("folder",)),
            ("--audioset-segments", args.audioset_segments, ("audiocaps",)),
            ("--audioset-classes", args.audioset_classes, ("audiocaps",)),
            ("--split", args.split, ("folder", "wavcaps", jsonl)),
        ) if value not in (None, False) and args.fmt not in fmts
    ]  # fmt: skip
    if ignored:
        raise UsageError(f"{', '.join(ignored)} do(es) not apply to --format {args.fmt}")
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
            console.print(f"  {clip_id}: {report.details[clip_id]}", soft_wrap=True, markup=False, highlight=False)


def _cmd_check(args: argparse.Namespace, console: Console) -> int:
    from tta.data.mel import PRESETS

    if args.mel != "none" and args.mel not in PRESETS:
        raise UsageError(f"--mel: unknown preset {args.mel!r}; presets: {', '.join(sorted(PRESETS))}, none")
    check_float("--silence-threshold", args.silence_threshold, low=0.0)
    if args.min_duration is not None:
        check_float("--min-duration", args.min_duration, low=0.0)
    check_int("--workers", args.workers)
    report = check_manifest(
        args.manifest, sample_rate=args.sample_rate, channels=args.channels, min_duration=args.min_duration,
        read_samples=not args.header_only, max_examples=args.examples, workers=args.workers,
        mel=None if args.mel == "none" else args.mel, silence_threshold=args.silence_threshold,
    )  # fmt: skip
    _print_check(console, report, set(report.blocking))
    from tta.data.customize_refs import check_references

    references = check_references(args.manifest)  # DreamAudio items: every reference must be readable
    for problem in references:
        log.error("%s", problem)
    if not report.ok or references:
        log.error("%d of %d clips are unusable, %d references are unusable", len(report.unusable), report.total,
                  len(references))
        return 1
    return 0


def _cmd_synth(args: argparse.Namespace, console: Console) -> int:
    kwargs = dict(
        n=args.n, seed=args.seed, sample_rate=args.sample_rate, duration=args.duration, zipf=args.zipf,
        heldout=args.heldout,
    )  # fmt: skip
    if args.force:
        (args.out / STAMP).unlink(missing_ok=True)
    try:
        path = ensure_synth(args.out, **kwargs)
    except ValueError as exc:  # synthesize's only ValueError: its arguments, i.e. this command's flags
        raise UsageError(f"--n/--seed/--duration/--sample-rate/--zipf/--heldout: {exc}") from exc
    console.print(f"synthetic dataset: {path} ({args.n} clips)")
    return 0




def _cmd_shard(args: argparse.Namespace, console: Console) -> int:
    from tta.data.mel import PRESETS, MelConfig
    from tta.data.shards_sources import MODEL_ARRAYS, array_sources
    from tta.data.shards_write import write_shards

    shard_arrays = ("mel", *MODEL_ARRAYS)
    check_int("--shard-size", args.shard_size)
    wanted = [w.strip() for w in args.with_.split(",") if w.strip()]
    unknown = sorted(set(wanted) - set(shard_arrays))
    if unknown:
        raise UsageError(f"--with: unknown arrays {unknown}; choose from {', '.join(shard_arrays)}")
    if args.mel not in PRESETS:
        raise UsageError(f"--mel: unknown preset {args.mel!r}; presets: {', '.join(sorted(PRESETS))}")
    if args.segment_seconds is not None:
        check_float("--segment-seconds", args.segment_seconds, low=0.0, low_open=True)
    mel = MelConfig.preset(args.mel)
    if args.t5_length is not None:
        check_int("--t5-length", args.t5_length)
    sources = array_sources(wanted, mel, segment=args.segment_seconds is not None, vae=args.vae, clap=args.clap,
                            t5=args.t5, t5_length=args.t5_length)
    segment = None if args.segment_seconds is None else round(args.segment_seconds * mel.sample_rate) // mel.hop_length
    index = write_shards(args.manifest, args.out, shard_size=args.shard_size,
                         split=None if args.split == "all" else args.split, mel=mel, store_mel="mel" in wanted,
                         sources=sources, segment_frames=segment, pad_short_clips=args.pad_short_clips,
                         strict=args.strict, force=args.force)
    left = f", {len(index.skipped)} clips left out (see index.json)" if index.skipped else ""
    console.print(f"{index.total} items in {len(index.shards)} shards under {args.out}{left}")
    return 0


def _cmd_text_cache(args: argparse.Namespace, console: Console) -> int:
    from tta.data.text_cache import check_out, write_text_cache
    from tta.registry import get

    if args.t5 is None:
        raise UsageError("--t5 FOLDER is required (the model's local T5 / Flan-T5 folder)")
    if not args.t5.is_dir():
        raise UsageError(f"--t5 {args.t5}: no such folder")
    if not args.manifest.is_file():
        raise UsageError(f"--manifest {args.manifest}: no such file")
    length = check_int("--t5-length", args.t5_length)
    check_out(args.out, args.force)  # before loading the model
    sources = get("t5_tokens", "encoder")(args.t5, length)  # by name: tta/data imports no model
    cache = write_text_cache(args.manifest, args.out, sources, split=None if args.split == "all" else args.split,
                             force=args.force)
    console.print(f"{len(cache)} texts ({length} T5 tokens each) cached under {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``tta data`` with ``argv`` (the arguments after ``data``); returns the exit code.

    A refused input prints one line (`tta.utils.errors.run_guarded`): exit 2 for bad usage or a
    path that does not exist, 1 for bad data or metadata."""
    from tta.utils.errors import run_guarded
    from tta.utils.logs import setup_logging

    setup_logging()
    args = build_parser().parse_args(argv)
    console = Console()
    from tta.data.customize import run_customize

    commands = {"synth": _cmd_synth, "manifest": _cmd_manifest, "check": _cmd_check, "shard": _cmd_shard,
                "text-cache": _cmd_text_cache, "customize": lambda a, _console: run_customize(a)}
    return run_guarded(f"data {args.command}", lambda: commands[args.command](args, console))
