"""`ConditionedModel`: a generator's named set of conditioners, routed to its denoiser.

The generator keeps its conditioners as submodules named by their keys (state-dict entries
``<name>.*``: AudioLDM checkpoints' ``model.text.*`` / ``model.retrieval.*`` stay valid) and
loops over them: building a batch's `Conditioning`, the guidance branch's nulls (any subset by
name), the training dropout masks (each conditioner's own probability) and the check of their
routes and widths against the denoiser (``film_dim``, ``context_dims[name]``,
``reference_dims[name]``, ``in_channels`` = ``out_channels`` + concat channels).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tta.generators.conditioning.base import Conditioner, Conditioning, as_drop_names, check_probability, drop_mask

log = logging.getLogger(__name__)


class ConditionedModel(nn.Module):
    """Base of generators conditioned by ``{name: Conditioner}`` (see the module docstring).

    Subclasses call `attach_conditioners` in ``__init__`` and `check_denoiser` once the denoiser
    is known. ``optional_conditioners`` lists names that read as None when the model has no such
    conditioner (``model.retrieval is None`` for plain AudioLDM); any other unknown attribute
    still raises AttributeError.
    """

    conditioner_names: tuple[str, ...] = ()
    optional_conditioners: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in type(self).optional_conditioners:
                return None
            raise

    # ------------------------------------------------------------------ the set
    def attach_conditioners(self, conditioners: Mapping[str, Conditioner],
                            cfg_dropout: float | Mapping[str, float] = 0.0) -> None:
        """Register ``conditioners`` as submodules under their names; ``cfg_dropout`` (a float for
        all, or by name, missing names 0) sets the dropout of those not given their own."""
        who = type(self).__name__
        if not isinstance(conditioners, Mapping):
            raise TypeError(f"{who}: conditioners must be a dict of name -> Conditioner, "
                            f"got a {type(conditioners).__name__}")
        taken = set(dir(self))
        for name, cond in conditioners.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"{who}: conditioner name {name!r} must be a Python identifier (it names a submodule)")
            if name in taken:
                raise ValueError(f"{who}: conditioner name {name!r} clashes with an attribute of {who}; rename it")
            if not isinstance(cond, Conditioner):
                raise TypeError(f"{who}: conditioner {name!r} is a {type(cond).__name__}, not a "
                                "tta.generators.conditioning.Conditioner")
        for name, cond in conditioners.items():
            cond.name = name
            setattr(self, name, cond)  # nn.Module.__setattr__ registers the submodule
        self.conditioner_names = tuple(conditioners)
        self._resolve_dropout(cfg_dropout)

    @property
    def conditioners(self) -> dict[str, Conditioner]:
        """``{name: conditioner}`` in their order."""
        return {name: getattr(self, name) for name in self.conditioner_names}

    @property
    def cfg_dropout(self) -> dict[str, float]:
        """Training dropout probability by conditioner."""
        return {name: float(c.dropout) for name, c in self.conditioners.items()}

    def known(self, names: Iterable[str], what: str) -> list[str]:
        """``names`` as a list; ValueError listing the known conditioners if any is unknown."""
        names = list(names)
        unknown = [n for n in names if n not in self.conditioner_names]
        if unknown:
            raise ValueError(f"{what} names unknown conditioner(s) {unknown}; this model's conditioners are "
                             f"{list(self.conditioner_names)}")
        return names

    def _resolve_dropout(self, cfg_dropout: float | Mapping[str, float]) -> None:
        by_name = isinstance(cfg_dropout, Mapping)
        given = dict(cfg_dropout) if by_name else dict.fromkeys(self.conditioner_names, cfg_dropout)
        self.known(given, "cfg_dropout")
        for name, cond in self.conditioners.items():
            p = check_probability(given.get(name, 0.0), f"cfg_dropout[{name!r}]")
            if cond.dropout is None:
                cond.dropout = p
            elif by_name and name in given and p != cond.dropout:
                raise ValueError(f"cfg_dropout[{name!r}] = {p} contradicts the conditioner's own dropout "
                                 f"{cond.dropout}; give it in one place")
            else:
                log.debug("conditioner %r keeps its own dropout %s", name, cond.dropout)

    # ------------------------------------------------------------------ routes
    def routed(self, route: str) -> dict[str, Conditioner]:
        """The conditioners on ``route``."""
        return {n: c for n, c in self.conditioners.items() if c.route == route}

    @property
    def concat_channels(self) -> int:
        """Channels the concat conditioners add to the denoiser's input."""
        return sum(int(c.dim) for c in self.routed("concat").values())

    def check_denoiser(self, denoiser: nn.Module) -> None:
        """ValueError unless every conditioner's route exists on ``denoiser`` with its width."""
        film = self.routed("film")
        if len(film) > 1:
            raise ValueError(f"at most one conditioner can route to film; got {sorted(film)}")
        film_dim = getattr(denoiser, "film_dim", None)
        if film_dim is not None:
            for name, c in film.items():
                if int(c.dim) != film_dim:
                    raise ValueError(f"the UNet's film_dim is {film_dim} but the {name!r} conditioner "
                                     f"({type(c).__name__}) gives {c.dim}")
            if film_dim > 0 and not film:
                raise ValueError(f"the UNet takes a FiLM vector (film_dim={film_dim}) but no conditioner routes to film")
        for route, attr in (("context", "context_dims"), ("reference", "reference_dims")):
            dims = getattr(denoiser, attr, None)
            for name, c in self.routed(route).items():
                if dims is None or name not in dims:
                    raise ValueError(
                        f"conditioner {name!r} ({type(c).__name__}) routes to the {route} {name!r}, but the "
                        f"{type(denoiser).__name__} has " + (f"no {attr}" if dims is None else
                                                            f"{attr} only for {sorted(dims)}")
                        + f"; add {attr}: {{{name}: {c.dim}}} to it")
                if int(dims[name]) != int(c.dim):
                    raise ValueError(f"the {name!r} conditioner projects to {c.dim} but the UNet's "
                                     f"{attr}[{name!r}] is {dims[name]}")
        in_ch, out_ch = getattr(denoiser, "in_channels", None), getattr(denoiser, "out_channels", None)
        if in_ch is not None and out_ch is not None and in_ch != out_ch + self.concat_channels:
            concat = {n: c.dim for n, c in self.routed("concat").items()}
            raise ValueError(f"the UNet's in_channels ({in_ch}) must be its out_channels ({out_ch}, the latents) "
                             f"plus the concat conditioners' channels {concat or '(none)'}")

    # ------------------------------------------------------------------ values
    def condition(self, inputs: Mapping[str, Any], drop: Mapping[str, torch.Tensor] | None = None,
                  device: torch.device | str | None = None) -> Conditioning:
        """The batch's `Conditioning`; ``drop[name]`` (bool (B,)) replaces rows by that conditioner's null."""
        drop = dict(drop or {})
        self.known(drop, "drop")
        cond = Conditioning()
        for name, c in self.conditioners.items():
            cond = cond.with_value(c.route, name, c(inputs, drop.get(name), device=device))
        return cond

    def unconditional(self, cond: Conditioning, drop: str | Sequence[str] | None = None) -> Conditioning:
        """``cond`` with the conditioners named in ``drop`` (all by default) replaced by their nulls."""
        names = self.conditioner_names if drop is None else self.known(as_drop_names(drop), "drop")
        out = cond
        for name in names:
            c = getattr(self, name)
            out = out.with_value(c.route, name, c.null_value(cond.get(c.route, name)))
        return out

    def training_drop(self, batch: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Independent classifier-free-guidance dropout masks, each with its conditioner's probability."""
        return {name: drop_mask(batch, float(c.dropout), generator) for name, c in self.conditioners.items()}
