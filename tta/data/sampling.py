"""Resumable, rank-aware sampling: the data position is part of every checkpoint.

`EpochSampler` yields ``(index, item_seed)`` pairs in an order fixed by ``(seed, epoch)``; the
item seed drives per-clip randomness (crop offsets) so a clip gets the same crop after a resume.
`ResumableDataLoader` implements Lightning's ``state_dict`` / ``load_state_dict`` loader
protocol: a run resumed from a mid-epoch checkpoint continues with exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class EpochSampler(DistributedSampler):
    """Deterministic (optionally shuffled) sampler, sharded over ``num_replicas`` ranks.

    Subclasses ``DistributedSampler`` so Lightning keeps it under DDP instead of wrapping it.
    Every rank gets ``len(dataset) // num_replicas`` items (the remainder is left out of that
    epoch; with shuffling, a different remainder every epoch). With ``pad=True`` (evaluation)
    every item is seen: ranks get ``ceil(len / num_replicas)`` items, the order wrapped around
    for the last few, so all ranks step equally and metrics keyed by clip id count the repeated
    items once.
    """

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        batch_size: int = 1,
        pad: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.pad = pad
        self.skip_batches = 0
        self.epoch_offset = 0  # data epoch - Lightning's epoch (non-zero after resuming an unfinished epoch)
        self.continue_epoch = False

    def set_epoch(self, epoch: int) -> None:
        """Lightning's epoch -> this sampler's data epoch. Right after a restore of an unfinished
        data epoch, the first call keeps that epoch (and its position) whatever Lightning's number:
        Lightning counts a run stopped by ``max_steps`` mid-epoch as a finished epoch, but its data
        is not, so a run extended from that checkpoint first sees the rest of it."""
        if self.continue_epoch:
            self.continue_epoch = False
            self.epoch_offset = self.epoch - epoch
            return
        epoch += self.epoch_offset
        if epoch != self.epoch:
            self.skip_batches = 0
        super().set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.dataset)  # type: ignore[arg-type]
        return -(-n // self.num_replicas) if self.pad else n // self.num_replicas

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = len(self.dataset)  # type: ignore[arg-type]
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        item_seeds = torch.randint(0, 2**31 - 1, (n,), generator=g)
        per_rank = len(self)
        if self.pad and n:
            order = order.repeat(-(-per_rank * self.num_replicas // n))  # wrap around for the last few
        mine = order[self.rank : per_rank * self.num_replicas : self.num_replicas]
        start = self.skip_batches * self.batch_size
        self.skip_batches = 0
        for idx in mine[start:].tolist():
            yield idx, int(item_seeds[idx])


class ResumableDataLoader(DataLoader):
    """A DataLoader over an `EpochSampler` whose position is saved in checkpoints.

    ``consumed`` counts batches the training loop actually used (Lightning prefetches ahead, so
    the loader's own iteration count is not the position); `mark_consumed` is called by the
    datamodule for every training batch.
    """

    def __init__(self, dataset: Dataset, sampler: EpochSampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.consumed = 0

    def __iter__(self) -> Iterator[Any]:
        # Lightning re-creates evaluation/predict loaders with its own sampler: no position then
        self.consumed = getattr(self.sampler, "skip_batches", 0)
        return super().__iter__()

    def mark_consumed(self) -> None:
        self.consumed += 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "consumed": int(self.consumed)}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: EpochSampler = self.sampler  # type: ignore[assignment]
        sampler.epoch = int(state["epoch"])  # the data epoch of the checkpoint
        sampler.skip_batches = int(state["consumed"])
        sampler.continue_epoch = 0 < sampler.skip_batches < len(self)  # unfinished: continue it
        self.consumed = int(state["consumed"])
