"""Interfaces of text and audio encoders (DESIGN.md section 3).

- `TextEncoder`: ``list[str] -> TextEmbedding(seq (B, L, D), mask (B, L), pooled (B, D))``.
- `AudioEncoder`: waveform ``(B, T)`` at ``sample_rate`` -> ``AudioEmbedding(pooled (B, D),
  seq (B, N, D) or None)``. Audio encoders own their front-end (a `MelFrontend` preset).

Both can be frozen (``freeze()``: eval mode, no gradients); frozen encoders keep eval mode when
the surrounding LightningModule calls ``train()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TextEmbedding:
    """Token states, their padding mask (True = real token) and a pooled sentence vector."""

    seq: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self) -> None:
        b, length = self.mask.shape
        if self.seq.shape[:2] != (b, length) or self.pooled.shape[0] != b:
            raise ValueError(
                f"TextEmbedding shapes disagree: seq {tuple(self.seq.shape)}, mask {tuple(self.mask.shape)}, "
                f"pooled {tuple(self.pooled.shape)}"
            )


@dataclass
class AudioEmbedding:
    """A pooled clip vector and, when the encoder has one, its frame/patch sequence."""

    pooled: torch.Tensor
    seq: torch.Tensor | None = None


class _Freezable(nn.Module):
    frozen: bool = False

    def freeze(self) -> _Freezable:
        """Eval mode and no gradients, kept across ``train()`` calls."""
        self.frozen = True
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> _Freezable:
        return super().train(mode and not self.frozen)


class TextEncoder(_Freezable):
    """Base class of text encoders; ``dim`` is the width of ``seq`` and ``pooled``."""

    dim: int

    def forward(self, texts: list[str]) -> TextEmbedding:  # pragma: no cover - interface
        raise NotImplementedError


class AudioEncoder(_Freezable):
    """Base class of audio encoders; ``dim`` is the width of ``pooled``."""

    dim: int
    sample_rate: int

    def forward(self, wav: torch.Tensor) -> AudioEmbedding:  # pragma: no cover - interface
        raise NotImplementedError
