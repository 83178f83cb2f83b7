"""`ClapTextOnly` (registered ``clap_text_only``): the text half of a CLAP, for FiLM conditioning.

Public AudioLDM checkpoints ship only CLAP's text tower and text projection (diffusers'
``text_encoder/`` is a transformers ``ClapTextModelWithProjection``). This network holds exactly
that: a `TextEncoder` and a `Projection` into the joint space, with `embed_text` and
``joint_dim`` as in `tta.encoders.clap.network.CLAP`, so `ClapTextFiLM` and the retrieval query
use it unchanged. Audio embedding (candidate re-ranking by CLAP score) needs the audio tower
and raises `NoAudioTowerError`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tta.encoders.base import TextEncoder
from tta.encoders.clap.network import Projection, pooled_text
from tta.registry import register


class NoAudioTowerError(RuntimeError):
    """A text-only CLAP was asked for audio embeddings."""


NO_AUDIO_MESSAGE = (
    "this CLAP has no audio tower: candidate re-ranking needs a full CLAP"
)


@register("network", "clap_text_only")
class ClapTextOnly(nn.Module):
    """CLAP text tower + text projection; normalised text embeddings in the joint space.

    Args:
        text_encoder: any `TextEncoder` whose ``pooled`` vector the projection reads (LAION:
            `tta.encoders.clap_import.LaionClapTextEncoder`, RoBERTa pooler output).
        joint_dim: width of the joint space (512 for LAION CLAP / AudioLDM).
        projection: head style, ``"laion"`` (``W2 relu(W1 x + b1) + b2``) or ``"msclap"``.
        dropout: dropout of an ``"msclap"`` head.
        cache_frozen_text: memoise pooled vectors of a frozen text encoder per caption.
    """

    def __init__(
        self,
        text_encoder: TextEncoder,
        joint_dim: int = 512,
        projection: Literal["msclap", "laion"] = "laion",
        dropout: float = 0.0,
        cache_frozen_text: bool = True,
    ) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.text_projection = Projection(
            text_encoder.dim, joint_dim, dropout, projection
        )
        self.joint_dim = int(joint_dim)
        self.cache_frozen_text = cache_frozen_text
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def sample_rate(self) -> int:
        """Raises `NoAudioTowerError`: there is no audio front-end."""
        raise NoAudioTowerError(NO_AUDIO_MESSAGE)

    def freeze_all(self) -> ClapTextOnly:
        """Eval mode and no gradients for every part (the tower stays frozen across ``train()``)."""
        self.requires_grad_(False)
        if hasattr(self.text_encoder, "freeze"):
            self.text_encoder.freeze()
        return self.eval()

    def _pooled_text(self, texts: list[str]) -> torch.Tensor:
        device = next(self.text_projection.parameters()).device
        return pooled_text(self.text_encoder, texts, self._text_cache if self.cache_frozen_text else None, device)

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """Captions -> L2-normalised joint embeddings ``(B, joint_dim)``."""
        return F.normalize(self.text_projection(self._pooled_text(list(texts))), dim=-1)

    def embed_audio(self, wav: torch.Tensor) -> torch.Tensor:
        """Raises `NoAudioTowerError` (re-ranking candidates needs a full `CLAP`)."""
        raise NoAudioTowerError(NO_AUDIO_MESSAGE)

    def forward(self, texts: list[str]) -> torch.Tensor:
        """Same as `embed_text`."""
        return self.embed_text(texts)
