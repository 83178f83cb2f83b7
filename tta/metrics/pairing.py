"""Clip ids inside `torchmetrics` states: hashing, de-duplication across DDP ranks, pairing.

Metrics keep an ``int64`` hash of each clip id next to its features. After the states of all
ranks are gathered, `first_occurrence` drops repeated hashes, so the items that
``DistributedSampler`` repeats to pad the last batch are counted once. Paired metrics match
generated and reference items with `pair_by_id`, which raises `IdMismatchError` naming the ids
that have no partner (never a silent -1).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

_anonymous = itertools.count()


class IdMismatchError(ValueError):
    """Generated and reference clips cannot be paired by id."""


def id_hash(clip_id: str) -> int:
    """A signed 64-bit hash of a clip id (BLAKE2b; stable across processes and runs)."""
    return int.from_bytes(
        hashlib.blake2b(clip_id.encode("utf-8"), digest_size=8).digest(),
        "little",
        signed=True,
    )


def first_occurrence(hashes: torch.Tensor) -> torch.Tensor:
    """Indices of the first occurrence of each distinct hash, in order of appearance."""
    if hashes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=hashes.device)
    uniq, inverse = torch.unique(hashes, return_inverse=True)
    positions = torch.arange(hashes.numel(), device=hashes.device)
    first = torch.full(
        (uniq.numel(),), hashes.numel(), dtype=torch.long, device=hashes.device
    )
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    return first.sort().values


class IdMetric(Metric):
    """A `Metric` whose items carry clip ids (hashed into tensor states, names kept locally)."""

    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._names: dict[int, str] = {}

    def _hashes(self, ids: Sequence[str] | None, n: int, what: str) -> torch.Tensor:
        if ids is None:  # no ids: unique per process, never de-duplicated
            ids = [f"\x00anonymous-{id(self)}-{next(_anonymous)}" for _ in range(n)]
        ids = list(ids)
        if len(ids) != n:
            raise ValueError(
                f"{type(self).__name__}.update: {len(ids)} ids for {n} {what}"
            )
        out = []
        for clip_id in ids:
            if not isinstance(clip_id, str):
                raise TypeError(
                    f"{type(self).__name__}: clip ids must be strings, got {clip_id!r}"
                )
            h = id_hash(clip_id)
            self._names[h] = clip_id
            out.append(h)
        return torch.tensor(out, dtype=torch.long, device=self.device)

    def name_of(self, h: int) -> str:
        """The clip id of a hash when this process saw it, else the hash in hex."""
        return self._names.get(
            int(h), f"<id hash {int(h) & 0xFFFF_FFFF_FFFF_FFFF:016x}>"
        )

    def synced(self) -> AbstractContextManager[None]:
        """Context in which the states hold the items of every rank (as inside ``compute``)."""
        return self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,
                                 should_unsync=self._should_unsync)  # fmt: skip

    @staticmethod
    def _cat(state: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        return dim_zero_cat(state) if isinstance(state, list) else state

    def unique(self, hashes: list[torch.Tensor] | torch.Tensor, *values: list[torch.Tensor] | torch.Tensor
               ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """Concatenated states with repeated ids (DDP padding) removed: ``(hashes, *values)``."""
        h = self._cat(hashes)
        keep = first_occurrence(h)
        return (h[keep], *(self._cat(v)[keep] for v in values))

    def pair_by_id(
        self, gen: torch.Tensor, ref: torch.Tensor, what: str = "clips"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Index tensors ``(i_gen, i_ref)`` matching equal hashes; raises `IdMismatchError` otherwise."""
        gen_pos = {int(h): i for i, h in enumerate(gen.tolist())}
        ref_pos = {int(h): i for i, h in enumerate(ref.tolist())}
        no_ref = [h for h in gen_pos if h not in ref_pos]
        no_gen = [h for h in ref_pos if h not in gen_pos]
        if no_ref or no_gen:
            parts = []
            if no_ref:
                names = ", ".join(self.name_of(h) for h in no_ref[:10])
                parts.append(
                    f"{len(no_ref)} generated {what} have no reference ({names}{', ...' if len(no_ref) > 10 else ''})"
                )
            if no_gen:
                names = ", ".join(self.name_of(h) for h in no_gen[:10])
                parts.append(
                    f"{len(no_gen)} reference {what} were not generated ({names}{', ...' if len(no_gen) > 10 else ''})"
                )
            raise IdMismatchError(
                f"{type(self).__name__}: ids do not match: " + "; ".join(parts)
            )
        order = list(gen_pos)
        i_gen = torch.tensor([gen_pos[h] for h in order], dtype=torch.long)
        i_ref = torch.tensor([ref_pos[h] for h in order], dtype=torch.long)
        return i_gen, i_ref


class PairedIdMetric(IdMetric):
    """An `IdMetric` with one value per (generated, reference) pair, given by ``_values()``.

    Subclasses implement ``_values() -> (hashes, values)``; ``compute`` is the mean over pairs and
    `per_item` the per-clip values, both over every rank's items.
    """

    def _values(self) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def compute(self) -> torch.Tensor:
        return self._values()[1].mean()

    def per_item(self) -> tuple[list[str], torch.Tensor]:
        """Clip ids and their values, synced over ranks."""
        with self.synced():
            hashes, values = self._values()
        return [self.name_of(h) for h in hashes.tolist()], values
