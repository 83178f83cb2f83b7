"""Conditioners of the latent diffusion UNet (DESIGN.md section 3).

A `Conditioning` bundles what the UNet consumes: a FiLM vector and named cross-attention
contexts ``name -> (seq (B, L, D), mask (B, L))``. Conditioners produce them:

- `ClapTextFiLM`: the (normalised) CLAP text embedding of the prompt, routed to FiLM, with a
  learned null embedding (or CLAP's embedding of the empty prompt, as public AudioLDM) used by
  classifier-free-guidance dropout and by the unconditional branch at sampling time.
- `RetrievalConditioner` (Re-AudioLDM): the k retrieved text-audio pairs' cached features (audio
  feature sequence and caption embedding sequence of each neighbour) projected to one width and
  concatenated into the ``"retrieval"`` context. Training reads neighbours from the neighbour
  table (the clip itself excluded); at test time it queries the FAISS index with the prompt's
  CLAP text embedding. Its null is the empty context, which the UNet turns into an exact zero
  contribution, so guidance can drop the prompt and the retrieval independently.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

RetrievalMode = Literal["both", "audio", "text"]


@dataclass
class Conditioning:
    """FiLM vector ``(B, D)`` (or None) and named contexts ``name -> (seq (B, L, D), mask (B, L))``."""

    film: torch.Tensor | None = None
    context: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def cat(self, other: Conditioning) -> Conditioning:
        """Stack two conditionings along the batch (contexts padded to a common length)."""
        if (self.film is None) != (other.film is None) or set(self.context) != set(other.context):
            raise ValueError("cannot stack conditionings with different routes")
        film = None if self.film is None else torch.cat([self.film, other.film])
        context = {}
        for name, (seq_a, mask_a) in self.context.items():
            seq_b, mask_b = other.context[name]
            length = max(seq_a.shape[1], seq_b.shape[1])
            context[name] = (
                torch.cat([_pad(seq_a, length), _pad(seq_b, length)]),
                torch.cat([_pad(mask_a, length), _pad(mask_b, length)]),
            )
        return Conditioning(film, context)


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[1] == length:
        return x
    pad = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


def drop_mask(batch: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Bool ``(batch,)``: True where the condition is dropped (probability ``p``)."""
    if p <= 0:
        return torch.zeros(batch, dtype=torch.bool)
    return torch.rand(batch, generator=generator) < p


class ClapTextFiLM(nn.Module):
    """Prompt -> normalised CLAP text embedding for FiLM, with its null embedding.

    Args:
        clap: a (frozen) `tta.encoders.clap.network.CLAP`; only ``embed_text`` and
            ``joint_dim`` are used here.
        null: ``"learned"`` (a trained parameter, DESIGN.md) or ``"empty_prompt"`` (CLAP's
            embedding of ``""``, what public AudioLDM checkpoints were trained against).
        scale: factor on the (unit-norm) embedding the UNet receives. 1 is AudioLDM's (and what
            public weights expect); ``"unit_entries"`` (``sqrt(dim)``) gives entries of order 1,
            so the FiLM projection learns at the pace of the rest of the UNet instead of
            ``sqrt(dim)`` times slower (docs/ldm.md, "Learning in a CPU budget").
    """

    def __init__(self, clap: nn.Module, null: Literal["learned", "empty_prompt"] = "learned",
                 scale: float | Literal["unit_entries"] = 1.0) -> None:
        super().__init__()
        if null not in ("learned", "empty_prompt"):
            raise ValueError(f"null must be 'learned' or 'empty_prompt', got {null!r}")
        self.clap = clap
        self.null_kind = null
        self.dim = int(clap.joint_dim)
        if scale == "unit_entries":
            scale = self.dim**0.5
        if isinstance(scale, str) or not scale > 0:
            raise ValueError(f"film scale must be a positive number or 'unit_entries', got {scale!r}")
        self.scale = float(scale)
        self.null = nn.Parameter(torch.zeros(self.dim)) if null == "learned" else None

    def embed(self, captions: Sequence[str]) -> torch.Tensor:
        """``(B, dim)`` text embeddings (no gradient into CLAP)."""
        bad = [i for i, c in enumerate(captions) if not isinstance(c, str)]
        if bad:
            raise TypeError(f"captions must be strings; items {bad[:5]} are not")
        with torch.no_grad():
            return self.clap.embed_text(list(captions)).float()

    def null_embedding(self, batch: int) -> torch.Tensor:
        """``(batch, dim)`` unconditional FiLM vectors (in the scaled space of `forward`'s)."""
        if self.null is not None:
            return self.null.unsqueeze(0).expand(batch, -1)
        return self.embed([""]).expand(batch, -1) * self.scale

    def embed_audio(self, wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """``(B, dim)`` CLAP *audio* embeddings of waveforms ``(B, T)`` at ``sample_rate`` (no
        gradient): AudioLDM's training condition, in the same joint space as the prompts'."""
        from tta.data.audio import resample

        with torch.no_grad():
            audio = resample(wav.float(), int(sample_rate), int(self.clap.sample_rate))
            return self.clap.embed_audio(audio).float()

    def forward(self, captions: Sequence[str], drop: torch.Tensor | None = None,
                embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of ``captions`` (or the given ``embeddings``, e.g. `embed_audio`'s) times
        ``scale``, with rows where ``drop`` is True replaced by the null embedding."""
        emb = self.embed(captions) if embeddings is None else embeddings
        if self.scale != 1.0:
            emb = emb * self.scale
        if drop is not None and drop.any():
            null = self.null_embedding(len(captions)).to(emb.device, emb.dtype)
            emb = torch.where(drop.to(emb.device)[:, None], null, emb)
        return emb
