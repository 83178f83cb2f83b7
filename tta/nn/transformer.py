"""Transformer blocks with named cross-attentions, and the spatial transformer of the LDM UNets.

`TransformerBlock` (pre-LayerNorm, residual around each part)::

    x = x + attn1(norm1(x))                              self-attention
    x = x + attn2(norm2(x))                              optional (AudioLDM): a second *self*
                                                         attention (AudioLDM's attn2 has no context)
    x = x + cross_attns[name](cross_norms[name](x), context[name], mask[name])   for each name
    x = x + ff(norm3(x))                                 GEGLU feed-forward

Every named cross-attention has its own LayerNorm, its own key/value width and its own mask, so
"prompt" and "reference captions" (DreamAudio) or "retrieval" (Re-AudioLDM) are separate
attentions of one block. Their output projection ``to_out.0`` starts at zero: adding retrieval
to a trained AudioLDM starts exactly at AudioLDM. A name missing from the call, or a context of
length 0, contributes zero; a sample whose mask is all False gets zero from that attention.

`SpatialTransformer` is diffusers' ``Transformer2DModel`` with ``use_linear_projection=False``
(AudioLDM): GroupNorm ``norm`` (eps 1e-6), 1x1 conv ``proj_in``, ``transformer_blocks``, 1x1 conv
``proj_out``, plus the input as residual (Linear projections with ``use_linear_projection``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from tta.nn.attention import Attention, FeedForward, KeyMask
from tta.nn.blocks import normalization, zero_module

__all__ = [
    "ContextInput",
    "SpatialTransformer",
    "TransformerBlock",
    "check_context_names",
]

# context[name] = (sequence (B, L, D), mask (B, L) bool / prepared KeyMask / None = all real)
ContextInput = Mapping[str, tuple[torch.Tensor, "torch.Tensor | KeyMask | None"]]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_context_names(context_dims: Mapping[str, int] | None) -> dict[str, int]:
    """Validate named context widths: identifier names, positive ints."""
    out: dict[str, int] = {}
    for name, dim in (context_dims or {}).items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(
                f"context name {name!r} must be a Python identifier (letters, digits, _)"
            )
        if int(dim) <= 0:
            raise ValueError(f"context {name!r} needs a positive width, got {dim}")
        out[name] = int(dim)
    return out


class TransformerBlock(nn.Module):
    """Self-attention, optional context-free ``attn2``, named cross-attentions, feed-forward.

    Args:
        dim: token width.
        heads: attention heads (every attention of the block).
        dim_head: channels per head.
        self_attn2: add AudioLDM's second self-attention (``norm2``, ``attn2``).
        context_dims: ``{name: width}`` of the named cross-attentions (``cross_norms[name]``,
            ``cross_attns[name]``; ``to_out.0`` zero-initialised).
        dropout: dropout in the attentions' output and the feed-forward.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        self_attn2: bool = True,
        context_dims: Mapping[str, int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dims = check_context_names(context_dims)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, dim_head, dropout)
        self.self_attn2 = self_attn2
        if self_attn2:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, None, heads, dim_head, dropout)
        self.cross_norms = nn.ModuleDict({name: nn.LayerNorm(dim) for name in dims})
        self.cross_attns = nn.ModuleDict(
            {
                name: Attention(dim, d, heads, dim_head, dropout)
                for name, d in dims.items()
            }
        )
        for attn in self.cross_attns.values():
            zero_module(attn.to_out[0])
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=4, dropout=dropout)

    def forward(
        self, x: torch.Tensor, context: ContextInput | None = None
    ) -> torch.Tensor:
        """``x`` (B, N, dim); ``context[name] = (seq (B, L, D_name), mask)`` -> (B, N, dim)."""
        x = x + self.attn1(self.norm1(x))
        if self.self_attn2:
            x = x + self.attn2(self.norm2(x))
        if context:
            unknown = [name for name in context if name not in self.cross_attns]
            if unknown:
                raise ValueError(
                    f"unknown context name(s) {unknown}; this block has cross-attentions {list(self.cross_attns)}"
                )
            for name, attn in self.cross_attns.items():
                item = context.get(name)
                if item is None or item[0].shape[1] == 0:
                    continue
                seq, mask = item
                x = x + attn(self.cross_norms[name](x), seq, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, with a residual connection.

    Args:
        channels: feature-map channels.
        heads: attention heads; ``dim_head``: channels per head (inner width ``heads*dim_head``).
        depth: number of `TransformerBlock`s.
        self_attn2, context_dims, dropout: passed to every `TransformerBlock`.
        num_groups: GroupNorm groups of ``norm``.
        use_linear_projection: Linear ``proj_in``/``proj_out`` on tokens instead of 1x1 convs.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int = 1,
        self_attn2: bool = True,
        context_dims: Mapping[str, int] | None = None,
        dropout: float = 0.0,
        num_groups: int = 32,
        use_linear_projection: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = normalization(channels, num_groups, eps=1e-6)
        if use_linear_projection:
            self.proj_in: nn.Module = nn.Linear(channels, inner)
            self.proj_out: nn.Module = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, kernel_size=1)
            self.proj_out = nn.Conv2d(inner, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, dim_head, self_attn2, context_dims, dropout)
            for _ in range(depth)
        )

    def forward(
        self, x: torch.Tensor, context: ContextInput | None = None
    ) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, _, hgt, wid = x.shape
        h = self.norm(x)
        if self.use_linear_projection:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(b, hgt * wid, -1))
        else:
            h = self.proj_in(h)
            h = h.permute(0, 2, 3, 1).reshape(b, hgt * wid, h.shape[1])
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear_projection:
            h = self.proj_out(h).reshape(b, hgt, wid, -1).permute(0, 3, 1, 2)
        else:
            h = self.proj_out(
                h.reshape(b, hgt, wid, -1).permute(0, 3, 1, 2).contiguous()
            )
        return h + x
