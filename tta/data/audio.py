"""Audio I/O: reading (soundfile), resampling (torchaudio), pad/crop and 16-bit WAV writing.

Every failure to read a clip raises `AudioLoadError` naming the file and the reason; nothing is
silently replaced by zeros. Padding only ever extends a *valid*, non-empty clip to a requested
length.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from tta.utils.files import atomic_path

PathLike = str | os.PathLike

__all__ = ["AudioInfo", "AudioLoadError", "audio_info", "load_audio", "pad_or_crop", "resample", "save_audio",
           "truncation"]


class AudioLoadError(RuntimeError):
    """An audio file could not be used; the message names the path and the reason."""

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot load audio {self.path}: {reason}")


@dataclass(frozen=True)
class AudioInfo:
    """Header information of an audio file."""

    sample_rate: int
    frames: int
    channels: int
    duration: float


def _soundfile_reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def audio_info(path: PathLike) -> AudioInfo:
    """Read the header of ``path`` (no samples) with ``soundfile.info``.

    Raises `AudioLoadError` if the file does not exist or its header cannot be parsed.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioLoadError(path, "no such file")
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError, OSError) as exc:
        raise AudioLoadError(path, f"unreadable ({_soundfile_reason(exc)})") from exc
    frames = int(info.frames)
    sr = int(info.samplerate)
    return AudioInfo(sample_rate=sr, frames=frames, channels=int(info.channels), duration=frames / sr if sr else 0.0)


def truncation(path: PathLike) -> str | None:
    """Why a RIFF/WAVE file is truncated (its ``data`` chunk declares more bytes than the file
    holds: libsndfile would silently read the shorter rest), or None (complete, or not a WAV)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        offset = 12
        while offset + 8 <= size:
            fh.seek(offset)
            chunk = fh.read(8)
            name, length = chunk[:4], int.from_bytes(chunk[4:8], "little")
            if name == b"data":
                held = size - offset - 8
                if length in (0, 0xFFFF_FFFF) or length <= held:  # 0 / -1: a streamed header, length unknown
                    return None
                return f"truncated: the header declares {length} bytes of audio data, the file holds {held}"
            offset += 8 + length + (length & 1)
    return None


@functools.lru_cache(maxsize=16)
def _resampler(orig_sr: int, target_sr: int) -> torchaudio.transforms.Resample:
    # The sinc kernel costs more to build than to apply; keep a few per process. Each DataLoader
    # worker builds its own (CPU tensors, never mutated after construction).
    return torchaudio.transforms.Resample(orig_sr, target_sr, dtype=torch.float32)


def resample(wav: torch.Tensor, orig_sr: int, target_sr: int) -> torch.Tensor:
    """Resample ``wav`` (..., T) from ``orig_sr`` to ``target_sr`` (no-op when equal).

    Same result as ``torchaudio.functional.resample`` (windowed sinc, default parameters).
    """
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    if orig_sr == target_sr:
        return wav
    if wav.dtype == torch.float32 and wav.device.type == "cpu":
        return _resampler(int(orig_sr), int(target_sr))(wav)
    return torchaudio.functional.resample(wav, int(orig_sr), int(target_sr))


def load_audio(
    path: PathLike,
    target_sr: int | None = None,
    mono: bool = True,
    *,
    start: int = 0,
    frames: int = -1,
) -> tuple[torch.Tensor, int]:
    """Load ``path`` as float32: ``(T,)`` when ``mono`` (mean of channels), else ``(C, T)``.

    ``start``/``frames`` select a region in *source* samples before resampling (``frames=-1``
    reads to the end). The audio is resampled to ``target_sr`` when given. Returns
    ``(wav, sample_rate)``.

    Raises `AudioLoadError` for a missing, unreadable or truncated (`truncation`) file, a
    zero-length selection and non-finite samples.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioLoadError(path, "no such file")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    cut = truncation(path)
    if cut is not None:
        raise AudioLoadError(path, cut)
    try:
        data, sr = sf.read(str(path), start=start, frames=frames, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise AudioLoadError(path, f"unreadable ({_soundfile_reason(exc)})") from exc
    if data.shape[0] == 0:
        what = "zero-length audio" if start == 0 else f"no samples from frame {start}"
        raise AudioLoadError(path, what)
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioLoadError(path, f"{bad} non-finite (NaN/inf) samples")
    if mono:
        # mean of the channels as a mat-vec product (numpy's mean(axis=1) is ~20x slower)
        weights = np.full(data.shape[1], 1.0 / data.shape[1], dtype=np.float32)
        wav = torch.from_numpy(data[:, 0].copy() if data.shape[1] == 1 else data @ weights)
    else:
        wav = torch.from_numpy(np.ascontiguousarray(data.T))  # (C, T)
    if target_sr is not None:
        wav = resample(wav, int(sr), int(target_sr))
        sr = int(target_sr)
    return wav.contiguous(), int(sr)


def pad_or_crop(wav: torch.Tensor, num_samples: int, offset: int = 0) -> torch.Tensor:
    """Take ``num_samples`` samples of ``wav`` (..., T) starting at ``offset``.

    A clip shorter than the request is right-padded with zeros. ``offset`` must point inside the
    clip and the clip must not be empty, so the result always holds real audio.
    """
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    length = wav.shape[-1]
    if length == 0:
        raise ValueError("pad_or_crop got an empty waveform; refusing to return pure padding")
    if not 0 <= offset < length:
        raise ValueError(f"offset {offset} is outside the waveform of {length} samples")
    out = wav[..., offset : offset + num_samples]
    missing = num_samples - out.shape[-1]
    if missing > 0:
        out = torch.nn.functional.pad(out, (0, missing))
    return out


def _to_numpy(wav: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().to("cpu", torch.float64).numpy()
    return np.asarray(wav, dtype=np.float64)


def save_audio(path: PathLike, wav: torch.Tensor | np.ndarray, sample_rate: int) -> Path:
    """Write ``wav`` ((T,) or (C, T), floats in [-1, 1]) as a 16-bit PCM WAV.

    Samples are clipped to [-1, 1] and scaled by 32767 with rounding, so the bytes are a pure
    function of the input. Parent directories are created; the file is written to a temporary
    name and renamed into place. Raises ValueError for non-finite samples or a bad shape.
    """
    path = Path(path)
    data = _to_numpy(wav)
    if data.ndim == 1:
        data = data[:, None]
    elif data.ndim == 2:
        data = data.T
    else:
        raise ValueError(f"save_audio expects (T,) or (C, T), got shape {tuple(data.shape)} for {path}")
    if data.shape[0] == 0:
        raise ValueError(f"refusing to write an empty waveform to {path}")
    if not np.isfinite(data).all():
        raise ValueError(f"refusing to write non-finite samples to {path}")
    pcm = np.round(np.clip(data, -1.0, 1.0) * 32767.0).astype(np.int16)
    with atomic_path(path) as tmp:
        sf.write(tmp, pcm, int(sample_rate), subtype="PCM_16", format="WAV")
    return path
