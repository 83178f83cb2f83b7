"""`gather_records`: evaluation records of every DDP rank, each clip once (2 gloo processes on CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tta.training.gather import gather_records

# rank 1's last item repeats rank 0's first (DistributedSampler padding); rank 1 holds fewer real items
SHARDS = [{"id": ["a", "b", "c"], "emb": [torch.full((2,), float(i)) for i in range(3)], "n": [1, 2, 3]},
          {"id": ["d", "e", "a"], "emb": [torch.full((k, 2), 9.0) for k in (1, 3, 1)], "n": [4, 5, 99]}]


def _rank(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        merged = gather_records(SHARDS[rank])
        torch.save(merged, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_gather_every_item_once(tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for merged in results:
        assert merged["id"] == ["a", "b", "c", "d", "e"]
        assert merged["n"] == [1, 2, 3, 4, 5]  # the padding copy of "a" (n=99) is dropped
        assert [tuple(e.shape) for e in merged["emb"]] == [(2,), (2,), (2,), (1, 2), (3, 2)]
    assert all(torch.equal(x, y) for x, y in zip(results[0]["emb"], results[1]["emb"]))


def test_single_process_deduplicates_and_checks_its_input() -> None:
    merged = gather_records({"id": ["x", "y", "x"], "v": [1, 2, 3]})
    assert merged == {"id": ["x", "y"], "v": [1, 2]}
    with pytest.raises(ValueError, match="differ in length"):
        gather_records({"id": ["x"], "v": [1, 2]})
    with pytest.raises(KeyError, match="no 'id' list"):
        gather_records({"v": [1]})
