"""``tta eval``: score generated audio against references; writes ``eval.json`` and ``eval.md``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from tta.evaluation.core import DEFAULT_METRICS, METRICS
from tta.utils.errors import UsageError, check_float, check_int

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tta eval", description=__doc__)
    p.add_argument(
        "--generated",
        required=True,
        help="manifest (.jsonl) or folder of generated audio (id = file stem)",
    )
    p.add_argument(
        "--reference",
        required=True,
        help="manifest (.jsonl) or folder of reference audio",
    )
    p.add_argument(
        "--reference-split",
        default=None,
        help="only the items of this split of the reference manifest (e.g. test)",
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output folder for eval.json, eval.md and plots",
    )
    p.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help=f"comma-separated, from {', '.join(METRICS)} (default: %(default)s)",
    )
    p.add_argument(
        "--embedder",
        default="yamnet",
        help="FAD/KL/IS model: yamnet | cnn14:WEIGHTS | cnn14_16k:WEIGHTS | clap:CHECKPOINT | vggish:WEIGHTS[,pca=P][,output=M][,relu][,frames] (default: %(default)s)",
    )
    p.add_argument(
        "--clap",
        type=Path,
        default=None,
        help="clap_trainer checkpoint for clap / clap_a",
    )
    p.add_argument(
        "--melception",
        type=Path,
        default=None,
        help="mel_classifier checkpoint (tta fit) for mel_fid and mmkl: spectrogram FID and MMKL with the "
        "classifier standing in for the VQGAN paper's Melception",
    )
    p.add_argument(
        "--train-manifest",
        type=Path,
        default=None,
        help="manifest whose labels give class frequencies for the head/tail breakdown",
    )
    p.add_argument(
        "--seconds", type=float, default=None, help="pad/crop every clip to this length"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--fad-inf", action="store_true", help="also extrapolate FAD-inf")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="do not read/write cached reference FAD statistics",
    )
    p.add_argument(
        "--silence-threshold",
        type=float,
        default=1e-4,
        help="peak at or below which a clip is silent",
    )
    p.add_argument(
        "--pad-short-clips",
        action="store_true",
        help="zero-pad clips shorter than the evaluation spectrogram needs (default: refuse them by name)",
    )
    p.add_argument(
        "--fail-on-silent",
        action="store_true",
        help="exit with an error if a generated clip is silent",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale used for generation (recorded)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampling steps used for generation (recorded)",
    )
    p.add_argument("--device", default="cpu")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse, by name, thresholds and sizes that are not finite or out of range (a NaN silence
    threshold would disable the silence guard)."""
    check_float("--silence-threshold", args.silence_threshold, low=0.0)
    check_int("--batch-size", args.batch_size)
    if args.seconds is not None:
        check_float("--seconds", args.seconds, low=0.0, low_open=True)
    if args.guidance is not None:
        check_float("--guidance", args.guidance)
    if args.steps is not None:
        check_int("--steps", args.steps)


def main(argv: list[str]) -> int:
    """Entry point of ``tta eval``; returns the exit status."""
    args = build_parser().parse_args(argv)
    check_arguments(args)
    from tta.evaluation.core import evaluate
    from tta.metrics.embedders import CLAPAudioEmbedder, build_embedder

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    embedder = (
        build_embedder(args.embedder, device=args.device)
        if {"fad", "kl", "is"} & set(metrics)
        else None
    )
    clap = None
    if args.clap is not None:
        clap_embedder = CLAPAudioEmbedder.from_checkpoint(args.clap, device=args.device)
        clap = clap_embedder.model
        clap.weight_sha256 = clap_embedder.weight_hash
    melception = None
    if args.melception is not None:
        if not {"mel_fid", "mmkl"} & set(metrics):
            raise UsageError("--melception is only used by the metrics mel_fid and mmkl; add them to --metrics")
        from tta.metrics.melception import MelClassifierEmbedder

        melception = MelClassifierEmbedder.from_checkpoint(args.melception, device=args.device)
    extra = {
        k: v
        for k, v in (("guidance", args.guidance), ("steps", args.steps))
        if v is not None
    }
    report = evaluate(
        args.generated, args.reference, metrics, embedder=embedder, clap=clap, out_dir=args.out,
        protocol_extra=extra, train_manifest=args.train_manifest, seconds=args.seconds,
        batch_size=args.batch_size, silence_threshold=args.silence_threshold,
        fail_on_silent=args.fail_on_silent, pad_short_clips=args.pad_short_clips, fad_inf=args.fad_inf, cache_reference=not args.no_cache,
        reference_split=args.reference_split, melception=melception,
    )  # fmt: skip
    log.info("metrics: %s", json.dumps(report["metrics"], sort_keys=True))
    return 0
