"""Audio encoders: HTSAT, CNN14 (PANNs) and the AudioMAE encoder, at tiny sizes on CPU."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tta.encoders.audiomae import AudioMAE
from tta.encoders.base import AudioEmbedding, AudioEncoder
from tta.encoders.cnn14 import CNN14
from tta.encoders.htsat import HTSAT, SwinBlock
from tta.utils.weights import atomic_save, load_checkpoint, load_state_dict_strict

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_htsat(**kw: object) -> HTSAT:
    """2 stages, width 16 -> 32, 64 mel frames per 0.5 s window at 44.1 kHz."""
    args: dict[str, object] = {
        "dim": 24,
        "embed_dim": 16,
        "depths": (1, 1),
        "num_heads": (1, 2),
        "window_size": 4,
        "spec_frames": 64,
        "window_seconds": 0.5,
        "mel": {"n_mels": 32},
        "drop_path": 0.0,
    }
    args.update(kw)
    return HTSAT(**args)  # type: ignore[arg-type]


def tiny_cnn14(**kw: object) -> CNN14:
    args: dict[str, object] = {"dim": 24, "channels": (4, 8, 8, 16, 16, 16), "num_classes": 5, "dropout": (0.0, 0.0)}
    args.update(kw)
    return CNN14(**args)  # type: ignore[arg-type]


def tiny_audiomae(**kw: object) -> AudioMAE:
    args: dict[str, object] = {
        "out_dim": 8,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "num_frames": 64,
        "clip_seconds": 0.64,
    }
    args.update(kw)
    return AudioMAE(**args)  # type: ignore[arg-type]


BUILDERS: dict[str, Callable[..., AudioEncoder]] = {"htsat": tiny_htsat, "cnn14": tiny_cnn14, "audiomae": tiny_audiomae}
# expected (dim, seq length, seq width) for a 0.5 s clip
SHAPES = {"htsat": (24, 8, 24), "cnn14": (24, 1, 16), "audiomae": (8, 32, 32)}
NAMES = list(BUILDERS)


def build(name: str, seed: int = 0, **kw: object) -> AudioEncoder:
    torch.manual_seed(seed)
    return BUILDERS[name](**kw)


def clips(enc: AudioEncoder, batch: int, seconds: float = 0.5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(batch, int(seconds * enc.sample_rate), generator=g)


@pytest.mark.parametrize("name", NAMES)
def test_output_shapes(name: str) -> None:
    enc = build(name).eval()
    out = enc(clips(enc, 3))
    dim, length, width = SHAPES[name]
    assert isinstance(out, AudioEmbedding)
    assert enc.dim == dim
    assert out.pooled.shape == (3, dim)
    assert out.seq is not None and out.seq.shape == (3, length, width)
    assert torch.isfinite(out.pooled).all() and torch.isfinite(out.seq).all()


@pytest.mark.parametrize("name", NAMES)
def test_alone_equals_batched_in_eval(name: str) -> None:
    enc = build(name).eval()
    wav = clips(enc, 4)
    with torch.no_grad():
        batched = enc(wav)
        for i in range(4):
            alone = enc(wav[i : i + 1])
            torch.testing.assert_close(alone.pooled[0], batched.pooled[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(alone.seq[0], batched.seq[i], atol=1e-5, rtol=0)
    # and the batch rows really differ (no collapse onto one embedding)
    assert (batched.pooled[0] - batched.pooled[1]).abs().max() > 1e-3 * batched.pooled.abs().max()


@pytest.mark.parametrize("name", NAMES)
def test_freeze_keeps_eval_and_blocks_gradients(name: str) -> None:
    enc = build(name)
    assert enc.training
    enc.freeze()
    enc.train()
    assert not enc.training and all(not m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    wav = clips(enc, 2)
    a, b = enc(wav), enc(wav)
    assert a.pooled.grad_fn is None
    torch.testing.assert_close(a.pooled, b.pooled, atol=0, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_used_parameter(name: str) -> None:
    enc = build(name).train()
    out = enc(clips(enc, 2))
    (out.pooled.pow(2).mean() + out.seq.pow(2).mean()).backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None and not n.startswith("fc_audioset")]
    assert missing == []
    nonzero = [n for n, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(nonzero) >= 0.9 * sum(1 for n, _ in enc.named_parameters() if not n.startswith("fc_audioset"))


def _tone_vs_noise(sample_rate: int, n: int, seconds: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` low sine tones (label 0) and ``n`` white noises (label 1) at random levels."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    freq = 150 + 150 * torch.rand(n, 1, generator=g)
    phase = 2 * math.pi * torch.rand(n, 1, generator=g)
    tones = (0.2 + 0.4 * torch.rand(n, 1, generator=g)) * torch.sin(2 * math.pi * freq * t + phase)
    noise = (0.05 + 0.2 * torch.rand(n, 1, generator=g)) * torch.randn(n, t.numel(), generator=g)
    return torch.cat([tones, noise]), torch.cat([torch.zeros(n), torch.ones(n)]).long()


@pytest.mark.parametrize("name", NAMES)
def test_linear_probe_learns_tone_vs_noise(name: str) -> None:
    enc = build(name).train()
    probe = torch.nn.Linear(enc.dim, 2)
    opt = torch.optim.Adam([*enc.parameters(), *probe.parameters()], lr=3e-3)
    wav, labels = _tone_vs_noise(enc.sample_rate, 4, 0.5, seed=2)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(probe(enc(wav).pooled), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    # held-out clips of the same two kinds, in eval mode
    enc.eval()
    test_wav, test_labels = _tone_vs_noise(enc.sample_rate, 4, 0.5, seed=3)
    with torch.no_grad():
        accuracy = (probe(enc(test_wav).pooled).argmax(-1) == test_labels).float().mean().item()
    assert accuracy >= 0.75


def test_paper_size_parameter_counts() -> None:
    with torch.device("meta"):
        htsat, cnn14, mae = HTSAT(), CNN14(), AudioMAE()

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    # HTS-AT reports 31 M, PANNs CNN14 80.8 M (with the 527-class head), ViT-B/16 ~86 M
    assert 28e6 <= count(htsat) <= 32e6
    assert 79e6 <= count(cnn14) <= 82e6
    assert 84e6 <= count(mae) <= 87e6
    assert htsat.sample_rate == 44100 and htsat.frontend.n_mels == 64 and htsat.frontend.hop_length == 320
    assert htsat.num_features == 768 and htsat.final_resolution == (8, 8) and htsat.frames_per_window == 32
    assert cnn14.sample_rate == 32000 and cnn14.frontend.config.f_max == 14000.0 and cnn14.dim == 2048
    assert mae.dim == 32 and mae.pos_embed.shape == (512, 768) and mae.frontend.n_mels == 128


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_shape_raises(name: str) -> None:
    enc = build(name).eval()
    wav = clips(enc, 2)
    with pytest.raises(ValueError, match=r"\(B, T\).*\(2, 1, "):
        enc(wav.unsqueeze(1))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        enc(wav[0])
    with pytest.raises(ValueError, match="floating-point"):
        enc((wav * 1000).long())


def test_too_short_clip_raises() -> None:
    enc = build("cnn14").eval()
    with pytest.raises(ValueError, match="too short"):
        enc(torch.zeros(1, 500))


def test_inconsistent_configs_raise() -> None:
    with pytest.raises(ValueError, match="spec_frames"):
        tiny_htsat(spec_frames=100)
    with pytest.raises(ValueError, match="depths"):
        tiny_htsat(depths=(1, 1), num_heads=(1,))
    with pytest.raises(ValueError, match="patch_size"):
        tiny_audiomae(num_frames=100)
    with pytest.raises(ValueError, match="pool_sizes"):
        tiny_cnn14(pool_sizes=((2, 2),))
    with pytest.raises(RuntimeError, match="num_classes=None"):
        tiny_cnn14(num_classes=None).classify(torch.zeros(1, 16000))


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_is_strict_and_exact(name: str, tmp_path: Path) -> None:
    enc = build(name, seed=0).train()
    enc(clips(enc, 2))  # move BatchNorm running statistics away from their init
    enc.eval()
    path = atomic_save(enc.state_dict(), tmp_path / f"{name}.pt")
    other = build(name, seed=123).eval()
    wav = clips(enc, 2, seed=7)
    with torch.no_grad():
        assert not torch.allclose(other(wav).pooled, enc(wav).pooled)
        load_state_dict_strict(other, load_checkpoint(path), source=str(path))
        torch.testing.assert_close(other(wav).pooled, enc(wav).pooled, atol=0, rtol=0)
    state = enc.state_dict()
    state.pop(next(iter(state)))
    with pytest.raises(RuntimeError, match="missing keys"):
        load_state_dict_strict(other, state)


def test_htsat_eval_averages_windows_and_train_crops_one() -> None:
    enc = build("htsat").eval()
    sr, size = enc.sample_rate, enc.window_samples
    wav = clips(enc, 2, seconds=1.25)  # 2.5 windows: [0, 1), [1, 2), last aligned to the end
    with torch.no_grad():
        out = enc(wav)
        parts = [enc(wav[:, s : s + size]) for s in (0, size, wav.shape[1] - size)]
    per_window = enc.frames_per_window
    assert out.seq.shape == (2, 3 * per_window, enc.dim)
    torch.testing.assert_close(out.pooled, torch.stack([p.pooled for p in parts]).mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.seq[:, -per_window:], parts[-1].seq, atol=1e-5, rtol=0)
    # a short clip is zero-padded to one window
    with torch.no_grad():
        short = wav[:, : int(0.3 * sr)]
        torch.testing.assert_close(enc(short).pooled, enc(F.pad(short, (0, size - short.shape[1]))).pooled)
    enc.train()
    assert enc(wav).seq.shape == (2, per_window, enc.dim)


def test_clip_seconds_pads_and_crops() -> None:
    enc = build("cnn14", clip_seconds=0.5).eval()
    wav = clips(enc, 2, seconds=0.8)
    cut = wav[:, : enc.clip_samples]
    with torch.no_grad():
        torch.testing.assert_close(enc(wav).pooled, enc(cut).pooled, atol=0, rtol=0)
        short = cut[:, :5000]
        torch.testing.assert_close(enc(short).pooled, enc(F.pad(short, (0, cut.shape[1] - 5000))).pooled)
    mae = build("audiomae").eval()
    wav = clips(mae, 1, seconds=1.0)
    with torch.no_grad():
        torch.testing.assert_close(mae(wav).pooled, mae(wav[:, : mae.clip_samples]).pooled, atol=0, rtol=0)


def test_cnn14_classify_logits() -> None:
    enc = build("cnn14").train()
    logits = enc.classify(clips(enc, 3))
    assert logits.shape == (3, 5)
    logits.sum().backward()
    assert enc.fc_audioset.weight.grad is not None and enc.conv_block1.conv1.weight.grad is not None


def test_swin_windows_are_local_and_shift_mask_separates_regions() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 8, 8, 16)
    plain = SwinBlock(16, 2, (8, 8), window_size=4, shift=False).eval()
    shifted = SwinBlock(16, 2, (8, 8), window_size=4, shift=True).eval()
    assert shifted.shift == (2, 2) and shifted.attn_mask.shape == (4, 16, 16)
    x2 = x.clone()
    x2[0, 0, 0] += torch.randn(16)  # token (row 0, column 0); not a constant, which LayerNorm removes
    with torch.no_grad():
        d_plain = (plain(x2) - plain(x)).abs().sum(-1)[0]
        d_shift = (shifted(x2) - shifted(x)).abs().sum(-1)[0]
    # unshifted: only the top-left 4x4 window sees the change
    assert d_plain[:4, :4].min() > 0 and (d_plain > 0).sum() == 16
    # shifted: token (0, 0) is rolled into the window holding the bottom-right corner, but the
    # mask keeps the wrapped-around regions apart: only the 2x2 corner around (0, 0) sees it
    assert d_shift[:2, :2].min() > 0 and (d_shift > 0).sum() == 4


def test_registered_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from tta import registry

    # importing this module registered the encoders; skip importing every other builtin module
    monkeypatch.setitem(registry._loaded, "builtin", True)
    monkeypatch.setitem(registry._loaded, "plugins", True)
    get = registry.get
    assert get("htsat", "encoder") is HTSAT
    assert get("cnn14", "encoder") is CNN14
    assert get("audiomae", "encoder") is AudioMAE


@pytest.mark.parametrize("preset", ["panns", "panns16k"])
def test_cnn14_front_end_is_panns_log_mel(preset: str) -> None:
    """PANNs' features (torchlibrosa = librosa): centred reflect-padded Hann STFT, power, Slaney mel,
    ``power_to_db(ref=1, amin=1e-10, top_db=None)``, so real PANNs weights see what they were trained on."""
    import librosa
    import numpy as np

    from tta.encoders.cnn14 import PANNS_PRESETS

    cfg = PANNS_PRESETS[preset]
    model = tiny_cnn14(mel=preset)
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(cfg["sample_rate"] // 2)).astype(np.float32)
    wav[1000:3000] = 0.0  # digital silence reaches the 1e-10 floor
    mel = librosa.feature.melspectrogram(
        y=wav.astype(np.float64), sr=cfg["sample_rate"], n_fft=cfg["n_fft"], hop_length=cfg["hop_length"],
        win_length=cfg["win_length"], window="hann", center=True, pad_mode="reflect", power=2.0,
        n_mels=cfg["n_mels"], fmin=cfg["f_min"], fmax=cfg["f_max"], htk=False, norm="slaney",
    )  # fmt: skip
    ref = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)
    ours = model.frontend(torch.from_numpy(wav)[None]).numpy()[0]
    assert model.sample_rate == cfg["sample_rate"] and ours.shape == ref.shape == (64, len(wav) // cfg["hop_length"] + 1)
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="CNN14.mel must be one of panns, panns16k"):
        tiny_cnn14(mel="panns48k")


def test_cnn14_16k_embedder_spec_loads_panns_layout(tmp_path: Path) -> None:
    from tta.metrics.embedders import build_embedder

    model = CNN14(mel="panns16k")
    torch.save({"model": model.state_dict()}, tmp_path / "Cnn14_16k.pth")  # the PANNs file layout
    emb = build_embedder(f"cnn14_16k:{tmp_path / 'Cnn14_16k.pth'}")
    assert emb.sample_rate == 16000 and emb.dim == 2048 and emb.num_classes == 527
    with pytest.raises(ValueError, match="cnn14_16k:PATH"):
        build_embedder("cnn14_16k")
