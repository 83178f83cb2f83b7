"""Conditioners of the latent diffusion UNet (DESIGN.md section 3; the base `Conditioner`,
`Conditioning` and `drop_mask` live in `tta.generators.conditioning` and are re-exported here):

- `ClapTextFiLM`: the (normalised) CLAP text embedding of the prompt, routed to FiLM, with a
  learned null embedding (or CLAP's embedding of the empty prompt, as public AudioLDM) used by
  classifier-free-guidance dropout and by the unconditional branch at sampling time.
- `RetrievalConditioner` (Re-AudioLDM, `tta.generators.ldm.retrieval`): the k retrieved
  text-audio pairs' cached features (audio feature sequence and caption embedding sequence of
  each neighbour) projected to one width and concatenated into the ``"retrieval"`` context.
  Training reads neighbours from the neighbour table (the clip itself excluded); at test time it
  queries the FAISS index with the prompt's CLAP text embedding. Its null is the empty context,
  which the UNet turns into an exact zero contribution, so guidance can drop the prompt and the
  retrieval independently.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from tta.generators.conditioning.base import Conditioner, Conditioning, drop_mask

log = logging.getLogger(__name__)

__all__ = ["ClapTextFiLM", "Conditioning", "RetrievalMode", "drop_mask"]

RetrievalMode = Literal["both", "audio", "text"]


class ClapTextFiLM(Conditioner):
    """Prompt -> normalised CLAP text embedding for FiLM, with its null embedding.

    Reads ``captions`` and, optionally, ``film``: embeddings to use instead of the captions' (e.g.
    `embed_audio`'s, AudioLDM's training condition).

    Args:
        clap: a (frozen) `tta.encoders.clap.network.CLAP`; only ``embed_text`` and
            ``joint_dim`` are used here.
        null: ``"learned"`` (a trained parameter, DESIGN.md) or ``"empty_prompt"`` (CLAP's
            embedding of ``""``, what public AudioLDM checkpoints were trained against).
        scale: factor on the (unit-norm) embedding the UNet receives. 1 is AudioLDM's (and what
            public weights expect); ``"unit_entries"`` (``sqrt(dim)``) gives entries of order 1,
            so the FiLM projection learns at the pace of the rest of the UNet instead of
            ``sqrt(dim)`` times slower (docs/ldm.md, "Learning in a CPU budget").
        dropout: classifier-free-guidance dropout (None: the model's ``cfg_dropout``).
    """

    route = "film"
    reads = ("captions",)
    reads_optional = ("film",)

    def __init__(self, clap: nn.Module, null: Literal["learned", "empty_prompt"] = "learned",
                 scale: float | Literal["unit_entries"] = 1.0, dropout: float | None = None) -> None:
        super().__init__(dropout)
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

    def null_value(self, value: torch.Tensor) -> torch.Tensor:
        return self.null_embedding(value.shape[0]).to(value.device, value.dtype)

    def embed_audio(self, wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """``(B, dim)`` CLAP *audio* embeddings of waveforms ``(B, T)`` at ``sample_rate`` (no
        gradient): AudioLDM's training condition, in the same joint space as the prompts'."""
        from tta.data.audio import resample

        with torch.no_grad():
            audio = resample(wav.float(), int(sample_rate), int(self.clap.sample_rate))
            return self.clap.embed_audio(audio).float()

    def encode(self, inputs: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        """Embeddings of the captions (or the given ``film`` embeddings) times ``scale``."""
        film = inputs.get("film")
        emb = self.embed(inputs["captions"]) if film is None else film
        return emb * self.scale if self.scale != 1.0 else emb

    def forward(self, inputs: Mapping[str, Any] | Sequence[str], drop: torch.Tensor | None = None,
                device: torch.device | str | None = None, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """`Conditioner.forward`; ``inputs`` may also be the captions themselves, with ``embeddings``
        the FiLM embeddings to use instead of theirs. On the embeddings' device unless ``device``."""
        inputs = dict(self.as_inputs(inputs))
        if embeddings is not None:
            inputs["film"] = embeddings
        if device is None:
            device = inputs["film"].device if inputs.get("film") is not None else self.device
        return super().forward(inputs, drop, device)
