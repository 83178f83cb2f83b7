"""The mel-classifier metrics of ``tta eval --melception CKPT``: spectrogram FID (``mel_fid``) and MMKL
(``mmkl``) with a tta-trained `MelClassifierNet` standing in for the VQGAN paper's Melception.

Each clip is resampled to the classifier's rate, cropped/padded like the other models' inputs,
analysed by the checkpoint's own mel front-end, and embedded / classified once
(`tta.metrics.melception.MelClassifierEmbedder`). ``mel_fid`` is the Fréchet distance of the
embeddings (`FrechetAudioDistance` on them: every usable generated clip against every reference);
``mmkl`` is `tta.metrics.melception.mmkl` paired by id (one reference per generated clip), with
the classifier's own KL (``sigmoid`` for a multi-label classifier, ``softmax`` for a single-label
one); a multi-label classifier also gives ``mmkl_bernoulli`` (per-class Bernoulli KL, summed).
"""

from __future__ import annotations

from typing import Any

from tta.evaluation.clips import fit, stack_by_length
from tta.metrics.fad import FrechetAudioDistance
from tta.metrics.melception import MelceptionMMKL, MelClassifierEmbedder

__all__ = ["NEEDS_MELCEPTION", "MelceptionScores"]

NEEDS_MELCEPTION = {"mel_fid", "mmkl"}


class MelceptionScores:
    """Accumulates ``mel_fid`` / ``mmkl`` over the generated and the reference pass of `evaluate`."""

    def __init__(self, embedder: MelClassifierEmbedder, metrics: set[str], seconds: float | None) -> None:
        self.embedder, self.seconds = embedder, seconds
        self.fid = FrechetAudioDistance() if "mel_fid" in metrics else None
        self.kl: dict[str, MelceptionMMKL] = {}
        if "mmkl" in metrics:
            self.kl["mmkl"] = MelceptionMMKL(embedder.kl_variant)
            if embedder.multilabel:
                self.kl["mmkl_bernoulli"] = MelceptionMMKL("bernoulli")

    def feed(self, loaded: list[tuple[Any, ...]], ids: list[str], ok: list[bool], real: bool) -> None:
        """One batch of ``(clip, wav, sample_rate, pairable)``: embeddings for FID (every clip) and
        logits for MMKL (pairable clips: not the references of flagged generations)."""
        wavs = [fit(wav, sr, self.embedder.sample_rate, self.seconds) for _, wav, sr, _ in loaded]
        for idx, wav in stack_by_length(wavs):
            emb, logits = self.embedder.embed_and_classify(wav)
            sub = [ids[i] for i in idx]
            if self.fid is not None:
                self.fid.update(emb, sub, real=real)
            keep = [j for j, i in enumerate(idx) if ok[i]]
            for metric in self.kl.values():
                if keep:
                    metric.update(logits[keep], [sub[j] for j in keep], real=real)

    def results(self, per_item: dict[str, dict[str, float]]) -> dict[str, float]:
        """``mel_fid``, ``mmkl`` (and ``mmkl_bernoulli``); per-clip KLs are added to ``per_item``."""
        out: dict[str, float] = {}
        if self.fid is not None:
            out["mel_fid"] = float(self.fid.compute())
        for name, metric in self.kl.items():
            ids, values = metric.per_item()
            out[name] = float(values.mean())
            for clip, value in zip(ids, values.tolist()):
                per_item.setdefault(clip, {})[name] = value
        return out

    def protocol(self) -> dict[str, Any]:
        """What ``eval.json`` records: the classifier (checkpoint sha256, front-end, labels) and definitions."""
        return {
            "classifier": self.embedder.describe(),
            "mel_fid": "Frechet distance of the classifier's pooled embeddings, generated vs reference clips",
            "mmkl": f"mean over generated clips of KL(p_reference || q_generated), paired by id, "
                    f"{self.embedder.kl_variant} class distributions"
                    + ("; mmkl_bernoulli: per-class Bernoulli KL summed" if self.embedder.multilabel else ""),
        }  # fmt: skip
