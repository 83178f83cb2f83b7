"""CLAP score (text-audio) and CLAP_A (audio-audio), DreamAudio eq. 7 and 8.

``CLAPScore(x, r) = e_a . e_t / max(|e_a| |e_t|, eps)`` between the CLAP audio embedding of a
generated clip and the CLAP text embedding of its prompt; ``CLAPScore_A`` replaces the text by
the audio embedding of the target (reference) clip. Reported as the mean cosine over clips (in
[-1, 1]; papers often print it times 100).
"""

from __future__ import annotations

from typing import Any

import torch

from tta.metrics.pairing import PairedIdMetric
from tta.registry import register

__all__ = ["CLAPAudioScore", "CLAPScore", "clap_cosine"]

EPS = 1e-8


def clap_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Row-wise ``a . b / max(|a| |b|, eps)`` of two ``(N, D)`` tensors, in float64."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"clap_cosine: embeddings must be two (N, D) tensors of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")  # fmt: skip
    a, b = a.double(), b.double()
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=eps)


@register("metric", "clap_score")
class CLAPScore(PairedIdMetric):
    """Mean text-audio cosine (eq. 7). ``update(audio, texts, ids)``.

    With a ``clap`` network (`tta.encoders.clap.network.CLAP`), ``audio`` is a waveform batch at
    its sample rate and ``texts`` a list of prompts; without one they are embeddings ``(B, D)``.
    """

    higher_is_better = True
    is_differentiable = False

    def __init__(self, clap: Any | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clap = clap
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("ids", default=[], dist_reduce_fx="cat")

    @torch.no_grad()
    def update(
        self,
        audio: torch.Tensor,
        texts: list[str] | torch.Tensor,
        ids: list[str] | None = None,
    ) -> None:
        if self.clap is not None:
            if not isinstance(texts, list) or any(
                not isinstance(t, str) or not t.strip() for t in texts
            ):
                raise ValueError(
                    "CLAPScore.update: every generated clip needs a non-empty prompt"
                )
            audio, texts = self.clap.embed_audio(audio), self.clap.embed_text(texts)
        scores = clap_cosine(audio, texts)
        self.scores.append(scores.to(self.device))
        self.ids.append(self._hashes(ids, scores.shape[0], "clips"))

    def _values(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not len(self.scores):
            raise ValueError("CLAPScore: no clips were given")
        return self.unique(self.ids, self.scores)


@register("metric", "clap_audio")
class CLAPAudioScore(PairedIdMetric):
    """Mean audio-audio cosine between generated clips and their targets (CLAP_A, eq. 8).

    ``update(x, ids, real)``: waveforms (with ``clap``) or CLAP audio embeddings of generated or
    reference (``real=True``) clips; paired by id at ``compute()``.
    """

    higher_is_better = True
    is_differentiable = False

    def __init__(self, clap: Any | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clap = clap
        for side in ("gen", "ref"):
            self.add_state(f"{side}_emb", default=[], dist_reduce_fx="cat")
            self.add_state(f"{side}_ids", default=[], dist_reduce_fx="cat")

    @torch.no_grad()
    def update(self, x: torch.Tensor, ids: list[str], real: bool = False) -> None:
        if ids is None:
            raise ValueError(
                "CLAPAudioScore.update: ids are required to pair generated and reference clips"
            )
        emb = self.clap.embed_audio(x) if self.clap is not None else x
        side = "ref" if real else "gen"
        getattr(self, f"{side}_emb").append(emb.detach().to(self.device, torch.float64))
        getattr(self, f"{side}_ids").append(self._hashes(ids, emb.shape[0], "clips"))

    def _values(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not len(self.gen_emb) or not len(self.ref_emb):
            raise ValueError("CLAPAudioScore: needs both generated and reference clips")
        gen_ids, gen = self.unique(self.gen_ids, self.gen_emb)
        ref_ids, ref = self.unique(self.ref_ids, self.ref_emb)
        i_gen, i_ref = self.pair_by_id(gen_ids, ref_ids)
        return gen_ids[i_gen], clap_cosine(gen[i_gen], ref[i_ref])
