"""CLIP's text transformer as a `TextEncoder` (registered ``clip_text``), from a local folder.

The MS-CLAP paper compares text towers (its Table 1: BERT, RoBERTa, GPT2 and "the text encoder
from CLIP, because it was used by different authors"); this is that tower. The folder is a
transformers CLIP checkpoint in Hugging Face layout: a full ``CLIPModel`` (``model_type: clip``,
the published layout; the vision tower and ``logit_scale`` are left unused) or a text-only
``CLIPTextModel`` / ``CLIPTextModelWithProjection`` (``model_type: clip_text_model``), with its
CLIP tokenizer. Any other ``model_type`` is refused by name. Loading is strict
(`tta.encoders.text_hf.load_model_strict`): a missing or reshaped parameter, or an unexpected
one outside the known unused parts, raises `WeightMismatchError`.

- ``seq``: the last hidden states (after CLIP's final layer norm), ``(B, L, hidden)``; CLIP's
  text transformer is causal, so a token never sees the padding after it;
- ``pooled``: the state at the end-of-text token, as CLIP pools. The tokenizer must append it
  (checked at load); the position is the last real token of the attention mask, not a search
  for the token id, since CLIP tokenizers pad with the end-of-text token itself;
- ``project=True``: ``pooled`` is ``text_projection(pooled)`` (``CLIPTextModelWithProjection``,
  CLIP's joint-space text embedding; the folder must hold ``text_projection.weight``); then
  ``dim`` is the projection width and ``seq_dim`` the hidden width (``seq`` is not projected),
  so use ``project=False`` where a consumer needs ``dim == seq`` width (`TextTokenContext`);
- ``normalize``: L2-normalise ``pooled``;
- at most ``max_length`` tokens with start and end tokens (CLIP: 77 positions).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tta.encoders.text import HFTextEncoder, last_token
from tta.encoders.text_hf import load_model_strict
from tta.registry import register

log = logging.getLogger(__name__)

# parts of a CLIP checkpoint the text tower never uses
_UNUSED = ("vision_model.", "visual_projection.", "logit_scale")


@register("encoder", "clip_text")
class CLIPTextEncoder(HFTextEncoder):
    """CLIP text transformer pooled at the end-of-text token (optionally projected).

    Args:
        path: local folder: ``config.json`` (``model_type`` ``clip`` or ``clip_text_model``),
            ``*.safetensors`` and the CLIP tokenizer files.
        max_length: most tokens per text, start and end tokens included (CLIP: 77).
        project: ``pooled`` = CLIP's ``text_projection`` of the end-of-text state.
        normalize: L2-normalise ``pooled``.
        trainable, fixed_length, fp32: see `HFTextEncoder`.
    """

    model_types = frozenset({"clip", "clip_text_model"})

    def __init__(
        self,
        path: str | os.PathLike,
        max_length: int = 77,
        project: bool = False,
        normalize: bool = False,
        trainable: bool = False,
        fixed_length: bool = False,
        fp32: bool = True,
    ) -> None:
        self.project = bool(project)
        super().__init__(path, max_length, trainable=trainable, fixed_length=fixed_length, fp32=fp32)
        self.normalize = bool(normalize)
        self.seq_dim = self.dim
        if self.project:
            self.dim = int(self.model.text_projection.out_features)

    def _min_length(self) -> int:
        return 2

    def _setup_tokenizer(self, folder: Path) -> None:
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise ValueError(f"{folder}: the CLIP tokenizer has no eos (end-of-text) token to pool at")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
            log.debug("%s: no pad token, reusing eos %r as pad", folder, tok.eos_token)
        ids = tok(["a"], add_special_tokens=True)["input_ids"][0]
        if not ids or ids[-1] != tok.eos_token_id:
            raise ValueError(
                f"{folder}: the tokenizer does not end a text with its eos token {tok.eos_token!r} "
                f"(got ids {ids}); CLIP pools at that token, so the tokenizer must add it"
            )
        self.eos_id = int(tok.eos_token_id)

    def _load_model(self, folder: Path, **kwargs: Any) -> torch.nn.Module:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        if self.project:
            return load_model_strict(CLIPTextModelWithProjection, folder, unused_prefixes=_UNUSED, **kwargs)
        return load_model_strict(CLIPTextModel, folder, unused_prefixes=(*_UNUSED, "text_projection."), **kwargs)

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states and the (projected) end-of-text state, inside the fp32 island."""
        seq = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        pooled = last_token(seq, mask)
        if self.project:
            pooled = self.model.text_projection(pooled)
        return seq, pooled

    def _pool(self, seq: torch.Tensor, mask: torch.Tensor, pooler: torch.Tensor | None) -> torch.Tensor:
        if pooler is None:  # pragma: no cover - `_encode` always returns it
            raise RuntimeError(f"{self.path}: no end-of-text state was computed")
        return F.normalize(pooler, dim=-1) if self.normalize else pooler

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, project={self.project}"
