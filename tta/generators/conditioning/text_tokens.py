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

Precomputed states: given the input `CACHED_TOKENS` (``(seq, mask)`` of the captions, e.g. the
``t5`` cache of ``tta data shard``, `tta.generators.ldm.shard_conditions`), it returns those instead
of running the encoder. Each row's token count is checked against the encoder's tokenization of
the batch's caption (cheap: no network), so states of another caption are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tta.data.text_cache import T5_TOKENS_KEY
from tta.encoders.base import TextEncoder
from tta.generators.conditioning.base import Conditioner
from tta.registry import register

#: optional input: ``(seq (B, L, D), mask (B, L) bool)`` precomputed for the ``captions``
CACHED_TOKENS = "cached_tokens"


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
    reads_optional = (CACHED_TOKENS,)
    cached_tokens_key = T5_TOKENS_KEY

    def __init__(self, encoder: TextEncoder, dropout: float | None = None) -> None:
        super().__init__(dropout=dropout)
        if not isinstance(encoder, TextEncoder):
            raise TypeError(f"TextTokenContext: encoder must be a TextEncoder, got {type(encoder).__name__}")
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.dim = int(encoder.dim)

    @property
    def text_encoder(self) -> TextEncoder:
        """The frozen encoder (whose states a cache under `cached_tokens_key` must come from)."""
        return self.encoder

    def train(self, mode: bool = True) -> TextTokenContext:
        super().train(mode)
        self.encoder.eval()  # frozen: dropout stays off
        return self

    def encode(self, inputs: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        captions = inputs["captions"]
        bad = [i for i, c in enumerate(captions) if not isinstance(c, str)]
        if bad:
            raise TypeError(f"conditioner {self.name!r}: captions must be strings; items {bad[:5]} are not")
        cached = inputs.get(CACHED_TOKENS)
        if cached is not None:
            return self._check_cached(cached, captions, device)
        with torch.no_grad():
            emb = self.encoder(list(captions))
        return emb.seq.float().to(device), emb.mask.to(device)

    def _check_cached(self, cached: tuple[torch.Tensor, torch.Tensor], captions: list[str],
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Precomputed ``(seq, mask)`` after checking their shape and per-row token counts."""
        return check_cached_tokens(cached, captions, self.encoder, self.dim, device,
                                   f"conditioner {self.name!r}: input {CACHED_TOKENS!r}")


def check_cached_tokens(cached: tuple[torch.Tensor, torch.Tensor], captions: list[str], encoder: TextEncoder,
                        dim: int, device: torch.device, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Precomputed ``(seq (B, L, dim), mask (B, L))`` of ``captions`` on ``device`` (float, bool),
    after checking their shape and each row's token count against ``encoder.tokenize`` of its
    caption (when the encoder has one); ValueErrors start with ``where`` (what is checked)."""
    seq, mask = cached
    if seq.dim() != 3 or seq.shape[-1] != dim or tuple(mask.shape) != tuple(seq.shape[:2]) \
            or seq.shape[0] != len(captions):
        raise ValueError(f"{where} must be (seq (B={len(captions)}, L, {dim}), mask (B, L)), got "
                         f"{tuple(seq.shape)} and {tuple(mask.shape)}")
    tokenize = getattr(encoder, "tokenize", None)
    if tokenize is not None:
        want = tokenize(list(captions))[1].sum(1).tolist()
        have = mask.sum(1).tolist()
        bad = [i for i, (h, w) in enumerate(zip(have, want, strict=True)) if h != w]
        if bad:
            raise ValueError(f"{where}: the precomputed token states of row {bad[0]} have {have[bad[0]]} tokens but "
                             f"its caption {captions[bad[0]]!r} has {want[bad[0]]}: they were computed for another "
                             "caption (or tokenizer)")
    return seq.float().to(device), mask.bool().to(device)
