"""Spectral distances used to evaluate vocoders."""

from __future__ import annotations

import math

import pytest
import torch

from tta.data.mel import MelFrontend
from tta.metrics.spectral import mel_l1, multi_resolution_stft_distance

SMALL_RES = ((128, 32, 128), (256, 64, 256))


def _noise(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def frontend() -> MelFrontend:
    return MelFrontend(None, sample_rate=8000, n_fft=256, win_length=256, hop_length=64, n_mels=20, f_max=4000.0)


def test_identical_inputs_are_zero(frontend: MelFrontend) -> None:
    wav = _noise(2, 2048)
    assert torch.equal(mel_l1(wav, wav, frontend), torch.zeros(2))
    assert torch.equal(multi_resolution_stft_distance(wav, wav, SMALL_RES), torch.zeros(2))


@pytest.mark.parametrize("scale", [0.5, 2.0, 3.0])
def test_scaled_input_gives_known_values(frontend: MelFrontend, scale: float) -> None:
    wav = _noise(2, 4096)
    assert mel_l1(wav, scale * wav, frontend) == pytest.approx([abs(math.log(scale))] * 2, abs=1e-4)
    expected = abs(1 - scale) + abs(math.log(scale))  # spectral convergence + log-magnitude L1
    assert multi_resolution_stft_distance(wav, scale * wav, SMALL_RES) == pytest.approx([expected] * 2, abs=1e-4)


def test_batch_items_are_independent_and_1d_gives_a_scalar(frontend: MelFrontend) -> None:
    a, b = _noise(2, 2048, seed=1), _noise(2, 2048, seed=2)
    both = mel_l1(a, b, frontend)
    assert both.shape == (2,)
    single = mel_l1(a[1], b[1], frontend)
    assert single.dim() == 0 and single.item() == pytest.approx(both[1].item(), rel=1e-6)
    mr = multi_resolution_stft_distance(a, b)
    assert mr.shape == (2,) and (mr > 1.0).all()  # independent noises are far apart


def test_lengths_are_trimmed_to_the_shorter(frontend: MelFrontend) -> None:
    wav = _noise(1, 2048)
    longer = torch.cat([wav, _noise(1, 512, seed=5)], dim=1)
    assert mel_l1(wav, longer, frontend).item() == 0.0
    assert multi_resolution_stft_distance(longer, wav, SMALL_RES).item() == 0.0


def test_half_precision_inputs_are_computed_in_float32(frontend: MelFrontend) -> None:
    wav = _noise(1, 2048)
    out = multi_resolution_stft_distance(wav.half(), wav.half() * 2, SMALL_RES)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(1 + math.log(2), abs=1e-3)


def test_mismatched_inputs_raise(frontend: MelFrontend) -> None:
    with pytest.raises(ValueError, match="batch sizes differ"):
        mel_l1(_noise(2, 1024), _noise(3, 1024), frontend)
    with pytest.raises(ValueError, match="same rank"):
        multi_resolution_stft_distance(_noise(1, 1024), _noise(1024))
