"""Audio I/O: loading, mono mixdown, resampling, errors, pad/crop and 16-bit writing."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from tta.data.audio import (
    AudioLoadError,
    audio_info,
    load_audio,
    pad_or_crop,
    save_audio,
)


def _sine(sr: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return 0.5 * np.sin(2 * np.pi * freq * t)


def test_audio_info_reads_header(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, np.stack([_sine(8000, 0.5), _sine(8000, 0.5)], 1), 8000, subtype="PCM_16")
    info = audio_info(path)
    assert (info.sample_rate, info.frames, info.channels) == (8000, 4000, 2)
    assert info.duration == pytest.approx(0.5)


def test_load_mono_mixdown_and_dtype(tmp_path):
    path = tmp_path / "st.wav"
    left, right = _sine(16000, 0.25), np.zeros(4000)
    sf.write(path, np.stack([left, right], 1), 16000, subtype="FLOAT")
    wav, sr = load_audio(path)
    assert sr == 16000 and wav.dtype == torch.float32 and wav.shape == (4000,)
    np.testing.assert_allclose(wav.numpy(), left / 2, atol=1e-6)
    multi, _ = load_audio(path, mono=False)
    assert multi.shape == (2, 4000)
    np.testing.assert_allclose(multi[0].numpy(), left, atol=1e-6)


def test_load_resamples_and_keeps_frequency(tmp_path):
    path = tmp_path / "hi.flac"
    sf.write(path, _sine(44100, 1.0, 1000.0), 44100)
    wav, sr = load_audio(path, target_sr=16000)
    assert sr == 16000 and wav.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(wav.numpy()))
    assert np.argmax(spectrum) == 1000  # 1 Hz bins for a 1 s clip


def test_load_region(tmp_path):
    path = tmp_path / "ramp.wav"
    sf.write(path, np.linspace(-1, 1, 1000), 1000, subtype="FLOAT")
    wav, _ = load_audio(path, start=100, frames=50)
    np.testing.assert_allclose(wav.numpy(), np.linspace(-1, 1, 1000)[100:150], atol=1e-6)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(AudioLoadError, match="nope.wav.*no such file"):
        load_audio(tmp_path / "nope.wav")
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(AudioLoadError, match="corrupt.wav.*unreadable"):
        load_audio(bad)
    with pytest.raises(AudioLoadError, match="corrupt.wav"):
        audio_info(bad)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0), 16000)
    with pytest.raises(AudioLoadError, match="empty.wav.*zero-length"):
        load_audio(empty)
    nan = tmp_path / "nan.wav"
    data = _sine(1000, 0.1)
    data[5] = np.nan
    sf.write(nan, data, 1000, subtype="FLOAT")
    with pytest.raises(AudioLoadError, match="nan.wav.*1 non-finite"):
        load_audio(nan)


def test_pad_or_crop():
    wav = torch.arange(1, 11, dtype=torch.float32)
    assert pad_or_crop(wav, 4, offset=3).tolist() == [4, 5, 6, 7]
    assert pad_or_crop(wav, 13, offset=8).tolist() == [9, 10] + [0] * 11
    assert pad_or_crop(torch.ones(2, 3), 5).shape == (2, 5)
    with pytest.raises(ValueError, match="offset 10 is outside"):
        pad_or_crop(wav, 4, offset=10)
    with pytest.raises(ValueError, match="empty waveform"):
        pad_or_crop(torch.zeros(0), 4)


def test_save_audio_roundtrip_and_clipping(tmp_path):
    path = tmp_path / "sub" / "dir" / "out.wav"
    wav = torch.tensor([0.0, 0.5, -0.5, 1.5, -2.0])
    save_audio(path, wav, 8000)
    info = sf.info(path)
    assert info.subtype == "PCM_16" and info.samplerate == 8000
    data, _ = sf.read(path, dtype="int16")
    assert data.tolist() == [0, 16384, -16384, 32767, -32767]
    save_audio(tmp_path / "st.wav", np.zeros((2, 10)) + 0.1, 8000)
    assert sf.info(tmp_path / "st.wav").channels == 2
    with pytest.raises(ValueError, match="non-finite"):
        save_audio(tmp_path / "x.wav", np.array([np.inf]), 8000)
    assert not (tmp_path / "x.wav").exists()


def test_save_audio_is_deterministic(tmp_path):
    wav = np.random.default_rng(0).uniform(-1, 1, 1000)
    a, b = save_audio(tmp_path / "a.wav", wav, 16000), save_audio(tmp_path / "b.wav", wav, 16000)
    assert a.read_bytes() == b.read_bytes()


def test_resample_matches_torchaudio_functional():
    import torchaudio

    from tta.data.audio import resample

    x = torch.randn(2, 4410)
    np.testing.assert_allclose(
        resample(x, 44100, 16000).numpy(), torchaudio.functional.resample(x, 44100, 16000).numpy(), atol=1e-6
    )
    assert resample(x, 16000, 16000) is x
    assert resample(x.double(), 44100, 22050).dtype == torch.float64
    with pytest.raises(ValueError, match="positive"):
        resample(x, 0, 16000)
