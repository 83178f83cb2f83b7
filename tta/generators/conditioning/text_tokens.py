"""`TextTokenContext`: the prompt's token states from a frozen text encoder as a cross-attention
context (AudioLDM 2 / Tango style), beside or instead of AudioLDM's single CLAP FiLM vector.

Configured by name alone, e.g. for the demo's frozen MiniLM (the UNet needs
``context_dims: {tokens: 384}``)::

    conditioners:
      tokens:
        class_path: text_token_context
        init_args: {encoder: {class_path: minilm_text}}

Its null (classifier-free guidance, dropout) is the empty context: an all-False mask, which the
UNet's cross-attention turns into an exact zero contribution.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tta.encoders.base import TextEncoder
from tta.generators.conditioning.base import Conditioner
from tta.registry import register


@register("conditioner", "text_token_context")
class TextTokenContext(Conditioner):
    """Captions -> ``(token states (B, L, encoder.dim), mask (B, L))`` of a frozen text encoder.

    Args:
        encoder: a `tta.encoders.base.TextEncoder` (frozen here; its weights are part of the
            model's state dict, so checkpoints and pipeline folders are self-contained).
        dropout: classifier-free-guidance dropout (None: the model's ``cfg_dropout``).
    """

    route = "context"
    reads = ("captions",)

    def __init__(self, encoder: TextEncoder, dropout: float | None = None) -> None:
        super().__init__(dropout=dropout)
        if not isinstance(encoder, TextEncoder):
            raise TypeError(f"TextTokenContext: encoder must be a TextEncoder, got {type(encoder).__name__}")
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.dim = int(encoder.dim)

    def train(self, mode: bool = True) -> TextTokenContext:
        super().train(mode)
        self.encoder.eval()  # frozen: dropout stays off
        return self

    def encode(self, inputs: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        captions = inputs["captions"]
        bad = [i for i, c in enumerate(captions) if not isinstance(c, str)]
        if bad:
            raise TypeError(f"conditioner {self.name!r}: captions must be strings; items {bad[:5]} are not")
        with torch.no_grad():
            emb = self.encoder(list(captions))
        return emb.seq.float().to(device), emb.mask.to(device)
