"""Multi-head attention with key padding masks, and the GEGLU feed-forward.

`Attention` is query/key/value projections (``to_q``, ``to_k``, ``to_v``, no bias) and an
output projection ``to_out`` (``to_out.0`` Linear, ``to_out.1`` Dropout), the names diffusers
uses, so public transformer weights map by name. Attention itself is
`torch.nn.functional.scaled_dot_product_attention`.

Masks are ``(B, L)`` bool, True = real token. A sample whose context has no real token at all
(``k = 0`` neighbours, a dropped condition) gets an exact zero output from the attention (the
output projection's bias included), never NaN. `KeyMask` turns a bool mask into the SDPA mask
once, so a UNet can prepare it a single time and reuse it in every block.

`FeedForward` is ``net.0`` = `GEGLU` (``proj``), ``net.1`` Dropout, ``net.2`` Linear, as in
diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GEGLU", "Attention", "FeedForward", "KeyMask"]


@dataclass(frozen=True)
class KeyMask:
    """A key padding mask prepared for `Attention`.

    Attributes:
        attn_mask: ``(B, 1, 1, L)`` bool for SDPA (True = attend), or None when every key of
            every sample is real (lets SDPA pick its fastest kernel). Samples without any real
            key attend to all keys here (no NaN) and are zeroed by ``keep``.
        keep: ``(B, 1, 1)`` float, 1 for samples with at least one real key, 0 otherwise; None
            when every sample has one.
    """

    attn_mask: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    @classmethod
    def from_bool(
        cls, mask: torch.Tensor | None, batch: int, length: int, where: str = "mask"
    ) -> KeyMask:
        """Prepare a ``(B, L)`` bool mask (None = all real); ``where`` names it in errors."""
        if mask is None:
            return cls()
        if mask.dtype != torch.bool:
            raise ValueError(
                f"{where} must be a bool tensor (True = real token), got dtype {mask.dtype}"
            )
        if tuple(mask.shape) != (batch, length):
            raise ValueError(
                f"{where} must have shape (B, L) = {(batch, length)}, got {tuple(mask.shape)}"
            )
        if bool(mask.all()):
            return cls()
        any_real = mask.any(dim=1)  # (B,)
        attn = mask | ~any_real[:, None]  # empty rows attend everywhere; zeroed by keep
        keep = (
            None if bool(any_real.all()) else any_real.to(torch.float32)[:, None, None]
        )
        return cls(attn_mask=attn[:, None, None, :], keep=keep)


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention.

    Args:
        query_dim: channels of the queries (and of the output).
        context_dim: channels of the keys/values source; None = ``query_dim`` (self-attention
            or AudioLDM's context-free second attention).
        heads: number of heads.
        dim_head: channels per head (inner width ``heads * dim_head``).
        dropout: dropout after the output projection (``to_out.1``).
        bias: bias on ``to_q``/``to_k``/``to_v`` (diffusers ``attention_bias``; False in LDM).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if heads <= 0 or dim_head <= 0:
            raise ValueError(
                f"Attention needs positive heads and dim_head, got {heads} and {dim_head}"
            )
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.context_dim = context_dim
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | KeyMask | None = None,
    ) -> torch.Tensor:
        """``x`` (B, N, query_dim); ``context`` (B, L, context_dim) or None (attend to ``x``);
        ``mask`` (B, L) bool (True = real) or a prepared `KeyMask` -> (B, N, query_dim)."""
        src = x if context is None else context
        b, n, _ = x.shape
        length = src.shape[1]
        if not isinstance(mask, KeyMask):
            mask = KeyMask.from_bool(mask, b, length)
        if length == 0:  # nothing to attend to: exact zero contribution
            return x.new_zeros(x.shape)
        h, d = self.heads, self.dim_head
        q = self.to_q(x).view(b, n, h, d).transpose(1, 2)
        k = self.to_k(src).view(b, length, h, d).transpose(1, 2)
        v = self.to_v(src).view(b, length, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.attn_mask)
        out = self.to_out(out.transpose(1, 2).reshape(b, n, h * d))
        if mask.keep is not None:
            out = out * mask.keep.to(out.dtype)
        return out


class GEGLU(nn.Module):
    """``proj`` to twice the width, then ``a * gelu(b)`` of the two halves."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim_in) -> (..., dim_out)."""
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward ``dim -> mult*dim -> dim`` (``net.0.proj``, ``net.2``)."""

    def __init__(
        self, dim: int, mult: int = 4, dropout: float = 0.0, dim_out: int | None = None
    ) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(
            GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim_out or dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim_out)."""
        return self.net(x)
