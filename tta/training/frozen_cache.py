"""`SegmentCache`: a memo of a frozen encoder's outputs per training segment.

A generator trained on top of frozen encoders (the VAE's posterior, CLAP's audio embedding)
recomputes the same outputs for every clip each epoch. The cache computes them once per segment,
named by ``(clip id, crop start frame)`` (the datamodule puts ``start`` in every batch), and
returns the stored tensors afterwards. What is stored must be a deterministic function of the
segment (e.g. the posterior's parameters, not a sample of it), so training from the cache
equals training with the live encoder.

Entries live in host memory (a 3 s demo latent posterior is ~80 kB); paper-sized datasets want
the on-disk caches of the data layer instead (``tta data shard --with``), whose producers
`check_cache_producer` compares with a model's frozen components.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["SegmentCache", "check_cache_producer", "segment_keys"]


def segment_keys(batch: dict) -> list[tuple[str, int]]:
    """``(id, start)`` of every clip of a datamodule batch (``start`` 0 when the batch has none)."""
    starts = batch.get("start") or [0] * len(batch["id"])
    return [(str(i), int(s)) for i, s in zip(batch["id"], starts, strict=True)]


class SegmentCache:
    """Tensors per key, computed on first request by ``compute(rows)`` for the missing rows."""

    def __init__(self) -> None:
        self._store: dict[Hashable, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    def get(self, keys: Sequence[Hashable], compute: Callable[[list[int]], torch.Tensor],
            device: torch.device | str | None = None) -> torch.Tensor:
        """``(len(keys), ...)``: the stored rows, computing ``compute(rows)`` (a tensor with one
        row per index in ``rows``, in that order) for keys not seen before."""
        first: dict[Hashable, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        missing = [i for k, i in first.items() if k not in self._store]
        if missing:
            values = compute(missing)
            if values.shape[0] != len(missing):
                raise ValueError(f"compute returned {values.shape[0]} rows for {len(missing)} missing keys")
            for row, i in enumerate(missing):
                self._store[keys[i]] = values[row].detach().to("cpu")
        out = torch.stack([self._store[k] for k in keys])
        return out if device is None else out.to(device)


def _show(field: str, value: Any) -> str:
    return str(value)[:12] if field == "sha256" else repr(value)


def check_cache_producer(datamodule: Any, batch_key: str, mine: Mapping[str, Any], what: str, producer: str,
                         fix: str) -> bool:
    """Refuse cached arrays made by another frozen model than this model's.

    ``datamodule.cached_sources()`` (the shards datamodule; the audio datamodules with a
    ``text_cache``) gives the producer metadata the shard / cache index recorded for each batch key
    its training batches carry. When it has ``batch_key`` and any field of ``mine`` (the model's
    own identity, e.g. ``{"sha256": weight fingerprint, "max_length": 50}``) differs, a ValueError names the cached ``what``, the ``producer`` and its
    file, the index, every differing field, and ``fix`` (what to do). Returns whether the batches
    carry ``batch_key`` (False for any other datamodule)."""
    sources = datamodule.cached_sources() if hasattr(datamodule, "cached_sources") else {}
    meta = sources.get(batch_key)
    if meta is None:
        return False
    diff = [f"{field} {_show(field, meta.get(field))} (cache) vs {_show(field, value)} (model)"
            for field, value in mine.items() if meta.get(field) != value]
    if diff:
        where = datamodule.index_path() if hasattr(datamodule, "index_path") else "the shard index"
        raise ValueError(f"the training data's cached {what} were made by {producer} {meta.get('checkpoint')!r} "
                         f"(sources of {where}, batch key {batch_key!r}), not by this model's: {'; '.join(diff)}. "
                         f"{fix}")
    return True
