"""EpochSampler (deterministic, sharded, skippable order) and ResumableDataLoader (exact resume)."""

from __future__ import annotations

import pytest
from torch.utils.data import Dataset

from tta.data.sampling import EpochSampler, ResumableDataLoader

pytestmark = pytest.mark.usefixtures("single_thread")


class KeyDataset(Dataset):
    """Returns the (index, seed) key it was asked for, so batches show exactly what was sampled."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        index, seed = key
        return {"id": index, "seed": seed}


def _collate(batch):
    return [(b["id"], b["seed"]) for b in batch]


def _loader(n: int = 23, batch_size: int = 3, seed: int = 5, **kw) -> ResumableDataLoader:
    ds = KeyDataset(n)
    sampler = EpochSampler(ds, shuffle=True, seed=seed, batch_size=batch_size, **kw)
    return ResumableDataLoader(ds, sampler, batch_size=batch_size, collate_fn=_collate, drop_last=True)


def _order(sampler: EpochSampler) -> list[int]:
    return [i for i, _ in sampler]


def test_yields_index_seed_pairs():
    s = EpochSampler(KeyDataset(10), shuffle=True, seed=1)
    pairs = list(s)
    assert len(pairs) == len(s) == 10
    assert all(isinstance(i, int) and isinstance(sd, int) and 0 <= sd < 2**31 - 1 for i, sd in pairs)
    assert sorted(i for i, _ in pairs) == list(range(10))
    assert len({sd for _, sd in pairs}) > 1  # per-item seeds differ


def test_order_is_a_function_of_seed_and_epoch():
    ds = KeyDataset(50)
    a, b = EpochSampler(ds, seed=3), EpochSampler(ds, seed=3)
    for epoch in (0, 1, 7):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert list(a) == list(b)
    a.set_epoch(0)
    e0 = list(a)
    assert list(a) == e0  # re-iterating the same epoch repeats it
    a.set_epoch(1)
    e1 = list(a)
    assert [i for i, _ in e1] != [i for i, _ in e0]
    assert sorted(i for i, _ in e1) == sorted(i for i, _ in e0) == list(range(50))
    other_seed = EpochSampler(ds, seed=4)
    assert _order(other_seed) != [i for i, _ in e0]
    # an item's seed is fixed for an epoch whatever its position, and differs between epochs
    seeds0, seeds1 = dict(e0), dict(e1)
    assert seeds0 != seeds1


def test_no_shuffle_is_sequential():
    s = EpochSampler(KeyDataset(12), shuffle=False, seed=9)
    assert _order(s) == list(range(12))
    s.set_epoch(3)
    assert _order(s) == list(range(12))


def test_skip_batches_skips_once_then_resets():
    s = EpochSampler(KeyDataset(20), seed=2, batch_size=4)
    s.set_epoch(1)
    full = list(s)
    s.skip_batches = 3
    assert list(s) == full[12:]
    assert s.skip_batches == 0
    assert list(s) == full  # the next pass over the epoch is complete again


def test_set_epoch_resets_skip_only_on_a_new_epoch():
    s = EpochSampler(KeyDataset(20), seed=2, batch_size=4)
    s.set_epoch(1)
    full = list(s)
    s.skip_batches = 2
    s.set_epoch(1)  # Lightning re-announcing the current epoch keeps the resume position
    assert list(s) == full[8:]
    s.skip_batches = 2
    s.set_epoch(2)
    assert s.skip_batches == 0 and len(list(s)) == 20


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("n", [20, 21])
def test_sharding_is_disjoint_and_equal(shuffle, n):
    ds = KeyDataset(n)
    shards = []
    for rank in range(2):
        s = EpochSampler(ds, shuffle=shuffle, seed=11, num_replicas=2, rank=rank)
        s.set_epoch(4)
        shards.append(list(s))
        assert len(shards[-1]) == len(s) == n // 2
    i0, i1 = ({i for i, _ in sh} for sh in shards)
    assert len(i0) == len(i1) == n // 2
    assert not i0 & i1
    assert len(i0 | i1) == 2 * (n // 2)
    # both ranks agree on the per-item seeds (one global draw per epoch)
    s_all = EpochSampler(ds, shuffle=shuffle, seed=11)
    s_all.set_epoch(4)
    single = dict(s_all)
    for sh in shards:
        assert all(single[i] == sd for i, sd in sh)


@pytest.mark.parametrize("n, world", [(10, 3), (7, 4), (2, 3), (9, 3)])
def test_padded_sharding_covers_every_item_with_equal_shards(n, world):
    """Evaluation sharding: equal shard sizes, every item at least once, repeats only to even out."""
    ds = KeyDataset(n)
    shards = [list(EpochSampler(ds, shuffle=True, seed=5, num_replicas=world, rank=r, pad=True)) for r in range(world)]
    per_rank = -(-n // world)
    assert [len(sh) for sh in shards] == [per_rank] * world
    seen = [i for sh in shards for i, _ in sh]
    assert set(seen) == set(range(n)) and len(seen) - n == per_rank * world - n
    assert len(EpochSampler(ds, num_replicas=world, pad=True)) == per_rank
    single = dict(EpochSampler(ds, shuffle=True, seed=5))  # the same per-item seeds as one process
    assert all(single[i] == sd for sh in shards for i, sd in sh)


def test_sharding_with_skip_skips_per_rank_batches():
    ds = KeyDataset(24)
    s = EpochSampler(ds, seed=0, num_replicas=2, rank=1, batch_size=3)
    full = list(s)
    s.skip_batches = 2
    assert list(s) == full[6:]


def test_state_dict_round_trip_resumes_exactly():
    reference = _loader()
    reference.sampler.set_epoch(2)
    uninterrupted = list(reference)
    assert len(uninterrupted) == 23 // 3

    run = _loader()
    run.sampler.set_epoch(2)
    it = iter(run)
    seen = []
    for _ in range(3):
        seen.append(next(it))
        run.mark_consumed()
    next(it)  # prefetched by the training loop but never trained on: not consumed
    state = run.state_dict()
    assert state == {"epoch": 2, "consumed": 3}
    assert seen == uninterrupted[:3]

    fresh = _loader()  # a new process: sampler at epoch 0, no position
    fresh.load_state_dict(state)
    assert fresh.sampler.epoch == 2
    rest = list(fresh)
    assert rest == uninterrupted[3:]
    assert seen + rest == uninterrupted
    # the position counts from the resumed batch on, and the next pass over the epoch is whole
    assert fresh.consumed == 3
    assert list(fresh) == uninterrupted
    assert fresh.consumed == 0


def test_state_dict_round_trip_under_sharding():
    ref = _loader(n=40, batch_size=2, num_replicas=2, rank=1)
    ref.sampler.set_epoch(1)
    uninterrupted = list(ref)
    run = _loader(n=40, batch_size=2, num_replicas=2, rank=1)
    run.sampler.set_epoch(1)
    it = iter(run)
    for _ in range(4):
        next(it)
        run.mark_consumed()
    fresh = _loader(n=40, batch_size=2, num_replicas=2, rank=1)
    fresh.load_state_dict(run.state_dict())
    assert list(fresh) == uninterrupted[4:]


def test_state_with_no_progress_gives_the_whole_epoch():
    ref = _loader()
    ref.sampler.set_epoch(5)
    fresh = _loader()
    fresh.load_state_dict({"epoch": 5, "consumed": 0})
    assert list(fresh) == list(ref)
