"""VectorQuantizer: straight-through gradients, eq. 3 for both beta placements, EMA formula, dead-code
restart, k-means init, perplexity / usage, cosine codes, DDP agreement (2 gloo processes), and the
time-major flatten of a code grid."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tta.nn.quantize import VectorQuantizer, code_statistics, flatten_time_major, unflatten_time_major

pytestmark = pytest.mark.usefixtures("single_thread")


def _vq(codes: list[list[float]], **kwargs) -> VectorQuantizer:
    vq = VectorQuantizer(num_codes=len(codes), dim=len(codes[0]), **kwargs)
    vq.set_codes(torch.arange(len(codes)), torch.tensor(codes))
    return vq


def _column(values: list[float]) -> torch.Tensor:
    """1-D values as a (1, 1, 1, N) encoder output (dim 1)."""
    return torch.tensor(values).reshape(1, 1, 1, -1)


def test_straight_through_gradient_of_z_e_equals_gradient_of_z_q() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=8, dim=3)
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    z_q, _, info = vq(z)
    # the output is exactly the selected codes
    assert torch.equal(z_q, vq.indices_to_codes(info["indices"]))
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward()
    assert torch.equal(z.grad, g)
    assert vq.codebook.grad is None  # only the VQ loss reaches the codebook


@pytest.mark.parametrize("legacy", [False, True])
def test_eq3_loss_and_gradients_on_a_hand_made_example(legacy: bool) -> None:
    # codes 0 and 10; z = 1, 2 -> 0 and 9, 12 -> 10; squared errors 1, 4, 1, 4 (mean 2.5)
    vq = _vq([[0.0], [10.0]], beta=0.25, legacy_beta_placement=legacy)
    z = _column([1.0, 2.0, 9.0, 12.0]).requires_grad_(True)
    z_q, loss, info = vq(z)
    assert info["indices"].flatten().tolist() == [0, 0, 1, 1]
    assert z_q.flatten().tolist() == [0.0, 0.0, 10.0, 10.0]
    assert info["codebook_loss"].item() == 2.5 and info["commitment_loss"].item() == 2.5
    assert loss.item() == 2.5 + 0.25 * 2.5  # same value for both placements here; the gradients differ
    loss.backward()
    w_codebook, w_commit = (0.25, 1.0) if legacy else (1.0, 0.25)
    # d/dz of w_commit * mean((z - sg[q])^2) = w_commit * 2 (z - q) / 4
    expected_z = w_commit * 0.5 * torch.tensor([1.0, 2.0, -1.0, 2.0])
    torch.testing.assert_close(z.grad.flatten(), expected_z, rtol=0, atol=1e-7)
    # d/de_k of w_codebook * mean((sg[z] - e_k)^2) over its assignments: code 0: (2(0-1) + 2(0-2)) / 4
    expected_codes = w_codebook * torch.tensor([[-1.5], [-0.5]])
    torch.testing.assert_close(vq.codebook.grad, expected_codes, rtol=0, atol=1e-7)


def test_ema_update_formula_exact_values_after_one_update() -> None:
    vq = _vq([[0.0], [10.0]], beta=0.25, ema_decay=0.5, ema_epsilon=0.1)
    assert not isinstance(vq.codebook, torch.nn.Parameter)
    z = _column([1.0, 2.0, 3.0, 12.0])  # counts (3, 1), sums (6, 12)
    z_q, loss, _ = vq(z)
    assert z_q.flatten().tolist() == [0.0, 0.0, 0.0, 10.0]  # quantized with the codebook before the update
    assert loss.item() == pytest.approx(0.25 * (1 + 4 + 9 + 4) / 4, abs=1e-7)  # commitment only
    # N = 0.5 * 1 + 0.5 * n = (2, 1); m = 0.5 * e + 0.5 * sum = (3, 11); n_tot = 3
    torch.testing.assert_close(vq.ema_cluster_size, torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(vq.ema_embed_sum, torch.tensor([[3.0], [11.0]]))
    smoothed = [(2.0 + 0.1) / (3.0 + 2 * 0.1) * 3.0, (1.0 + 0.1) / (3.0 + 2 * 0.1) * 3.0]
    expected = torch.tensor([[3.0 / smoothed[0]], [11.0 / smoothed[1]]])
    torch.testing.assert_close(vq.codebook, expected, rtol=1e-6, atol=0)
    # eval mode never updates
    before = vq.codebook.clone()
    vq.eval()(z)
    assert torch.equal(vq.codebook, before) and int(vq.steps) == 1


def as_z(rows: torch.Tensor) -> torch.Tensor:
    """Vectors ``(N, dim)`` as a (1, dim, 1, N) encoder output."""
    return rows.t().reshape(1, rows.shape[1], 1, -1)


def test_dead_code_restart_replaces_exactly_the_dead_codes() -> None:
    vq = _vq([[0.0, 0.0], [10.0, 10.0], [100.0, 100.0], [-100.0, -100.0]], restart_after=2)
    near = torch.tensor([[0.1, -0.1], [9.0, 11.0], [0.2, 0.3], [10.5, 9.5]])
    vq(as_z(near))
    vq(as_z(near + 0.01))
    assert vq.unused_steps.tolist() == [0, 0, 2, 2]
    before = vq.codebook.detach().clone()
    third = near + 0.02
    _, _, info = vq(as_z(third))
    after = vq.codebook.detach()
    assert torch.equal(after[:2], before[:2])  # live codes untouched
    rows = {tuple(r) for r in third.tolist()}
    new = [tuple(r) for r in after[2:].tolist()]
    assert all(r in rows for r in new) and new[0] != new[1]  # drawn from the current encoder outputs
    assert vq.unused_steps[2:].tolist() == [0, 0]  # a new code is its own row's nearest code
    assert set(info["indices"].flatten().tolist()) >= {2, 3}
    # the same draws again from the same state (seeded by the quantizer's step counter)
    again = _vq([[0.0, 0.0], [10.0, 10.0], [100.0, 100.0], [-100.0, -100.0]], restart_after=2)
    for rows_ in (near, near + 0.01, third):
        again(as_z(rows_))
    assert torch.equal(again.codebook.detach(), after)


def test_kmeans_initialisation_from_the_first_batch() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    pts = torch.cat([c + 0.1 * torch.randn(20, 2, generator=g) for c in centres])
    vq = VectorQuantizer(num_codes=3, dim=2, kmeans_init=True, kmeans_iters=10)
    assert int(vq.initialized) == 0
    z = pts.t().reshape(1, 2, 1, -1)
    vq(z)
    assert int(vq.initialized) == 1
    codes = vq.codebook.detach()
    # a fixed point of Lloyd's iteration: every code is the mean of the points assigned to it
    assign = vq.nearest(pts)
    for k in range(3):
        torch.testing.assert_close(codes[k], pts[assign == k].mean(0), rtol=0, atol=1e-5)
    # and, for this seed, the three clusters are found
    found = sorted(tuple(round(v) for v in c) for c in codes.tolist())
    assert found == sorted(tuple(int(v) for v in c) for c in centres.tolist())
    vq(z + 1.0)  # a second batch does not re-initialise
    torch.testing.assert_close(vq.codebook.detach(), codes)
    vq_eval = VectorQuantizer(num_codes=3, dim=2, kmeans_init=True).eval()
    vq_eval(z)
    assert int(vq_eval.initialized) == 0  # only training batches initialise


def test_perplexity_and_usage_exact_on_a_hand_made_assignment() -> None:
    vq = _vq([[0.0], [10.0], [20.0], [30.0]])
    _, _, info = vq(_column([0.0, 0.0, 10.0, 20.0]))  # counts (2, 1, 1, 0)
    assert info["counts"].tolist() == [2.0, 1.0, 1.0, 0.0]
    # H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2 -> perplexity 2 ** 1.5
    assert info["perplexity"].item() == pytest.approx(2**1.5, rel=1e-6)
    assert info["usage"].item() == 0.75
    uniform = code_statistics(torch.ones(16))
    assert uniform["perplexity"].item() == pytest.approx(16.0, rel=1e-6) and uniform["usage"].item() == 1.0


def test_cosine_codes_are_unit_norm_and_nearest_by_angle() -> None:
    vq = _vq([[1.0, 0.0], [0.0, 3.0]], cosine=True)
    assert torch.allclose(vq.codes().norm(dim=1), torch.ones(2))
    z = torch.tensor([[5.0, 1.0], [0.1, 0.2]]).t().reshape(1, 2, 1, 2)
    z_q, _, info = vq(z)
    assert info["indices"].flatten().tolist() == [0, 1]
    torch.testing.assert_close(z_q.reshape(2, 2).t(), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_bf16_autocast_quantizes_in_float32() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=64, dim=8)
    z = torch.randn(2, 8, 4, 4)
    _, _, ref = vq.eval()(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, loss, info = vq(z)
    assert torch.equal(info["indices"], ref["indices"]) and z_q.dtype == torch.float32 and loss.dtype == torch.float32


def test_bad_input_is_refused_by_name() -> None:
    vq = VectorQuantizer(num_codes=4, dim=2)
    with pytest.raises(ValueError, match=r"z_e of shape \(B, 2, H, W\)"):
        vq(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"indices must be in \[0, 4\)"):
        vq.indices_to_codes(torch.tensor([[[4]]]))
    with pytest.raises(ValueError, match="integer indices"):
        vq.indices_to_codes(torch.zeros(1, 1, 1))
    for kwargs, field in [({"ema_decay": 1.0}, "ema_decay"), ({"restart_after": 0}, "restart_after"),
                          ({"beta": -1.0}, "beta"), ({"num_codes": 0}, "num_codes")]:
        with pytest.raises(ValueError, match=field):
            VectorQuantizer(**kwargs)


def test_time_major_flatten_round_trip() -> None:
    grid = torch.arange(24).reshape(2, 3, 4)  # (B, H=freq 3, W=time 4)
    seq = flatten_time_major(grid)
    # column-major: every frequency row of time step 0, then time step 1, ...
    assert seq[0].tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    for h in range(3):
        for w in range(4):
            assert torch.equal(seq[:, w * 3 + h], grid[:, h, w])
    assert torch.equal(unflatten_time_major(seq, freq=3), grid)
    with pytest.raises(ValueError, match="freq=5"):
        unflatten_time_major(seq, freq=5)
    with pytest.raises(ValueError, match=r"\(B, freq, time\)"):
        flatten_time_major(seq)


# ------------------------------------------------------------------ DDP (2 gloo processes)

def _quantizers() -> dict[str, VectorQuantizer]:
    torch.manual_seed(0)
    return {"ema": VectorQuantizer(num_codes=6, dim=2, ema_decay=0.8),
            "draws": VectorQuantizer(num_codes=6, dim=2, ema_decay=0.8, kmeans_init=True, kmeans_iters=3,
                                     restart_after=1)}


def _ddp_rank(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        data = torch.load(os.path.join(out, "data.pt"))
        states = {}
        for name, vq in _quantizers().items():
            for step in range(3):
                vq(data[step][rank])
            states[name] = {k: v.clone() for k, v in vq.state_dict().items()}
        torch.save(states, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_hold_the_same_codebook(tmp_path: Path) -> None:
    """Counts and sums are summed over ranks, k-means seeds and restarts come from rank 0: both ranks
    hold the same codebook, and the EMA codebook is the one a single process gets on both batches."""
    g = torch.Generator().manual_seed(1)
    data = [[torch.randn(1, 2, 3, 4, generator=g) * (r + 1) for r in range(2)] for _ in range(3)]
    torch.save(data, tmp_path / "data.pt")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_ddp_rank, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for name in ("ema", "draws"):
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            torch.testing.assert_close(a[name][k], b[name][k], rtol=0, atol=0, msg=f"{name}.{k}")
    assert int(a["draws"]["steps"]) == 3 and int(a["draws"]["initialized"]) == 1
    single = _quantizers()["ema"]
    for step in range(3):
        single(torch.cat(data[step]))
    for k, v in single.state_dict().items():
        torch.testing.assert_close(a["ema"][k], v, rtol=1e-6, atol=1e-6, msg=k)


# ------------------------------------------------------------------ device (TTA_TEST_ACCELERATOR=cpu runs it on CPU)

_ACCEL = os.environ.get("TTA_TEST_ACCELERATOR", "gpu")


@pytest.mark.cuda
@pytest.mark.skipif(_ACCEL == "gpu" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_accelerator_matches_cpu_with_every_option() -> None:
    device = "cuda" if _ACCEL == "gpu" else "cpu"
    torch.manual_seed(0)
    cpu = VectorQuantizer(num_codes=16, dim=4, ema_decay=0.9, kmeans_init=True, kmeans_iters=4, restart_after=1)
    acc = VectorQuantizer(num_codes=16, dim=4, ema_decay=0.9, kmeans_init=True, kmeans_iters=4, restart_after=1)
    acc.load_state_dict(cpu.state_dict())
    acc.to(device)
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        z = torch.randn(2, 4, 5, 6, generator=g) + step
        _, loss_c, info_c = cpu(z)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            z_q, loss_a, info_a = acc(z.to(device))
        assert z_q.device.type == torch.device(device).type and z_q.dtype == torch.float32
        assert torch.equal(info_a["indices"].cpu(), info_c["indices"])
        torch.testing.assert_close(loss_a.cpu(), loss_c, rtol=1e-5, atol=1e-6)
    for k, v in cpu.state_dict().items():
        torch.testing.assert_close(acc.state_dict()[k].cpu(), v, rtol=1e-5, atol=1e-5, msg=k)
