"""KL (softmax / sigmoid / Bernoulli, MMKL), IS, pairing by id, and DDP sync without padding bias."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tta.metrics.classifier import (
    MMKL,
    InceptionScore,
    KLDivergence,
    inception_score,
    paired_kl,
)
from tta.metrics.pairing import IdMismatchError, first_occurrence, id_hash

pytestmark = pytest.mark.usefixtures("single_thread")


def _logits(n: int, c: int, seed: int) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("variant", ["softmax", "sigmoid", "bernoulli"])
def test_kl_of_identical_distributions_is_zero(variant: str) -> None:
    x = _logits(6, 12, 0)
    assert paired_kl(x, x, variant).abs().max() == 0.0
    metric = KLDivergence(variant)
    ids = [f"clip{i}" for i in range(6)]
    metric.update(x, ids)
    metric.update(x, ids, real=True)
    assert float(metric.compute()) == 0.0


def test_kl_values_match_the_definitions() -> None:
    t, g = _logits(5, 4, 1), _logits(5, 4, 2)
    p, q = t.double().softmax(1), g.double().softmax(1)
    torch.testing.assert_close(paired_kl(t, g, "softmax"), (p * (p / q).log()).sum(1))
    # audioldm_eval: kl_div(log(sigmoid(gen)), sigmoid(target), reduction="sum") / N
    ref = (
        F.kl_div(
            torch.sigmoid(g.double()).log(), torch.sigmoid(t.double()), reduction="sum"
        )
        / 5
    )
    assert float(paired_kl(t, g, "sigmoid").mean()) == pytest.approx(
        float(ref), rel=1e-10
    )
    pt, qg = torch.sigmoid(t.double()), torch.sigmoid(g.double())
    bern = (pt * (pt / qg).log() + (1 - pt) * ((1 - pt) / (1 - qg)).log()).sum(1)
    torch.testing.assert_close(paired_kl(t, g, "bernoulli"), bern)
    assert (paired_kl(t, g, "softmax") > 0).all() and (
        paired_kl(t, g, "bernoulli") > 0
    ).all()
    with pytest.raises(ValueError, match="unknown variant"):
        paired_kl(t, g, "cosine")  # type: ignore[arg-type]


def test_kl_pairs_by_id_in_any_order_and_mmkl_is_sigmoid() -> None:
    t, g = _logits(8, 5, 3), _logits(8, 5, 4)
    ids = [f"c{i}" for i in range(8)]
    metric = MMKL()
    assert metric.variant == "sigmoid"
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()
    metric.update(g[:3], ids[:3])
    metric.update(g[3:], ids[3:])
    metric.update(t[perm], [ids[i] for i in perm], real=True)
    assert float(metric.compute()) == pytest.approx(
        float(paired_kl(t, g, "sigmoid").mean()), rel=1e-12
    )
    names, values = metric.per_item()
    assert sorted(names) == ids and values.shape == (8,)


def test_mismatched_ids_raise_a_clear_error() -> None:
    metric = KLDivergence()
    metric.update(_logits(3, 4, 0), ["a", "b", "c"])
    metric.update(_logits(3, 4, 1), ["a", "b", "d"], real=True)
    with pytest.raises(
        IdMismatchError,
        match=r"1 generated clips have no reference \(c\).*1 reference clips were not generated \(d\)",
    ):
        metric.compute()
    with pytest.raises(ValueError, match="ids are required"):
        KLDivergence().update(_logits(2, 3, 0), None)  # type: ignore[arg-type]


def test_inception_score_bounds() -> None:
    uniform = torch.zeros(20, 7)
    assert inception_score(uniform, splits=2)[0] == pytest.approx(1.0)
    confident = torch.full((20, 5), -50.0)
    confident[torch.arange(20), torch.arange(20) % 5] = (
        50.0  # each class equally often, certain
    )
    mean, std = inception_score(confident, splits=2)
    assert mean == pytest.approx(5.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    metric = InceptionScore(
        splits=1
    )  # the metric orders clips by id hash before splitting
    metric.update(confident[:13], [f"x{i}" for i in range(13)])
    metric.update(confident[13:], [f"x{i}" for i in range(13, 20)])
    assert float(metric.compute()[0]) == pytest.approx(5.0, rel=1e-6)


def test_hash_and_first_occurrence() -> None:
    assert id_hash("clip") == id_hash("clip") != id_hash("clip2")
    h = torch.tensor([5, 3, 5, 9, 3, 1])
    assert first_occurrence(h).tolist() == [0, 1, 3, 5]


# ---------------------------------------------------------------------------------- DDP (gloo)
N_ITEMS = 7  # odd: DistributedSampler pads rank 1 with a repeat of item 0


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"gen": torch.randn(N_ITEMS, 6, generator=g) * 2, "ref": torch.randn(N_ITEMS, 6, generator=g) * 2,
            "text": torch.randn(N_ITEMS, 6, generator=g)}  # fmt: skip


def _compute(indices: list[int]) -> dict[str, float]:
    from tta.metrics.clap_score import CLAPScore
    from tta.metrics.fad import FrechetAudioDistance

    d = _data()
    ids = [f"clip{i}" for i in indices]
    fad, kl, inc, clap = (
        FrechetAudioDistance(),
        KLDivergence("softmax"),
        InceptionScore(splits=1),
        CLAPScore(),
    )
    for lo in range(0, len(indices), 2):  # batches of 2
        idx, sub = indices[lo : lo + 2], ids[lo : lo + 2]
        fad.update(d["gen"][idx], sub)
        fad.update(d["ref"][idx], sub, real=True)
        kl.update(d["gen"][idx], sub)
        kl.update(d["ref"][idx], sub, real=True)
        inc.update(d["gen"][idx], sub)
        clap.update(d["gen"][idx], d["text"][idx], sub)
    return {"fad": float(fad.compute()), "kl": float(kl.compute()), "is": float(inc.compute()[0]),
            "clap": float(clap.compute())}  # fmt: skip


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        indices = list(
            DistributedSampler(
                range(N_ITEMS), num_replicas=world, rank=rank, shuffle=False
            )
        )
        result = _compute(indices)
        result["n_local"] = len(indices)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_synced_metrics_equal_single_process(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    # fork: the children inherit the imported modules (spawning re-imports torch: ~20 s per process)
    mp.start_processes(
        _worker,
        args=(2, _free_port(), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["n_local"] for r in ranks] == [
        4,
        4,
    ]  # 8 items seen for 7 clips: one padded repeat
    single = _compute(list(range(N_ITEMS)))
    for key in ("fad", "kl", "is", "clap"):
        for r in ranks:
            assert r[key] == pytest.approx(single[key], rel=1e-9, abs=1e-12), (
                key,
                r,
                single,
            )
    # the padded repeat would be visible: counting item 0 twice changes the mean KL
    d = _data()
    with_repeat = paired_kl(
        torch.cat([d["ref"], d["ref"][:1]]), torch.cat([d["gen"], d["gen"][:1]])
    ).mean()
    assert not math.isclose(float(with_repeat), single["kl"], rel_tol=1e-6)
