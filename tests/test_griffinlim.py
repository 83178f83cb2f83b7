"""Griffin-Lim baseline vocoder."""

from __future__ import annotations

import pytest
import torch

from tta.data.mel import MelConfig, MelFrontend
from tta.vocoders.base import Vocoder
from tta.vocoders.griffinlim import GriffinLimVocoder

SMALL = MelConfig(sample_rate=8000, n_fft=256, win_length=256, hop_length=64, n_mels=40, f_max=4000.0, name="small")


pytestmark = pytest.mark.usefixtures("single_thread")


def _chirp(num_samples: int, sample_rate: int) -> torch.Tensor:
    t = torch.arange(num_samples, dtype=torch.float64) / sample_rate
    phase = 2 * torch.pi * (200 * t + 800 * t**2)
    x = torch.sin(phase) + 0.5 * torch.sin(2 * phase) + 0.25 * torch.sin(3 * phase)
    noise = 1e-3 * torch.randn(num_samples, generator=torch.Generator().manual_seed(0))
    return (0.4 * x).float()[None] + noise  # faint noise keeps mel bins off the log floor


def test_registered_and_a_vocoder() -> None:
    assert GriffinLimVocoder.registry_name == "griffinlim"
    voc = GriffinLimVocoder("demo")
    assert isinstance(voc, Vocoder) and voc.hop_length == 256 and voc.mel_config == MelConfig.preset("demo")


def test_length_is_frames_times_hop_and_round_trip_is_close() -> None:
    fe = MelFrontend.from_config(SMALL)
    wav = _chirp(64 * 50, 8000)
    mel = fe(wav)
    assert mel.shape == (1, 40, 50)
    voc = GriffinLimVocoder(SMALL, n_iter=32)
    out = voc(mel.expand(2, -1, -1))
    assert out.shape == (2, 50 * 64)
    torch.testing.assert_close(out[0], out[1])  # batch items are independent and deterministic
    err = (fe(out) - mel).abs().mean().item()
    assert err < 0.35  # measured 0.27 (0.75 with n_iter=0)
    # more iterations give a more consistent spectrogram than none at all
    err0 = (fe(GriffinLimVocoder(SMALL, n_iter=0)(mel)) - mel).abs().mean().item()
    assert err < 0.8 * err0


def test_deterministic_given_seed() -> None:
    mel = MelFrontend.from_config(SMALL)(_chirp(64 * 20, 8000))
    a = GriffinLimVocoder(SMALL, n_iter=4, seed=3)(mel)
    b = GriffinLimVocoder(SMALL, n_iter=4, seed=3)(mel)
    c = GriffinLimVocoder(SMALL, n_iter=4, seed=4)(mel)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_perfect_phase_reconstructs_the_signal_exactly() -> None:
    """The inverse STFT inverts the front-end's reflect-padded STFT (all samples, edges included)."""
    voc = GriffinLimVocoder(SMALL)
    wav = _chirp(64 * 30, 8000).double().float()
    spec = voc._stft(wav)
    assert spec.shape[-1] == 30
    torch.testing.assert_close(voc._istft(spec, wav.shape[-1]), wav, atol=1e-5, rtol=0)


def test_magnitude_is_non_negative_and_nnls_fits_the_mel() -> None:
    fe = MelFrontend.from_config(SMALL)
    wav = _chirp(64 * 20, 8000)
    mel = fe(wav)
    true_mel = torch.exp(mel)
    pinv_only = GriffinLimVocoder(SMALL, nnls_iters=0).mel_to_magnitude(mel)
    refined = GriffinLimVocoder(SMALL, nnls_iters=20).mel_to_magnitude(mel)
    assert pinv_only.min() >= 0 and refined.min() >= 0 and refined.shape == (1, 129, 20)
    basis = fe.mel_basis
    residual = lambda mag: (basis @ mag - true_mel).norm().item()
    assert residual(refined) < 0.5 * residual(pinv_only)


def test_bad_inputs() -> None:
    voc = GriffinLimVocoder(SMALL)
    with pytest.raises(ValueError, match=r"\(B, 40, frames\)"):
        voc(torch.zeros(1, 80, 10))
    with pytest.raises(ValueError, match="STFT mel config"):
        GriffinLimVocoder("audiomae")
    with pytest.raises(ValueError, match="momentum"):
        GriffinLimVocoder(SMALL, momentum=1.0)
