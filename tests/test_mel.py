"""`MelFrontend` against an independent librosa/numpy reference, presets, errors, compatibility."""

from __future__ import annotations

import dataclasses

import librosa
import numpy as np
import pytest
import torch

from tta.data.mel import PRESETS, MelConfig, MelFrontend, MelMismatchError


def _reference_logmel(wav: np.ndarray, cfg: MelConfig) -> np.ndarray:
    """HiFi-GAN/AudioLDM log-mel in float64 numpy: reflect pad, no centring, slaney mel bank."""
    pad = (cfg.n_fft - cfg.hop_length) // 2
    x = np.pad(wav.astype(np.float64), (pad, pad), mode="reflect")
    n_frames = 1 + (len(x) - cfg.n_fft) // cfg.hop_length
    idx = np.arange(cfg.n_fft)[None, :] + cfg.hop_length * np.arange(n_frames)[:, None]
    window = np.zeros(cfg.n_fft)
    left = (cfg.n_fft - cfg.win_length) // 2
    window[left : left + cfg.win_length] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(cfg.win_length) / cfg.win_length)
    spec = np.fft.rfft(x[idx] * window, axis=1).T  # (freqs, frames)
    mag = np.sqrt(spec.real**2 + spec.imag**2 + 1e-9)
    basis = librosa.filters.mel(
        sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.f_min, fmax=cfg.f_max,
        htk=False, norm="slaney", dtype=np.float64,
    )  # fmt: skip
    return np.log(np.maximum(basis @ mag, cfg.log_floor))


def _signal(sr: int, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * (200 + 1500 * t) * t)
    x += 0.05 * rng.standard_normal(len(t))
    x[: len(t) // 4] *= 0.01  # a quiet stretch
    x[len(t) // 2 : len(t) // 2 + len(t) // 8] = 0.0  # digital silence: the log floor clamps
    return x.astype(np.float32)


@pytest.mark.parametrize("preset", ["audioldm", "demo"])
def test_matches_librosa_reference(preset):
    fe = MelFrontend(preset)
    cfg = fe.config
    wav = _signal(cfg.sample_rate, 1.0)
    wav = wav[: len(wav) // cfg.hop_length * cfg.hop_length]
    ours = fe(torch.from_numpy(wav)).numpy()
    ref = _reference_logmel(wav, cfg)
    assert ours.shape == (1, cfg.n_mels, len(wav) // cfg.hop_length) == (1,) + ref.shape
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours[0], ref, atol=2e-4, rtol=0)
    assert np.isclose(ref.min(), np.log(cfg.log_floor)) and np.isclose(ours.min(), np.log(cfg.log_floor))


def test_mel_bank_matches_librosa():
    fe = MelFrontend("demo")
    ref = librosa.filters.mel(sr=22050, n_fft=1024, n_mels=80, fmin=0.0, fmax=8000.0, norm="slaney")
    np.testing.assert_allclose(fe.mel_basis.numpy(), ref, atol=1e-6)


def test_batch_and_frame_count():
    fe = MelFrontend("audioldm")
    wav = torch.from_numpy(_signal(16000, 10.24))
    assert wav.shape == (163840,)
    mel = fe(torch.stack([wav, 0.5 * wav]))
    assert mel.shape == (2, 64, 1024) and fe.config.num_frames(163840) == 1024
    np.testing.assert_allclose(mel[0].numpy(), fe(wav)[0].numpy(), atol=1e-5)
    assert not torch.allclose(mel[0], mel[1])


def test_half_input_computes_in_float32():
    fe = MelFrontend("audioldm")
    wav = torch.from_numpy(_signal(16000, 0.5))
    out = fe(wav.half())
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), fe(wav.half().float()).numpy(), atol=1e-6)


def test_kaldi_fbank_preset():
    fe = MelFrontend("audiomae")
    mel = fe(torch.from_numpy(_signal(16000, 1.0)).repeat(2, 1))
    assert fe.config.kind == "kaldi_fbank"
    assert mel.shape == (2, 128, 98)  # 1 + (16000 - 400) // 160 frames (snip_edges)
    assert torch.isfinite(mel).all()


def test_bad_input_shape():
    fe = MelFrontend("audioldm")
    with pytest.raises(ValueError, match=r"expects a waveform \(B, T\) or \(T,\), got shape \(1, 1, 16000\)"):
        fe(torch.zeros(1, 1, 16000))


def test_config_roundtrip_and_presets():
    cfg = MelConfig.preset("msclap")
    assert MelConfig.from_dict(cfg.to_dict()) == cfg
    assert MelFrontend.from_config(cfg.to_dict()).config == cfg
    assert PRESETS["demo"] == PRESETS["hifigan_universal"]  # name does not take part in comparisons
    with pytest.raises(KeyError, match="unknown mel preset 'nope'"):
        MelConfig.preset("nope")
    with pytest.raises(ValueError, match="unknown MelConfig fields"):
        MelConfig.from_dict({"n_fft": 512, "bogus": 1})
    with pytest.raises(ValueError, match="above Nyquist"):
        MelConfig(sample_rate=8000, f_max=8000.0)


def test_check_compatible_names_the_field():
    a = MelConfig.preset("audioldm")
    a.check_compatible(dataclasses.replace(a, name="other"))  # the name alone does not matter
    b = MelConfig.preset("audioldm", hop_length=256)
    with pytest.raises(MelMismatchError, match=r"hop_length: 160 != 256") as info:
        a.check_compatible(b, what="the VAE and the vocoder")
    assert "the VAE and the vocoder" in str(info.value) and "n_mels" not in str(info.value)
    with pytest.raises(MelMismatchError, match=r"sample_rate: 16000 != 22050.*n_mels: 64 != 80"):
        a.check_compatible(MelConfig.preset("demo"))
