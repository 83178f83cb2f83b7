"""`Conditioner`: a named source of one signal a denoiser is conditioned on (DESIGN.md section 3).

A conditioner reads the keys it declares (`reads`, `reads_optional`) from an inputs mapping
(``captions``, ``neighbours``, FiLM embeddings, a batch's raw entries such as ``id``) and returns
its value on one of four routes:

- ``"film"``: a vector ``(B, D)`` (the UNet's FiLM / class embedding; at most one per model);
- ``"context"``: a cross-attention context ``(seq (B, L, D), mask (B, L))`` under its own name;
- ``"concat"``: channels ``(B, C, H, W)`` concatenated to the denoiser's input latents;
- ``"reference"``: ``(R, present)`` for a reference path (multi-reference UNets, DreamAudio):
  ``R`` ``(B, C, K * T_r, F)`` the K reference latents concatenated along time and ``present``
  ``(B,)`` bool (False: that sample has no references). The denoiser receives
  ``reference={name: (R, present)}`` and must declare ``reference_dims[name] = C``
  (`tta.nn.mrc_unet.MRCUNet`: ``{"references": C}``); rows whose ``present`` is False must
  contribute exactly nothing, so the null (an all-False ``present``, the default) is the
  no-reference model.

Classifier-free guidance lives here too: each conditioner has its own training dropout
probability (`dropout`) and its null (`null_value`), the unconditional value of the guidance
branch; rows where ``drop`` is True are replaced by it. `Conditioning` bundles the values of a
batch by route.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

Route = Literal["film", "context", "concat", "reference"]
ROUTES: tuple[str, ...] = ("film", "context", "concat", "reference")
Pair = tuple[torch.Tensor, torch.Tensor]
Value = torch.Tensor | Pair


class MissingInputError(KeyError):
    """An input key a conditioner reads is absent (or None)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def check_probability(p: float, what: str) -> float:
    """``p`` as a float in [0, 1]; ValueError naming ``what`` otherwise."""
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{what} must be a probability in [0, 1], got {p}")
    return p


def drop_mask(batch: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Bool ``(batch,)``: True where the condition is dropped (probability ``p``)."""
    if p <= 0:
        return torch.zeros(batch, dtype=torch.bool)
    return torch.rand(batch, generator=generator) < p


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[1] == length:
        return x
    pad = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


def _cat_pairs(a: dict[str, Pair], b: dict[str, Pair]) -> dict[str, Pair]:
    """Stack ``(seq, mask)`` pairs of the same names along the batch, padded to a common length."""
    out = {}
    for name, (seq_a, mask_a) in a.items():
        seq_b, mask_b = b[name]
        length = max(seq_a.shape[1], seq_b.shape[1])
        out[name] = (torch.cat([_pad(seq_a, length), _pad(seq_b, length)]),
                     torch.cat([_pad(mask_a, length), _pad(mask_b, length)]))
    return out


@dataclass
class Conditioning:
    """The values of a batch by route: FiLM vector ``(B, D)`` (or None), named contexts
    ``name -> (seq (B, L, D), mask (B, L))``, named references ``name -> (R (B, C, K*T_r, F),
    present (B,))``, named concat channels ``name -> (B, C, H, W)`` (concatenated to the latents
    in this order)."""

    film: torch.Tensor | None = None
    context: dict[str, Pair] = field(default_factory=dict)
    concat: dict[str, torch.Tensor] = field(default_factory=dict)
    reference: dict[str, Pair] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """Rows of the batch (from the first value present)."""
        if self.film is not None:
            return int(self.film.shape[0])
        for values in (self.context, self.concat, self.reference):
            for value in values.values():
                return int((value[0] if isinstance(value, tuple) else value).shape[0])
        raise ValueError("an empty conditioning has no batch size")

    def get(self, route: str, name: str) -> Value:
        """The value ``name`` put on ``route``."""
        if route == "film":
            if self.film is None:
                raise KeyError(f"this conditioning has no FiLM vector (for {name!r})")
            return self.film
        values = getattr(self, route)
        if name not in values:
            raise KeyError(f"this conditioning has no {route} {name!r}; it has {sorted(values)}")
        return values[name]

    def with_value(self, route: str, name: str, value: Value) -> Conditioning:
        """A copy with ``value`` as ``name``'s on ``route``."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; routes are {', '.join(ROUTES)}")
        if route == "film":
            return replace(self, film=value)
        return replace(self, **{route: {**getattr(self, route), name: value}})

    def cat(self, other: Conditioning) -> Conditioning:
        """Stack two conditionings along the batch (contexts padded to a common length)."""
        same = all(set(getattr(self, r)) == set(getattr(other, r)) for r in ("context", "concat", "reference"))
        if (self.film is None) != (other.film is None) or not same:
            raise ValueError("cannot stack conditionings with different routes")
        film = None if self.film is None else torch.cat([self.film, other.film])
        concat = {name: torch.cat([x, other.concat[name]]) for name, x in self.concat.items()}
        reference = {name: _cat_same(value, other.reference[name], name) for name, value in self.reference.items()}
        return Conditioning(film, _cat_pairs(self.context, other.context), concat, reference)


def _cat_same(a: Pair, b: Pair, name: str) -> Pair:
    """Stack two reference values along the batch (their other sizes must agree: no padding)."""
    if a[0].shape[1:] != b[0].shape[1:] or a[1].shape[1:] != b[1].shape[1:]:
        raise ValueError(f"cannot stack the references {name!r} of shapes {tuple(a[0].shape)} and {tuple(b[0].shape)}")
    return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])


def _select(drop: torch.Tensor, null: Value, value: Value) -> Value:
    """``null`` where ``drop`` (bool (B,)) is True, ``value`` elsewhere (tensors or pairs)."""
    if isinstance(value, tuple):
        return tuple(_select(drop, n, v) for n, v in zip(null, value))  # type: ignore[return-value]
    where = drop.to(value.device).view(-1, *([1] * (value.dim() - 1)))
    return torch.where(where, null, value)


def _to(value: Value, device: torch.device | str) -> Value:
    if isinstance(value, tuple):
        return tuple(v.to(device) for v in value)  # type: ignore[return-value]
    return value.to(device)


class Conditioner(nn.Module):
    """Base of conditioners: inputs mapping -> the value of one route, with its CFG null.

    Subclasses set ``route`` (class attribute, or the ``route`` argument), ``reads`` (required
    input keys) and ``reads_optional``, ``dim`` (the FiLM / context / reference width or the
    concat channels, checked against the denoiser) and implement `encode`; a FiLM conditioner
    also implements `null_value` (contexts and references default to an all-False mask, concat
    channels to zeros).

    Args:
        dropout: probability of dropping this condition in training (classifier-free guidance);
            None: the model's ``cfg_dropout`` sets it.
        route: the route, when the class lets configs choose it.

    ``name`` is the key the conditioner is configured under (set by the model owning it).
    A conditioner that can read precomputed token states of its frozen text encoder names their
    batch key in ``cached_tokens_key`` and exposes that encoder as ``text_encoder`` (modules check
    the cache's producer against it at fit start).
    """

    route: str = ""
    reads: tuple[str, ...] = ()
    reads_optional: tuple[str, ...] = ()
    dim: int = 0
    cached_tokens_key: str | None = None

    def __init__(self, dropout: float | None = None, route: Route | None = None) -> None:
        super().__init__()
        if route is not None:
            self.route = route
        if self.route not in ROUTES:
            raise ValueError(f"{type(self).__name__}: route must be one of {', '.join(ROUTES)}, got {self.route!r}")
        self.dropout = None if dropout is None else check_probability(dropout, f"{type(self).__name__} dropout")
        self.name = type(self).__name__

    # ------------------------------------------------------------------ inputs
    def as_inputs(self, inputs: Mapping[str, Any] | Any) -> Mapping[str, Any]:
        """``inputs`` itself, or (a conditioner called on its one value) ``{reads[0]: inputs}``."""
        if isinstance(inputs, Mapping):
            return inputs
        if not self.reads:
            raise TypeError(f"conditioner {self.name!r} takes an inputs mapping, got a {type(inputs).__name__}")
        return {self.reads[0]: inputs}

    def check_inputs(self, inputs: Mapping[str, Any]) -> None:
        """MissingInputError naming every required key that is absent or None."""
        missing = [key for key in self.reads if inputs.get(key) is None]
        if missing:
            raise MissingInputError(
                f"conditioner {self.name!r} ({type(self).__name__}) reads input(s) {missing}, missing from the "
                f"inputs given (keys: {sorted(k for k, v in inputs.items() if v is not None)})"
            )

    @property
    def device(self) -> torch.device:
        """The device of the conditioner's first parameter or buffer (CPU when it has none)."""
        for t in (*self.parameters(), *self.buffers()):
            return t.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ values
    def encode(self, inputs: Mapping[str, Any], device: torch.device) -> Value:
        """The value of the batch (no dropout): a tensor, or ``(seq, mask)`` for contexts/references."""
        raise NotImplementedError

    def null_value(self, value: Value) -> Value:
        """The unconditional value of the same batch as ``value`` (guidance's branch)."""
        if self.route == "concat":
            return torch.zeros_like(value)
        if self.route in ("context", "reference"):
            seq, mask = value
            return seq, torch.zeros_like(mask)
        raise NotImplementedError(f"{type(self).__name__} routes to {self.route!r} and must define null_value")

    def forward(self, inputs: Mapping[str, Any] | Any, drop: torch.Tensor | None = None,
                device: torch.device | str | None = None) -> Value:
        """Its value for ``inputs`` on ``device``, rows where ``drop`` (bool (B,)) is True replaced by the null."""
        inputs = self.as_inputs(inputs)
        self.check_inputs(inputs)
        device = self.device if device is None else torch.device(device)
        value = self.encode(inputs, device)
        if drop is not None and drop.any():
            value = _select(drop, self.null_value(value), value)
        return _to(value, device)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, route={self.route!r}, dim={self.dim}, dropout={self.dropout}"


def as_drop_names(drop: str | Sequence[str]) -> tuple[str, ...]:
    """Names to drop, a single name accepted."""
    return (drop,) if isinstance(drop, str) else tuple(drop)
