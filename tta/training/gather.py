"""Gather per-item evaluation records from every DDP rank, without duplicates.

Lightning's `DistributedSampler` pads the last batches so that every rank gets as many items;
the padding repeats items, so a metric over the gathered set would count them twice. Records
are gathered as Python objects (tensors moved to CPU; ranks may hold different numbers of items
and ragged per-item tensors) and de-duplicated by id, keeping the first occurrence in rank order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["gather_records"]


def _to_cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def gather_records(records: dict[str, list[Any]], key: str = "id") -> dict[str, list[Any]]:
    """``records`` (equal-length per-item lists, one of them ``key``) of this rank -> the same lists
    over all ranks (rank order), one entry per distinct ``key``. Single process: de-duplicated only.
    Every rank must call it (a collective under an initialised process group)."""
    if key not in records:
        raise KeyError(f"gather_records: records have no {key!r} list (have: {sorted(records)})")
    lengths = {name: len(values) for name, values in records.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"gather_records: per-item lists differ in length: {lengths}")
    local = {name: [_to_cpu(v) for v in values] for name, values in records.items()}
    shards = [local]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shards = [None] * dist.get_world_size()
        dist.all_gather_object(shards, local)
    out: dict[str, list[Any]] = {name: [] for name in records}
    seen: set[Any] = set()
    for shard in shards:
        for i, item_key in enumerate(shard[key]):
            if item_key in seen:
                continue
            seen.add(item_key)
            for name, values in out.items():
                values.append(shard[name][i])
    return out
