"""`evaluate`: the metrics of ``tta eval`` on a generated and a reference set.

Two passes over the data (generated, then reference) feed the `torchmetrics` metrics of
`tta.metrics`; paired metrics (KL, CLAP_A, PSNR) pair by id at the end. The returned dict (also
``eval.json``) records the protocol: embedding model and weight hash, sample rates and
resampler, crop/pad length, clip counts, CLAP model, guidance/steps when known.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tta import __version__
from tta.data.mel import MelConfig, MelFrontend
from tta.evaluation.buckets import breakdown
from tta.evaluation.clips import (
    RESAMPLER,
    Clip,
    SilenceReport,
    SilentGenerationError,
    batches,
    check_lengths,
    check_pairing,
    fit,
    load_clips,
    read_wav,
    stack_by_length,
)  # fmt: skip
from tta.evaluation.melception import NEEDS_MELCEPTION, MelceptionScores
from tta.metrics.clap_score import CLAPAudioScore, CLAPScore
from tta.metrics.classifier import InceptionScore, KLDivergence
from tta.metrics.embedders import Embedder
from tta.metrics.fad import FrechetAudioDistance, GaussianStats
from tta.metrics.melception import MelClassifierEmbedder
from tta.metrics.spectrogram import SpectrogramFID, SpectrogramPSNR

log = logging.getLogger(__name__)

METRICS = ("fad", "kl", "is", "clap", "clap_a", "psnr", "spec_fid", "mel_fid", "mmkl")
DEFAULT_METRICS = ("fad", "kl", "is", "clap")
PAIRED = {"kl", "clap_a", "psnr", "mmkl"}
NEEDS_EMBEDDER = {"fad", "kl", "is"}
NEEDS_CLAP = {"clap", "clap_a"}
SPEC_PRESET = "audioldm"


def _cache_root() -> Path:
    return Path(
        os.environ.get("TTA_CACHE", Path.home() / ".cache" / "tta")
    ).expanduser()


def reference_key(
    ref: list[Clip], embedder: Embedder, seconds: float | None
) -> str | None:
    """Cache key of reference FAD statistics (None for in-memory clips)."""
    if any(c.path is None for c in ref):
        return None
    digest = hashlib.sha256(
        json.dumps([embedder.describe(), seconds], sort_keys=True).encode()
    )
    for c in sorted(ref, key=lambda c: c.id):
        st = c.path.stat()
        digest.update(
            f"{c.id}\0{c.path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
        )
    return digest.hexdigest()


def _clap_info(clap: Any) -> dict[str, Any]:
    from tta.metrics.embedders import state_dict_sha256

    return {
        "class": type(clap).__name__, "audio_encoder": type(clap.audio_encoder).__name__,
        "text_encoder": type(clap.text_encoder).__name__, "joint_dim": int(clap.joint_dim),
        "sample_rate": int(clap.sample_rate), "weight_sha256": getattr(clap, "weight_sha256", None) or state_dict_sha256(clap),
    }  # fmt: skip


def _known(clips: list[Clip], *keys: str) -> Any:
    """The value of the first of ``keys`` found in the clips' extra fields, or in their
    ``generation`` record (as `tta generate` writes it); a sorted list if they differ."""
    fields = [{**(c.extra.get("generation") or {}), **c.extra} for c in clips]
    values = sorted({json.dumps(f[k]) for f in fields for k in keys if k in f})
    if not values:
        return None
    return (
        json.loads(values[0]) if len(values) == 1 else [json.loads(v) for v in values]
    )


def references_protocol(clips: list[Clip]) -> dict[str, Any] | None:
    """What conditioned the generated clips besides their prompts: the reference clips of a
    customized set (``generation.references`` rows of `tta generate --manifest`), summarised for the
    protocol (items with references, references per item, distinct clips, and a SHA-256 of the
    sorted (id, audio, caption) triples so two evaluations can be told apart); None without any."""
    rows = [(c.id, (c.extra.get("generation") or {}).get("references") or []) for c in clips]
    rows = [(i, refs) for i, refs in rows if refs and isinstance(refs, list)]
    if not rows:
        return None
    triples = sorted((i, str(r.get("audio")), str(r.get("caption"))) for i, refs in rows for r in refs)
    return {
        "items_with_references": len(rows),
        "references_per_item": sorted({len(refs) for _, refs in rows}),
        "distinct_reference_clips": len({a for _, a, _ in triples}),
        "sha256": hashlib.sha256(json.dumps(triples).encode("utf-8")).hexdigest(),
    }


class _Run:
    """State of one evaluation (metrics, examples, silence flags)."""

    def __init__(self, metrics: set[str], embedder: Embedder | None, clap: Any, seconds: float | None,
                 batch_size: int, silence: SilenceReport, ref_stats: GaussianStats | None, fad_inf: bool,
                 is_splits: int, n_examples: int, melception: MelClassifierEmbedder | None = None) -> None:  # fmt: skip
        self.metrics, self.embedder, self.clap = metrics, embedder, clap
        self.melception = MelceptionScores(melception, metrics, seconds) if metrics & NEEDS_MELCEPTION else None
        self.seconds, self.batch_size, self.silence = seconds, batch_size, silence
        self.spec = MelFrontend(SPEC_PRESET)
        self.fad = (
            FrechetAudioDistance(reference_stats=ref_stats, infinity=fad_inf)
            if "fad" in metrics
            else None
        )
        self.kl = (
            {v: KLDivergence(v) for v in ("softmax", "sigmoid")}
            if "kl" in metrics
            else {}
        )
        self.inception = InceptionScore(is_splits) if "is" in metrics else None
        self.clap_score = CLAPScore() if "clap" in metrics else None
        self.clap_a = CLAPAudioScore() if "clap_a" in metrics else None
        self.psnr = SpectrogramPSNR() if "psnr" in metrics else None
        self.spec_fid = SpectrogramFID() if "spec_fid" in metrics else None
        self.gen_specs: dict[str, torch.Tensor] = {}
        self.n_examples = n_examples
        self.examples: dict[str, dict[str, torch.Tensor]] = {}
        self.fad_details: dict[str, Any] | None = None

    @torch.no_grad()
    def feed(
        self,
        clips: list[Clip],
        real: bool,
        captions: dict[str, str],
        need_embedder: bool,
    ) -> None:
        loaded = []
        for clip in clips:
            wav, sr = read_wav(clip, None if real else self.silence)
            if not real and not self.silence.check(clip.id, wav):
                continue
            if real and clip.id in self.silence.flagged:
                loaded.append(
                    (clip, wav, sr, False)
                )  # reference of a flagged clip: FAD/FID only
                continue
            loaded.append((clip, wav, sr, True))
        if not loaded:
            return
        ids = [c.id for c, *_ in loaded]
        paired_ok = [p for *_, p in loaded]
        if need_embedder and self.embedder is not None:
            self._embed(loaded, ids, paired_ok, real)
        if self.clap is not None and (
            self.clap_score is not None and not real or self.clap_a is not None
        ):
            self._clap(loaded, ids, paired_ok, real, captions)
        if self.psnr is not None or self.spec_fid is not None or self.n_examples:
            self._spectrograms(loaded, ids, paired_ok, real)
        if self.melception is not None:
            self.melception.feed(loaded, ids, paired_ok, real)

    def _for_model(
        self, loaded: list[tuple[Any, ...]], sr_out: int
    ) -> list[torch.Tensor]:
        return [fit(wav, sr, sr_out, self.seconds) for _, wav, sr, _ in loaded]

    def _embed(
        self, loaded: list[tuple[Any, ...]], ids: list[str], ok: list[bool], real: bool
    ) -> None:
        for idx, wav in stack_by_length(
            self._for_model(loaded, self.embedder.sample_rate)
        ):
            if getattr(self.embedder, "fad_frames", False):  # FAD over frames: no pooled embedding needed
                emb = self.embedder.frame_embed(wav)
                logits = self.embedder.classify(wav) if self.embedder.has_classifier else None
            else:
                emb, logits = self.embedder.embed_and_classify(wav)
            sub = [ids[i] for i in idx]
            if self.fad is not None and (not real or self.fad.reference_stats is None):
                self.fad.update(emb, sub, real=real)
            if logits is None:
                continue
            keep = [j for j, i in enumerate(idx) if ok[i]]
            for metric in self.kl.values():
                if keep:
                    metric.update(logits[keep], [sub[j] for j in keep], real=real)
            if self.inception is not None and not real:
                self.inception.update(logits, sub)

    def _clap(self, loaded: list[tuple[Any, ...]], ids: list[str], ok: list[bool], real: bool,
              captions: dict[str, str]) -> None:  # fmt: skip
        for idx, wav in stack_by_length(self._for_model(loaded, self.clap.sample_rate)):
            keep = [j for j, i in enumerate(idx) if ok[i]]
            if not keep:
                continue
            sub = [ids[idx[j]] for j in keep]
            device = next(self.clap.parameters()).device
            emb = self.clap.embed_audio(wav[keep].to(device)).float().cpu()
            if self.clap_score is not None and not real:
                text = self.clap.embed_text([captions[i] for i in sub]).float().cpu()
                self.clap_score.update(emb, text, sub)
            if self.clap_a is not None:
                self.clap_a.update(emb, sub, real=real)

    def _spectrograms(
        self, loaded: list[tuple[Any, ...]], ids: list[str], ok: list[bool], real: bool
    ) -> None:
        for idx, wav in stack_by_length(self._for_model(loaded, self.spec.sample_rate)):
            mels = self.spec(wav.float())
            sub = [ids[i] for i in idx]
            if self.spec_fid is not None:
                self.spec_fid.update(mels, sub, real=real)
            for j, i in enumerate(idx):
                clip_id = ids[i]
                if not real and len(self.examples) < self.n_examples:
                    self.examples[clip_id] = {"generated": mels[j]}
                elif real and clip_id in self.examples:
                    self.examples[clip_id]["reference"] = mels[j]
                if self.psnr is None or not ok[i]:
                    continue
                if not real:
                    self.gen_specs[clip_id] = mels[j]
                else:
                    self.psnr.update(
                        self.gen_specs.pop(clip_id)[None], mels[j][None], [clip_id]
                    )

    def results(self) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
        out: dict[str, Any] = {}
        per_item: dict[str, dict[str, float]] = {}

        def items(name: str, metric: Any) -> None:
            ids, values = metric.per_item()
            for i, v in zip(ids, values.tolist()):
                per_item.setdefault(i, {})[name] = v

        if self.fad is not None:
            self.fad_details = self.fad.details()
            out.update(
                {
                    k: self.fad_details[k]
                    for k in ("fad", "fad_inf")
                    if k in self.fad_details
                }
            )
        for variant, metric in self.kl.items():
            out[f"kl_{variant}"] = float(metric.compute())
            items(f"kl_{variant}", metric)
        if self.inception is not None:
            mean, std = self.inception.compute()
            out["is"], out["is_std"] = float(mean), float(std)
        for name, metric in (
            ("clap_score", self.clap_score),
            ("clap_a", self.clap_a),
            ("psnr", self.psnr),
        ):
            if metric is not None:
                out[name] = float(metric.compute())
                items(name, metric)
        if self.spec_fid is not None:
            out["spec_fid"] = float(self.spec_fid.compute())
        if self.melception is not None:
            out.update(self.melception.results(per_item))
        return out, per_item


def evaluate(
    generated: str | os.PathLike | Sequence[Clip], reference: str | os.PathLike | Sequence[Clip],
    metrics: Sequence[str] = DEFAULT_METRICS, embedder: Embedder | None = None, clap: Any | None = None,
    out_dir: str | os.PathLike | None = None, protocol_extra: dict[str, Any] | None = None, *,
    train_manifest: str | os.PathLike | None = None, seconds: float | None = None, batch_size: int = 16,
    silence_threshold: float = 1e-4, fail_on_silent: bool = False, fad_inf: bool = False,
    cache_reference: bool = True, is_splits: int = 10, n_examples: int = 3, reference_split: str | None = None,
    melception: MelClassifierEmbedder | None = None, pad_short_clips: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Score ``generated`` against ``reference`` and return the report dict (see docs/evaluation.md).

    ``generated``/``reference``: a manifest, a folder of audio or a list of `Clip`. ``embedder``
    defaults to YAMNet for FAD/KL/IS; ``clap`` (a `CLAP` network) is needed for ``clap`` and
    ``clap_a``; ``melception`` (a mel classifier, `MelClassifierEmbedder`) for ``mel_fid`` and
    ``mmkl``. ``reference_split``: only that split of a reference manifest (e.g. ``test``, to
    pair with `tta generate --manifest --split test`). ``seconds`` pads/crops every clip (None:
    native lengths). Clips shorter than the spectrogram front-end analyses are refused by name
    (`check_lengths`: `ClipTooShortError`), or zero-padded to its minimum with ``pad_short_clips``.
    With ``out_dir`` writes
    ``eval.json``, ``eval.md`` and PNG plots. Silent/non-finite generated clips are flagged and left
    out; ``fail_on_silent`` raises `SilentGenerationError` instead.
    """
    t0 = time.time()
    wanted = list(dict.fromkeys(metrics))
    unknown = [m for m in wanted if m not in METRICS]
    if unknown or not wanted:
        raise ValueError(
            f"unknown metrics {unknown or '(none given)'}; metrics: {', '.join(METRICS)}"
        )
    if set(wanted) & NEEDS_EMBEDDER and embedder is None:
        from tta.metrics.embedders import YAMNetEmbedder

        embedder = YAMNetEmbedder()
    if ("kl" in wanted or "is" in wanted) and not embedder.has_classifier:
        raise ValueError(
            f"KL and IS need a classifier; embedder {embedder.name!r} has none"
        )
    if set(wanted) & NEEDS_CLAP and clap is None:
        raise ValueError(
            f"metrics {sorted(set(wanted) & NEEDS_CLAP)} need a CLAP model (--clap CHECKPOINT)"
        )
    if set(wanted) & NEEDS_MELCEPTION and melception is None:
        raise ValueError(f"metrics {sorted(set(wanted) & NEEDS_MELCEPTION)} need a mel classifier "
                         "(--melception CHECKPOINT, a mel_classifier checkpoint)")  # fmt: skip
    gen = load_clips(generated, "generated")
    ref = load_clips(reference, "reference", reference_split)
    if {"psnr", "spec_fid"} & set(wanted) or n_examples:  # the spectrogram's STFT needs a minimum length
        gen = check_lengths(gen, "generated", MelConfig.preset(SPEC_PRESET), seconds, pad_short_clips)
        ref = check_lengths(ref, "reference", MelConfig.preset(SPEC_PRESET), seconds, pad_short_clips)
    if set(wanted) & PAIRED:
        check_pairing(gen, ref)
    ref_by_id = {c.id: c for c in ref}
    captions: dict[str, str] = {}
    for c in gen:
        caps = c.captions or (ref_by_id[c.id].captions if c.id in ref_by_id else [])
        if caps:
            captions[c.id] = caps[0]
    if "clap" in wanted:
        missing = [c.id for c in gen if c.id not in captions]
        if missing:
            raise ValueError(
                f"CLAP score needs a prompt per generated clip; none for {', '.join(missing[:10])}"
            )

    ref_stats, key, cache_file = None, None, None
    if "fad" in wanted and cache_reference:
        key = reference_key(ref, embedder, seconds)
        cache_file = _cache_root() / "fad_stats" / f"{key}.pt" if key else None
        if cache_file is not None and cache_file.is_file():
            ref_stats = GaussianStats.load(cache_file)
            log.info("reference FAD statistics from cache %s", cache_file)
    silence = SilenceReport(silence_threshold)
    run = _Run(
        set(wanted),
        embedder,
        clap,
        seconds,
        batch_size,
        silence,
        ref_stats,
        fad_inf,
        is_splits,
        n_examples,
        melception,
    )
    need_ref_embed = bool({"kl"} & set(wanted)) or (
        "fad" in wanted and ref_stats is None
    )
    for batch in batches(gen, batch_size):
        run.feed(batch, False, captions, need_embedder=True)
    if silence.flagged:
        shown = ", ".join(f"{k} ({v})" for k, v in list(silence.flagged.items())[:10])
        log.warning(
            "%d generated clips are silent or non-finite and are not scored: %s",
            len(silence.flagged),
            shown,
        )
        if fail_on_silent:
            raise SilentGenerationError(
                f"{len(silence.flagged)} generated clips are silent or non-finite: {shown}"
            )
    if len(silence.flagged) == len(gen):
        raise SilentGenerationError(
            f"all {len(gen)} generated clips are silent or non-finite; nothing to score"
        )
    for batch in batches(ref, batch_size):
        run.feed(batch, True, captions, need_embedder=need_ref_embed)
    scores, per_item = run.results()
    if cache_file is not None and ref_stats is None and run.fad is not None:
        stats = run.fad.reference()
        stats.meta = {"key": key, "embedder": embedder.describe(), "seconds": seconds}
        stats.save(cache_file)

    labels = {
        c.id: (
            ref_by_id[c.id].labels
            if c.id in ref_by_id and ref_by_id[c.id].labels
            else c.labels
        )
        for c in gen
    }
    count_source = train_manifest if train_manifest is not None else None
    buckets = (
        breakdown(per_item, labels, count_source, ref, run.fad, silence.flagged)
        if any(labels.values())
        else None
    )
    extra = dict(protocol_extra or {})
    extra.setdefault("guidance", _known(gen, "guidance", "guidance_scale", "cfg"))
    extra.setdefault("steps", _known(gen, "steps", "num_steps"))
    extra.setdefault("conditioning_references", references_protocol(gen))
    report: dict[str, Any] = {
        "tta_version": __version__,
        "metrics": scores,
        "protocol": {
            "metrics": wanted,
            "embedder": embedder.describe() if embedder is not None else None,
            "clap": _clap_info(clap) if clap is not None else None,
            "melception": run.melception.protocol() if run.melception is not None else None,
            "resampler": RESAMPLER,
            "sample_rates": {
                "embedder": embedder.sample_rate if embedder else None,
                "clap": int(clap.sample_rate) if clap is not None else None,
                "spectrogram": run.spec.sample_rate,
            },
            "spectrogram_mel": run.spec.config.to_dict(),
            "crop_pad_seconds": seconds,
            "crop_pad_rule": "zero-pad at the end / crop from the start"
            if seconds
            else "native length, no padding",
            "n_generated": len(gen),
            "n_reference": len(ref),
            "reference_split": reference_split,
            "n_scored": len(gen) - len(silence.flagged),
            "reference_stats_cached": ref_stats is not None,
            "kl": "KL(p_reference || q_generated), paired by id; kl_softmax and kl_sigmoid (MMKL)",
            "is_splits": is_splits,
            "silence_threshold": silence_threshold,
            "pad_short_clips": pad_short_clips,
            **extra,
        },
        "fad_details": run.fad_details,
        "flagged": silence.to_dict(),
        "per_item": per_item,
        "breakdown": buckets,
        "seconds_elapsed": round(time.time() - t0, 2),
    }
    if out_dir is not None:
        from tta.evaluation.report import write_report

        write_report(report, Path(out_dir), run.examples)
    return report
