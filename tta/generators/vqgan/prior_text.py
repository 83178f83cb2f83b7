"""`PriorTextFeatures`: the text prefix of the VQGAN code prior, in the three modes of the paper's
Table 1 ("Diverse and Vivid Sound Generation from Text Descriptions", Sec. 3.2 / 4).

| mode | Table 1 | features ``(B, P, D)`` | mask |
|---|---|---|---|
| ``sequence`` | "30 Feats" | the encoder's token states, right-padded to ``P = max_length`` (30) | True on real tokens |
| ``pooled`` | "1 Feat" | the encoder's pooled vector (BERT: ``pooling: cls``, the first hidden state), ``P = 1`` | all True |
| ``none`` | "No Feat" | one fixed random vector (a buffer drawn from ``seed``), the same for every caption, ``P = 1`` | all True |

The text encoder is any `tta.encoders.base.TextEncoder` (BERT family via ``bert_text``, CLIP via
``clip_text``, a CLAP text tower via ``clap_text_tower``), frozen, from a local folder or checkpoint.
The paper caps every encoder at 30 tokens: an encoder whose own ``max_length`` is larger is refused
by name (set it to ``max_length`` in its config); a CLAP text tower, whose tokenizer length comes
from its checkpoint, is capped to ``max_length`` here (logged).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from tta.encoders.base import TextEncoder

log = logging.getLogger(__name__)

__all__ = ["MODES", "PriorTextFeatures"]

#: text-feature modes: "30 Feats", "1 Feat", "No Feat"
MODES = ("sequence", "pooled", "none")


def _cap_tokens(encoder: TextEncoder, max_length: int) -> None:
    """Refuse an encoder tokenizing more than ``max_length`` tokens; cap a CLAP tower's inner encoder."""
    own = getattr(encoder, "max_length", None)
    if own is not None:
        if int(own) > max_length:
            raise ValueError(f"text_encoder: its max_length is {own} but the prior reads at most {max_length} "
                             f"tokens (text_length): set the encoder's max_length to {max_length}")  # fmt: skip
        return
    inner = getattr(encoder, "encoder", None)  # a CLAP text tower: the CLAP's own text encoder
    if inner is not None and getattr(inner, "max_length", None) is not None and int(inner.max_length) > max_length:
        log.info("text encoder %s: tokens capped from %d to %d (text_length)", type(inner).__name__,
                 inner.max_length, max_length)
        inner.max_length = int(max_length)


class PriorTextFeatures(nn.Module):
    """Captions -> ``(features (B, length, dim), mask (B, length))`` (see the module docstring).

    Args:
        encoder: the frozen text encoder (None only for ``mode="none"``).
        mode: ``"sequence"``, ``"pooled"`` or ``"none"``.
        max_length: most tokens, and the prefix length of ``sequence`` (30 in the paper).
        dim: width of the ``none`` mode's random vector (the prior's ``feature_dim``).
        seed: seed of that vector.
        memo: most captions whose features are kept in host memory (least recently used dropped
            first; 0: none). The encoder is frozen and in eval mode, so a memoised caption's features
            equal a live encoding up to float rounding (its batch's padding changes matrix shapes).
            Worth it when captions repeat (the synthetic demo set: 1223 distinct captions, 46 kB each
            at 30 x 384).
    """

    def __init__(self, encoder: TextEncoder | None, mode: str = "sequence", max_length: int = 30,
                 dim: int | None = None, seed: int = 0, memo: int = 0) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"text_features must be one of {MODES} (30 Feats, 1 Feat, No Feat), got {mode!r}")
        if int(max_length) < 1:
            raise ValueError(f"text_length must be >= 1, got {max_length}")
        self.mode, self.max_length = mode, int(max_length)
        if int(memo) < 0:
            raise ValueError(f"text_memo must be >= 0, got {memo}")
        self.memo_size = int(memo)
        self._memo: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        if mode == "none":
            if encoder is not None:
                raise ValueError("text_features='none' (No Feat) reads no text: give no text_encoder")
            if dim is None or int(dim) < 1:
                raise ValueError(f"text_features='none' needs the width of its random vector, got dim={dim}")
            g = torch.Generator().manual_seed(int(seed))
            self.register_buffer("random_feature", torch.randn(1, 1, int(dim), generator=g))
            self.encoder = None
            self.dim = int(dim)
        else:
            if not isinstance(encoder, TextEncoder):
                raise TypeError(f"text_features={mode!r} needs a TextEncoder as text_encoder, got "
                                f"{type(encoder).__name__}")  # fmt: skip
            _cap_tokens(encoder, self.max_length)
            self.encoder = encoder.requires_grad_(False).eval()
            self.dim = int(getattr(encoder, "seq_dim", encoder.dim)) if mode == "sequence" else int(encoder.dim)

    @property
    def length(self) -> int:
        """Prefix positions: ``max_length`` for ``sequence``, 1 otherwise."""
        return self.max_length if self.mode == "sequence" else 1

    def train(self, mode: bool = True) -> PriorTextFeatures:
        """The encoder stays in eval mode (it is frozen)."""
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()
        return self

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        captions = list(captions)
        if not captions or any(not isinstance(c, str) for c in captions):
            raise TypeError(f"PriorTextFeatures: captions must be a non-empty list of strings, got {captions!r:.120}")
        b = len(captions)
        if self.encoder is None:
            feats = self.random_feature.expand(b, 1, self.dim)
            return feats, torch.ones(b, 1, dtype=torch.bool, device=feats.device)
        if self.memo_size:
            return self._memoised(captions)
        return self._encode(captions)

    def _memoised(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`_encode` of the captions not in the memo; every row from the memo (LRU order updated)."""
        missing = list(dict.fromkeys(c for c in captions if c not in self._memo))
        if missing:
            feats, mask = self._encode(missing)
            for caption, f, m in zip(missing, feats.cpu(), mask.cpu(), strict=True):
                self._memo[caption] = (f, m)
        rows = []
        for caption in captions:
            self._memo.move_to_end(caption)
            rows.append(self._memo[caption])
        while len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)
        device = next(self.encoder.parameters()).device
        return torch.stack([f for f, _ in rows]).to(device), torch.stack([m for _, m in rows]).to(device)

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        b = len(captions)
        emb = self.encoder(captions)
        if self.mode == "pooled":
            feats = emb.pooled.float()[:, None]
            return feats, torch.ones(b, 1, dtype=torch.bool, device=feats.device)
        seq, mask = emb.seq.float(), emb.mask
        if seq.shape[1] > self.max_length:
            raise ValueError(f"the text encoder returned {seq.shape[1]} tokens, more than text_length={self.max_length}")
        pad = self.max_length - seq.shape[1]
        if pad:
            seq = torch.cat([seq, seq.new_zeros(b, pad, seq.shape[2])], dim=1)
            mask = torch.cat([mask, mask.new_zeros(b, pad)], dim=1)
        return seq, mask
