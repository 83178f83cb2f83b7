"""VGGish: architecture and shapes, strict loading of the torchvggish key layout against an
independent functional forward, PCA postprocessing, the shared AudioSet front end (against YAMNet's
and a numpy rendering of VGGish's ``mel_features``), and FAD through `evaluate` / ``tta eval``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tta.metrics.vggish import (
    VGGish,
    VGGishFrontend,
    load_pca,
    load_vggish,
    state_dict_keys,
)
from tta.metrics.yamnet import AudioSetFrontend, YAMNetFrontend, file_sha256
from tta.utils.weights import WeightMismatchError

pytestmark = pytest.mark.usefixtures("single_thread")
SR = 16000
TINY = {"channels": (4, 8, 8, 16), "hidden": 32}

# The torchvggish state dict (harritaylor/torchvggish, torchvggish/vggish.py: make_layers() with
# [64, "M", 128, "M", 256, 256, "M", 512, 512, "M"] as Conv2d(3, padding=1) + ReLU / MaxPool2d(2);
# embeddings = Linear(512*4*6, 4096), ReLU, Linear(4096, 4096), ReLU, Linear(4096, 128), ReLU;
# Postprocessor pca_eigen_vectors (128, 128), pca_means (128, 1)), written out by hand.
TORCHVGGISH = [
    ("features.0.weight", (64, 1, 3, 3)), ("features.0.bias", (64,)),
    ("features.3.weight", (128, 64, 3, 3)), ("features.3.bias", (128,)),
    ("features.6.weight", (256, 128, 3, 3)), ("features.6.bias", (256,)),
    ("features.8.weight", (256, 256, 3, 3)), ("features.8.bias", (256,)),
    ("features.11.weight", (512, 256, 3, 3)), ("features.11.bias", (512,)),
    ("features.13.weight", (512, 512, 3, 3)), ("features.13.bias", (512,)),
    ("embeddings.0.weight", (4096, 12288)), ("embeddings.0.bias", (4096,)),
    ("embeddings.2.weight", (4096, 4096)), ("embeddings.2.bias", (4096,)),
    ("embeddings.4.weight", (128, 4096)), ("embeddings.4.bias", (128,)),
]  # fmt: skip
PPROC = [("pproc.pca_eigen_vectors", (128, 128)), ("pproc.pca_means", (128, 1))]


def tiny_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The same layout at TINY widths (64->4, 128->8, 256->8, 512->16, 4096->32)."""
    width = {1: 1, 64: 4, 128: 8, 256: 8, 512: 16, 4096: 32, 12288: 16 * 24, 3: 3}
    return tuple(width[s] for s in shape)


def torchvggish_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in the torchvggish layout at TINY widths (embedding still 128-d)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in TORCHVGGISH:
        shape = (
            tiny_shape(shape)
            if not key.startswith("embeddings.4")
            else (128, 32)[: len(shape)]
        )
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 8
        state[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return state


def reference_forward(
    state: dict[str, torch.Tensor], patches: torch.Tensor, relu: bool
) -> torch.Tensor:
    """torchvggish's VGG.forward written with functional ops: NCHW convs, then transpose(1, 3),
    transpose(1, 2), view(N, -1) (TF's channels-last flatten), then the fc stack."""
    x = patches
    for i, pool in (
        (0, True),
        (3, True),
        (6, False),
        (8, True),
        (11, False),
        (13, True),
    ):
        x = F.relu(
            F.conv2d(
                x, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1
            )
        )
        x = F.max_pool2d(x, 2, 2) if pool else x
    x = torch.transpose(torch.transpose(x, 1, 3), 1, 2).contiguous().view(x.size(0), -1)
    x = F.relu(F.linear(x, state["embeddings.0.weight"], state["embeddings.0.bias"]))
    x = F.relu(F.linear(x, state["embeddings.2.weight"], state["embeddings.2.bias"]))
    x = F.linear(x, state["embeddings.4.weight"], state["embeddings.4.bias"])
    return F.relu(x) if relu else x


def clips(n: int, seconds: float, seed: int = 0) -> torch.Tensor:
    t = torch.arange(int(seconds * SR)) / SR
    g = torch.Generator().manual_seed(seed)
    return torch.stack([0.3 * torch.sin(2 * math.pi * (150 + 170 * i) * t) + 0.05 * torch.randn(t.shape, generator=g)
                        for i in range(n)])  # fmt: skip


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "vggish-tiny.pth"
    torch.save(torchvggish_state(), path)
    return path


# ------------------------------------------------------------------------------ architecture
def test_full_size_layout_matches_torchvggish() -> None:
    with torch.device("meta"):
        model = VGGish(postprocess=True)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(own.items()) == TORCHVGGISH + PPROC
    assert state_dict_keys(True) == [k for k, _ in TORCHVGGISH + PPROC]
    assert sum(p.numel() for p in model.parameters()) == 72_141_184


def test_clip_embeddings_are_128d_means_over_patches() -> None:
    torch.manual_seed(0)
    model = VGGish(**TINY).eval()
    for seconds, patches in (
        (1.0, 1),
        (3.0, 3),
        (2.0, 2),
    ):  # 2 s: 198 frames -> 2 whole patches
        wav = clips(2, seconds)
        with torch.no_grad():
            per_patch = model.patch_embeddings(wav)
            emb = model.embed(wav)
        assert per_patch.shape == (2, patches, 128) and emb.shape == (2, 128)
        torch.testing.assert_close(emb, per_patch.mean(dim=1))
        with torch.no_grad():
            alone = model.embed(wav[1:])
        torch.testing.assert_close(alone, emb[1:], atol=1e-5, rtol=1e-5)
    # a different clip gives a different embedding; too short a clip is an error, not padded
    assert not torch.allclose(emb[0], emb[1])
    with pytest.raises(
        ValueError, match=r"15000 samples are shorter than one patch \(15600 samples"
    ):
        model.embed(torch.zeros(1, 15000))
    with pytest.raises(ValueError, match="patches"):
        model(torch.zeros(2, 1, 95, 64))


# ------------------------------------------------------------------------------ loading
def test_torchvggish_state_dict_loads_strictly_and_matches_its_forward(
    weights: Path,
) -> None:
    state = torchvggish_state()
    patches = torch.randn(3, 1, 96, 64, generator=torch.Generator().manual_seed(1))
    model = load_vggish(weights)
    assert model.pproc is None and model.channels == TINY["channels"]
    with torch.no_grad():
        torch.testing.assert_close(
            model(patches), reference_forward(state, patches, relu=False)
        )
        relu_model = load_vggish(weights, final_relu=True)
        torch.testing.assert_close(
            relu_model(patches), reference_forward(state, patches, relu=True)
        )
    # ... and on waveforms: the front end's patches through the same reference
    wav = clips(1, 2.0)
    with torch.no_grad():
        expected = reference_forward(
            state, VGGishFrontend()(wav)[0].unsqueeze(1), relu=False
        ).mean(0)
        torch.testing.assert_close(model.embed(wav)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_key_mismatches_are_named(weights: Path, tmp_path: Path, change: str) -> None:
    state = torchvggish_state()
    if change == "missing":
        del state["embeddings.4.bias"]
        match = r"missing keys \(1\): embeddings\.4\.bias"
    elif change == "extra":
        state["embeddings.6.weight"] = torch.zeros(3, 3)
        match = r"unexpected keys \(1\): embeddings\.6\.weight"
    else:
        state["features.8.weight"] = torch.zeros(8, 4, 3, 3)
        match = r"features\.8\.weight: \(8, 4, 3, 3\) vs expected \(8, 8, 3, 3\)"
    bad = tmp_path / f"{change}.pth"
    torch.save(state, bad)
    with pytest.raises(WeightMismatchError, match=match) as info:
        load_vggish(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_vggish(tmp_path / "nope.pth")


def test_pca_postprocessing(weights: Path, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    vectors = (
        torch.linalg.qr(torch.randn(128, 128, generator=g, dtype=torch.float64))[0]
        * 3.0
    )
    means = torch.randn(128, generator=g, dtype=torch.float64)
    npz = tmp_path / "vggish_pca_params.npz"  # Google's release: means (128,), float64
    np.savez(npz, pca_eigen_vectors=vectors.numpy(), pca_means=means.numpy())
    pca = load_pca(npz)
    assert (
        pca["pca_means"].shape == (128, 1)
        and pca["pca_eigen_vectors"].dtype == torch.float32
    )
    model = load_vggish(weights, pca=npz)
    assert [k for k in model.state_dict()] == state_dict_keys(postprocess=True)
    patches = torch.randn(4, 96, 64, generator=g)
    with torch.no_grad():
        raw = model(patches)
        pcad = model(patches, output="pca")
        quant = model(patches, output="quantized")
    # torchvggish's Postprocessor: mm(E, x^T - mu)^T, clamp to [-2, 2], round((x + 2) * 255 / 4)
    expected = torch.mm(vectors.float(), raw.T - means.float()[:, None]).T
    torch.testing.assert_close(pcad, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(quant, torch.round((expected.clamp(-2, 2) + 2) * 63.75))
    assert quant.min() == 0 and quant.max() == 255 and torch.equal(quant, quant.round())
    # the combined layout (pproc.* in the weights file) loads too, and not twice
    combined = tmp_path / "combined.pth"
    torch.save(
        {**torchvggish_state(), **{f"pproc.{k}": v for k, v in pca.items()}}, combined
    )
    with torch.no_grad():
        torch.testing.assert_close(
            load_vggish(combined)(patches, output="quantized"), quant
        )
    with pytest.raises(ValueError, match="already holds pproc"):
        load_vggish(combined, pca=npz)
    with pytest.raises(ValueError, match="needs the PCA parameters"):
        load_vggish(weights)(patches, output="pca")
    wrong = tmp_path / "wrong.pt"
    torch.save({"pca_eigen_vectors": vectors}, wrong)
    with pytest.raises(KeyError, match="wrong.pt: expected exactly the keys"):
        load_pca(wrong)


# ------------------------------------------------------------------------------ front end
def numpy_vggish_examples(wav: np.ndarray) -> np.ndarray:
    """VGGish's ``mel_features`` algorithm in float64 numpy: frames without padding, periodic Hann,
    |rfft| 512, HTK mel matrix over linspace(0, nyquist, 257) with the DC row zeroed,
    log(mel + 0.01), examples of 96 frames every 96."""

    def mel(f: np.ndarray | float) -> np.ndarray:
        return 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)

    def frame(x: np.ndarray, size: int, hop: int) -> np.ndarray:
        n = 1 + (x.shape[0] - size) // hop
        return np.stack([x[i * hop : i * hop + size] for i in range(n)])

    window = 0.5 - 0.5 * np.cos(2 * np.pi / 400 * np.arange(400))
    spec = np.abs(np.fft.rfft(frame(wav, 400, 160) * window, 512))
    bins = mel(np.linspace(0.0, 8000.0, 257))
    edges = np.linspace(mel(125.0), mel(7500.0), 66)
    weights = np.stack([np.maximum(0.0, np.minimum((bins - edges[i]) / (edges[i + 1] - edges[i]),
                                                   (edges[i + 2] - bins) / (edges[i + 2] - edges[i + 1])))
                        for i in range(64)], axis=1)  # fmt: skip
    weights[0, :] = 0.0
    return frame(np.log(spec @ weights + 0.01), 96, 96)


def test_front_end_matches_vggish_mel_features_and_yamnet() -> None:
    wav = clips(2, 3.0, seed=3)
    vgg = VGGishFrontend()
    patches = vgg(wav)
    assert patches.shape == (
        2,
        3,
        96,
        64,
    )  # 298 frames -> 3 whole patches, the rest dropped
    for b in range(2):
        expected = numpy_vggish_examples(wav[b].double().numpy())
        np.testing.assert_allclose(patches[b].numpy(), expected, atol=2e-4, rtol=0)
    # YAMNet's front end with the same log offset: VGGish's patches are YAMNet's even patches
    # (hop 96 vs 48 frames; none of these reaches YAMNet's end padding)
    yam = YAMNetFrontend()(wav)
    same_offset = AudioSetFrontend(log_offset=1e-3, patch_hop_frames=96, pad=False)(wav)
    assert yam.shape == (2, 6, 96, 64)
    torch.testing.assert_close(same_offset, yam[:, 0:6:2], atol=0, rtol=0)
    torch.testing.assert_close(
        torch.exp(patches) - 0.01,
        torch.exp(yam[:, 0:6:2]) - 0.001,
        atol=2e-5,
        rtol=1e-4,
    )
    # with all parameters equal the shared front end is YAMNet's
    torch.testing.assert_close(AudioSetFrontend(1e-3, 48, pad=True)(wav[:, :20000]), YAMNetFrontend()(wav[:, :20000]),
                               atol=0, rtol=0)  # fmt: skip
    assert vgg.config()["log_offset"] == 0.01 and vgg.config()["patch_hop_frames"] == 96


# ------------------------------------------------------------------------------ FAD
def test_fad_with_vggish_embedder(weights: Path, tmp_path: Path) -> None:
    from tta.evaluation.clips import Clip
    from tta.evaluation.core import evaluate
    from tta.metrics.embedders import VGGishEmbedder, build_embedder
    from tta.metrics.fad import FrechetAudioDistance

    emb = VGGishEmbedder(weights)
    d = emb.describe()
    assert (d["name"], d["dim"], d["num_classes"], d["weight_sha256"]) == (
        "vggish",
        128,
        0,
        file_sha256(weights),
    )
    assert (
        d["output"] == "embedding"
        and d["final_relu"] is False
        and d["front_end"]["log_offset"] == 0.01
    )
    ref_wav, noisy = (
        clips(8, 1.0),
        clips(8, 1.0)
        + 0.3 * torch.randn(8, SR, generator=torch.Generator().manual_seed(5)),
    )
    ref = [Clip(f"c{i}", wav=w, sample_rate=SR) for i, w in enumerate(ref_wav)]
    gen = [Clip(f"c{i}", wav=w, sample_rate=SR) for i, w in enumerate(noisy)]
    same = evaluate(
        ref, ref, ["fad"], embedder=emb, cache_reference=False, n_examples=0
    )["metrics"]["fad"]
    other = evaluate(
        gen, ref, ["fad"], embedder=emb, cache_reference=False, n_examples=0
    )["metrics"]["fad"]
    assert math.isfinite(same) and abs(same) < 1e-6 and other > 1e-3, (same, other)
    with pytest.raises(ValueError, match="KL and IS need a classifier"):
        evaluate(gen, ref, ["kl"], embedder=emb)
    # google-research's protocol: every 0.96 s patch is a sample (2 s clips -> 2 patches each)
    long_ref, long_gen = ([Clip(f"c{i}", wav=torch.cat([c.wav, c.wav.flip(-1)]), sample_rate=SR) for i, c in enumerate(x)]
                          for x in (ref, gen))  # fmt: skip
    frames = build_embedder(f"vggish:{weights},frames")
    assert frames.fad_frames and frames.describe()["fad_samples"].startswith("0.96 s patches")
    per_patch = evaluate(long_gen, long_ref, ["fad"], embedder=frames, cache_reference=False, n_examples=0)
    expected = FrechetAudioDistance()
    for clipset, real in ((long_gen, False), (long_ref, True)):
        wav = torch.stack([c.wav for c in clipset])
        expected.update(emb.model.patch_embeddings(wav), [c.id for c in clipset], real=real)
    assert per_patch["metrics"]["fad"] == pytest.approx(float(expected.compute()), rel=1e-6)
    pooled = evaluate(long_gen, long_ref, ["fad"], embedder=emb, cache_reference=False, n_examples=0)
    assert pooled["metrics"]["fad"] != pytest.approx(per_patch["metrics"]["fad"], rel=1e-3)
    # specs: options, and clear errors
    spec = build_embedder(f"vggish:{weights},relu")
    assert spec.model.final_relu and spec.weight_hash == emb.weight_hash
    with pytest.raises(ValueError, match="needs local weights"):
        build_embedder("vggish")
    with pytest.raises(ValueError, match="unknown option 'bogus'"):
        build_embedder(f"vggish:{weights},bogus")
    with pytest.raises(ValueError, match="needs PCA parameters"):
        build_embedder(f"vggish:{weights},output=quantized")


def test_tta_eval_cli_with_vggish(weights: Path, tmp_path: Path) -> None:
    from tta.cli import main
    from tta.data.audio import save_audio

    wav = clips(4, 1.0, seed=7)
    for name, data in (("gen", wav + 0.1 * torch.randn(wav.shape, generator=torch.Generator().manual_seed(8))),
                       ("ref", wav)):  # fmt: skip
        for i, w in enumerate(data):
            save_audio(tmp_path / name / f"clip{i}.wav", w, SR)
    out = tmp_path / "out"
    argv = ["eval", "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref"), "--out", str(out),
            "--metrics", "fad", "--embedder", f"vggish:{weights}", "--no-cache"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["protocol"]["embedder"]["name"] == "vggish"
    assert report["protocol"]["embedder"]["weight_sha256"] == file_sha256(weights)
    assert math.isfinite(report["metrics"]["fad"]) and report["metrics"]["fad"] > 0
