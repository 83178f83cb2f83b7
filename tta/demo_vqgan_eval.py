"""Scoring of the VQGAN demo stage (`tta.demo_vqgan`): the VQGAN's codebook statistics and
reconstruction PSNR on the test split, and the mel-classifier metrics of a set of log-mels
against the real test clips (MMKL paired by prompt, spectrogram FID), each per-prompt quantity
with a percentile-bootstrap 95 % interval over prompts (`tta.evaluation.judge.bootstrap_interval`).

The mel classifier reads log-mels of the demo front-end directly (the paper's Melception reads
spectrograms): generated mels as the VQGAN decodes them, real mels from the real audio, all
cropped to the same frames.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tta.evaluation.judge import Scores, bootstrap_interval
from tta.metrics.fad import frechet_distance_sets
from tta.metrics.melception import MelClassifierEmbedder, mmkl
from tta.metrics.spectrogram import normalize_log_mel, spectrogram_psnr
from tta.nn.quantize import code_statistics

__all__ = ["MelScorer", "codebook_report", "format_vqgan_table", "interval"]

N_BOOT = 1000
CHUNK = 16


def interval(values: np.ndarray | torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """``{mean, low, high, n}`` of per-prompt ``values`` (bootstrap 95 % interval of the mean)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(v) == 0:
        raise ValueError("interval: no values")
    low, high = bootstrap_interval(v, N_BOOT, np.random.default_rng(seed))
    return {"mean": float(v.mean()), "low": low, "high": high, "n": len(v)}


@torch.no_grad()
def codebook_report(vqgan: Any, mels: torch.Tensor) -> dict[str, Any]:
    """Codebook usage / perplexity over every code of ``mels`` ``(N, n_mels, F)`` (whole test clips)
    and the per-clip reconstruction PSNR (dB, SpecVQGAN's [0, 1] spectrogram scale) of ``vqgan``
    (a `VQGANModule`)."""
    num_codes = int(vqgan.autoencoder.quantize.num_codes)
    counts = torch.zeros(num_codes, dtype=torch.float64)
    psnr = []
    for s in range(0, len(mels), CHUNK):
        mel = mels[s : s + CHUNK]
        counts += torch.bincount(vqgan.encode(mel).flatten().cpu(), minlength=num_codes).double()
        recon = vqgan.reconstruct(mel)
        psnr.append(spectrogram_psnr(normalize_log_mel(mel), normalize_log_mel(recon)).cpu())
    stats = code_statistics(counts)
    return {"codes": int(counts.sum()), "num_codes": num_codes, "codes_used": int((counts > 0).sum()),
            "usage": float(stats["usage"]), "perplexity": float(stats["perplexity"]),
            "psnr_db": interval(torch.cat(psnr).numpy())}


class MelScorer:
    """MMKL and spectrogram FID of log-mels against the real test mels (one per prompt, same order)."""

    def __init__(self, embedder: MelClassifierEmbedder, real: torch.Tensor) -> None:
        self.embedder = embedder
        self.real_emb, self.real_logits = self.embed(real)

    def embed(self, mels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled embeddings and logits of log-mels ``(N, n_mels, F)``."""
        parts = [self.embedder.embed_and_classify_mel(mels[s : s + CHUNK]) for s in range(0, len(mels), CHUNK)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def kl(self, logits: torch.Tensor, ref_logits: torch.Tensor | None = None, variant: str | None = None) -> np.ndarray:
        """Per-prompt ``KL(p_real || q)``, paired by prompt index; ``variant`` default: the classifier's
        own (``sigmoid`` for a multi-label one: SpecVQGAN's formula with sigmoids, which can be negative)."""
        ref = self.real_logits if ref_logits is None else ref_logits
        keys = list(range(len(logits)))
        return mmkl(logits, keys, ref, keys, variant=variant or self.embedder.kl_variant).numpy()  # type: ignore[arg-type]

    def kls(self, logits: torch.Tensor, ref_logits: torch.Tensor | None = None) -> dict[str, Any]:
        """``mmkl`` (the classifier's KL) and, for a multi-label classifier, ``mmkl_bernoulli``
        (per-class Bernoulli KL summed, >= 0), each with its interval."""
        out = {"mmkl": interval(self.kl(logits, ref_logits))}
        if self.embedder.multilabel:
            out["mmkl_bernoulli"] = interval(self.kl(logits, ref_logits, "bernoulli"))
        return out

    def fid(self, emb: torch.Tensor, ref_emb: torch.Tensor | None = None) -> float:
        """Fréchet distance of the embeddings' Gaussians (``ref_emb`` default: the real test clips)."""
        return float(frechet_distance_sets(emb.double(), (self.real_emb if ref_emb is None else ref_emb).double()))

    def score(self, mels: torch.Tensor) -> dict[str, Any]:
        """``{mmkl, mmkl_bernoulli: {mean, low, high, n}, mel_fid}`` of one log-mel per prompt."""
        emb, logits = self.embed(mels)
        return {**self.kls(logits), "mel_fid": self.fid(emb)}

    def chance(self) -> dict[str, Any]:
        """MMKL of each real clip scored against another prompt's real clip (the next one): what
        a generation ignoring its prompt but as good as a real clip would get."""
        return {**self.kls(torch.roll(self.real_logits, 1, dims=0)), "mel_fid": None}


def row(judge_scores: Scores | None, mel_scores: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One report row: the judge's summary (accuracy, CLAP score, silent / noise) and the mel metrics."""
    out: dict[str, Any] = {}
    if judge_scores is not None:
        s = judge_scores.summary(N_BOOT)
        out.update(accuracy=s["accuracy_all"], clap=s["clap"], silent=s["silent"]["mean"], noise=s["noise"]["mean"])
    return {**out, **mel_scores, **extra}


def _cell(entry: Any, digits: int = 2) -> str:
    if entry is None:
        return "–"
    if isinstance(entry, (int, float)):
        return f"{entry:.{digits}f}"
    if entry.get("mean") is None:
        return "–"
    text = f"{entry['mean']:.{digits}f}"
    return text if entry.get("low") is None else f"{text} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"


def format_vqgan_table(rows: dict[str, dict[str, Any]]) -> str:
    """A markdown table of the stage's rows by system name."""
    head = ["system", "accuracy [95% CI]", "CLAP score [CI]", "MMKL [CI]", "mel FID", "silent", "noise"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, r in rows.items():
        lines.append("| " + " | ".join([name, _cell(r.get("accuracy")), _cell(r.get("clap"), 3),
                                        _cell(r.get("mmkl")), _cell(r.get("mel_fid"), 1), _cell(r.get("silent")),
                                        _cell(r.get("noise"))]) + " |")
    return "\n".join(lines)
