"""Pretrained Hugging Face text encoders (GPT2, BERT/RoBERTa/MiniLM, T5/Flan-T5) from local folders.

(CLIP's text tower, built on the same base, is `tta.encoders.clip_text`.)

Every encoder maps ``list[str]`` to a `TextEmbedding` ``(seq (B, L, D), mask (B, L) bool,
pooled (B, D))``. Shared behaviour (`HFTextEncoder`):

- loads ``config.json`` + ``*.safetensors`` + tokenizer files from a *local* folder
  (`tta.encoders.text_hf`); never a hub id;
- tokens are right-padded by the encoder itself; ``mask`` is True on real tokens and the padded
  positions of ``seq`` are set to zero, so nothing downstream can depend on padding;
- at most ``max_length`` tokens (special tokens included); ``fixed_length=True`` pads every batch
  to exactly ``max_length``;
- an empty caption is encoded as its special tokens (BERT ``[CLS] [SEP]``, T5 ``</s>``, GPT2
  ``<|endoftext|>``); should a tokenizer produce no token at all, one end/separator token stands
  in, so every row has at least one real token and a finite pooled vector;
- ``fp32=True`` (default) runs the network with autocast disabled and returns float32, the
  "fp32 island" of bf16-mixed training;
- ``trainable=False`` (default) calls ``freeze()``: eval mode and no gradients, kept across
  ``train()``; inputs go to the device of the module's parameters.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from tta.encoders.base import TextEmbedding, TextEncoder
from tta.encoders.text_hf import (
    check_hf_folder,
    check_model_type,
    load_model_strict,
    load_tokenizer,
)
from tta.registry import register

log = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "pooler"]
_ROBERTA_TYPES = frozenset({"roberta", "xlm-roberta", "camembert"})


def check_texts(texts: Sequence[str]) -> list[str]:
    """Validate a batch of captions: a non-empty sequence of ``str`` (not a bare string)."""
    if isinstance(texts, str):
        raise TypeError("text encoders take a list of strings, got a single str; wrap it as [text]")
    texts = list(texts)
    if not texts:
        raise ValueError("text encoders need at least one text, got an empty batch")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__}, not a str: {text!r}")
    return texts


def masked_mean(seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``seq`` (B, L, D) over the positions where ``mask`` (B, L) is True."""
    weights = mask.to(seq.dtype).unsqueeze(-1)
    return (seq * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def last_token(seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``seq`` at the last real position of every row of a right-padded ``mask``."""
    last = mask.long().sum(1).sub(1).clamp_min(0)
    return seq[torch.arange(seq.shape[0], device=seq.device), last]


class HFTextEncoder(TextEncoder):
    """Base of the Hugging Face text encoders; subclasses choose the network and the pooling.

    Args:
        path: local folder with ``config.json``, ``*.safetensors`` and tokenizer files.
        max_length: most tokens per text, special tokens included.
        trainable: False freezes the encoder (eval mode, no gradients).
        fixed_length: pad every batch to ``max_length`` instead of its longest text.
        fp32: run with autocast disabled and return float32.
        model_kwargs: extra arguments of the network's ``from_pretrained``.
    """

    model_types: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        path: str | os.PathLike,
        max_length: int,
        trainable: bool = False,
        fixed_length: bool = False,
        fp32: bool = True,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        folder = check_hf_folder(path)
        self.model_type = check_model_type(folder, self.model_types, type(self).__name__)
        if max_length < self._min_length():
            raise ValueError(f"{type(self).__name__}: max_length must be >= {self._min_length()}, got {max_length}")
        self.path = str(folder)
        self.max_length = int(max_length)
        self.fixed_length = bool(fixed_length)
        self.fp32 = bool(fp32)
        self.tokenizer = load_tokenizer(folder)
        self._setup_tokenizer(folder)
        self.model = self._load_model(folder, **(model_kwargs or {}))
        self.dim = int(self.model.config.hidden_size)
        limit = self._max_positions()
        if limit is not None and self.max_length > limit:
            raise ValueError(
                f"{type(self).__name__}: max_length {self.max_length} exceeds the {limit} positions of {folder}"
            )
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"{folder}: the tokenizer has no pad token; add one to its tokenizer files")
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.fallback_id = self._fallback_id(folder)
        if trainable:
            self.train()
        else:
            self.freeze()
        log.info(
            "%s from %s: dim %d, max_length %d, %s",
            type(self).__name__,
            folder,
            self.dim,
            self.max_length,
            "trainable" if trainable else "frozen",
        )

    # -- hooks -----------------------------------------------------------------------------
    def _min_length(self) -> int:
        return 1

    def _setup_tokenizer(self, folder: Path) -> None:
        """Adjust the tokenizer after loading (e.g. define a pad token)."""

    def _load_model(self, folder: Path, **kwargs: Any) -> torch.nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def _max_positions(self) -> int | None:
        """Most tokens the network can embed (None: unbounded, relative positions)."""
        value = getattr(self.model.config, "max_position_embeddings", None)
        return int(value) if value is not None else None

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text with special tokens, at most ``max_length`` of them."""
        enc = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.max_length)
        return [list(ids) for ids in enc["input_ids"]]

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the network: ``(last hidden states, pooler output or None)``."""
        out = self.model(input_ids=ids, attention_mask=mask.long())
        return out.last_hidden_state, getattr(out, "pooler_output", None)

    def _pool(self, seq: torch.Tensor, mask: torch.Tensor, pooler: torch.Tensor | None) -> torch.Tensor:
        return masked_mean(seq, mask)

    # -- public ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device of the network's parameters (where inputs are sent)."""
        return next(self.model.parameters()).device

    def _fallback_id(self, folder: Path) -> int:
        for name in ("eos_token_id", "sep_token_id", "cls_token_id", "unk_token_id", "pad_token_id"):
            value = getattr(self.tokenizer, name, None)
            if value is not None:
                return int(value)
        raise ValueError(f"{folder}: the tokenizer defines no special token (eos, sep, cls, unk or pad)")

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids (B, L) long and mask (B, L) bool, on the CPU."""
        texts = check_texts(texts)
        rows = self._token_ids(texts)
        for i, row in enumerate(rows):
            if not row:
                log.debug("text %d (%r) gave no token; encoding it as token %d", i, texts[i], self.fallback_id)
                rows[i] = [self.fallback_id]
        length = self.max_length if self.fixed_length else max(len(row) for row in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return ids, mask

    def forward(self, texts: Sequence[str]) -> TextEmbedding:
        """Encode a batch of captions."""
        ids, mask = self.tokenize(texts)
        device = self.device
        ids, mask = ids.to(device), mask.to(device)
        context = torch.autocast(device_type=device.type, enabled=False) if self.fp32 else nullcontext()
        with context:
            seq, pooler = self._encode(ids, mask)
        if self.fp32:
            seq = seq.float()
            pooler = pooler.float() if pooler is not None else None
        seq = seq.masked_fill(~mask.unsqueeze(-1), 0.0)
        return TextEmbedding(seq=seq, mask=mask, pooled=self._pool(seq, mask, pooler))

    def extra_repr(self) -> str:
        return f"path={self.path!r}, dim={self.dim}, max_length={self.max_length}, frozen={self.frozen}"


@register("encoder", "gpt2_text")
class GPT2TextEncoder(HFTextEncoder):
    """GPT2 pooled at the end-of-text token (MS-CLAP 2023's text tower).

    The end-of-text token (``tokenizer.eos_token``, ``<|endoftext|>``) is appended to every text
    after truncation to ``max_length - 1`` tokens. GPT2 tokenizers have no pad token: the
    end-of-text token is reused as pad (no new embedding row is needed), which is safe because
    the pooled vector is the hidden state at the *last real token found from the attention
    mask*, never at a position found by token id; so padding and an end-of-text-like token
    inside a caption do not move it.
    """

    model_types = frozenset({"gpt2"})

    def __init__(
        self,
        path: str | os.PathLike,
        max_length: int = 77,
        trainable: bool = False,
        fixed_length: bool = False,
        fp32: bool = True,
    ) -> None:
        super().__init__(path, max_length, trainable=trainable, fixed_length=fixed_length, fp32=fp32)

    def _min_length(self) -> int:
        return 2

    def _setup_tokenizer(self, folder: Path) -> None:
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise ValueError(f"{folder}: the GPT2 tokenizer has no eos (end-of-text) token to pool at")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
            log.debug("%s: no pad token, reusing eos %r as pad", folder, tok.eos_token)
        tok.padding_side = "right"
        self.eos_id = int(tok.eos_token_id)

    def _load_model(self, folder: Path, **kwargs: Any) -> torch.nn.Module:
        from transformers import AutoModel

        return load_model_strict(AutoModel, folder, **kwargs)

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        enc = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_length - 1)
        return [list(ids) + [self.eos_id] for ids in enc["input_ids"]]

    def _pool(self, seq: torch.Tensor, mask: torch.Tensor, pooler: torch.Tensor | None) -> torch.Tensor:
        return last_token(seq, mask)


@register("encoder", "bert_text")
class BertTextEncoder(HFTextEncoder):
    """BERT-family encoder (BERT, RoBERTa, MiniLM, XLM-R) with CLS, mean or pooler pooling.

    Args:
        path: local Hugging Face folder.
        max_length: most tokens per text, ``[CLS]``/``[SEP]`` included.
        pooling: ``"mean"`` (masked mean over real tokens, as sentence-transformers' MiniLM),
            ``"cls"`` (hidden state of the first token) or ``"pooler"`` (the checkpoint's
            ``tanh(W h_cls + b)`` head, as LAION CLAP's text tower; the folder must hold it).
        normalize: L2-normalise the pooled vector.
        trainable, fixed_length, fp32: see `HFTextEncoder`.
    """

    model_types = frozenset({"bert"}) | _ROBERTA_TYPES

    def __init__(
        self,
        path: str | os.PathLike,
        max_length: int = 77,
        pooling: Pooling = "mean",
        normalize: bool = False,
        trainable: bool = False,
        fixed_length: bool = False,
        fp32: bool = True,
    ) -> None:
        if pooling not in ("mean", "cls", "pooler"):
            raise ValueError(f"BertTextEncoder: pooling must be 'mean', 'cls' or 'pooler', got {pooling!r}")
        super().__init__(
            path,
            max_length,
            trainable=trainable,
            fixed_length=fixed_length,
            fp32=fp32,
            model_kwargs={"add_pooling_layer": pooling == "pooler"},
        )
        self.pooling = pooling
        self.normalize = bool(normalize)
        config_pad = getattr(self.model.config, "pad_token_id", None)
        if self.model_type in _ROBERTA_TYPES and config_pad is not None and config_pad != self.pad_id:
            raise ValueError(
                f"{self.path}: tokenizer pad id {self.pad_id} differs from config pad_token_id {config_pad}; "
                "RoBERTa derives positions from the pad id, so they must agree"
            )

    def _load_model(self, folder: Path, **kwargs: Any) -> torch.nn.Module:
        from transformers import AutoModel

        return load_model_strict(AutoModel, folder, **kwargs)

    def _max_positions(self) -> int | None:
        limit = super()._max_positions()
        if limit is not None and self.model_type in _ROBERTA_TYPES:
            limit -= int(self.model.config.pad_token_id) + 1  # positions start after the pad index
        return limit

    def _pool(self, seq: torch.Tensor, mask: torch.Tensor, pooler: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "cls":
            pooled = seq[:, 0]
        elif self.pooling == "pooler":
            if pooler is None:  # pragma: no cover - guarded by add_pooling_layer
                raise RuntimeError(f"{self.path}: the network returned no pooler output")
            pooled = pooler
        else:
            pooled = masked_mean(seq, mask)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


@register("encoder", "t5_text")
class T5TextEncoder(HFTextEncoder):
    """Encoder half of T5 / Flan-T5 (``T5EncoderModel``), fixed length, masked-mean pooled.

    Texts are padded/truncated to exactly ``max_length`` tokens (``</s>`` kept), so ``seq`` is
    always ``(B, max_length, D)``: 50 for Re-AudioLDM / DreamAudio, 30 for the VQGAN paper.
    T5 overflows in half precision, so it always runs in float32 unless ``fp32=False``.
    """

    model_types = frozenset({"t5"})

    def __init__(
        self,
        path: str | os.PathLike,
        max_length: int = 50,
        trainable: bool = False,
        fixed_length: bool = True,
        fp32: bool = True,
    ) -> None:
        super().__init__(path, max_length, trainable=trainable, fixed_length=fixed_length, fp32=fp32)

    def _load_model(self, folder: Path, **kwargs: Any) -> torch.nn.Module:
        from transformers import T5EncoderModel

        return load_model_strict(T5EncoderModel, folder, **kwargs)

    def _max_positions(self) -> int | None:
        return None  # relative position buckets: any length
