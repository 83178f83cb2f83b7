"""Griffin-Lim vocoder: the training-free baseline of the demo.

log-mel -> mel magnitude (``exp``) -> linear magnitude by non-negative least squares against the
mel filter bank (pseudo-inverse start, then multiplicative NNLS updates, clamped >= 0) -> phase
by fast Griffin-Lim (Perraudin et al., 2013, momentum 0.99).

The STFT matches `MelFrontend`: the signal is reflect-padded by ``(n_fft - hop) // 2`` on both
sides and framed without centring, so ``frames`` mel frames give exactly ``frames * hop``
samples, and re-analysing the output with the front-end gives back ``frames`` frames.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from tta.data.mel import MelConfig, MelFrontend
from tta.registry import register
from tta.vocoders.base import Vocoder, resolve_mel_config

log = logging.getLogger(__name__)


@register("vocoder", "griffinlim")
class GriffinLimVocoder(Vocoder):
    """Log-mel ``(B, n_mels, frames)`` -> waveform ``(B, frames * hop)`` by Griffin-Lim.

    Args:
        mel_config: the mel front-end (a `MelConfig`, a preset name or a dict); ``kind='stft'``.
        n_iter: Griffin-Lim iterations.
        momentum: fast Griffin-Lim momentum (0 = plain Griffin-Lim).
        nnls_iters: multiplicative NNLS refinements of the pseudo-inverse magnitude.
        seed: seed of the random initial phase (the output is deterministic).
    """

    needs_weights = False

    def __init__(
        self,
        mel_config: MelConfig | str | dict = "demo",
        n_iter: int = 32,
        momentum: float = 0.99,
        nnls_iters: int = 10,
        seed: int = 0,
    ) -> None:
        cfg = resolve_mel_config(mel_config)
        if cfg is None or cfg.kind != "stft":
            raise ValueError(f"GriffinLimVocoder needs an STFT mel config, got {cfg}")
        if n_iter < 0 or nnls_iters < 0 or not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"GriffinLimVocoder: need n_iter >= 0, nnls_iters >= 0, 0 <= momentum < 1; "
                f"got {n_iter}, {nnls_iters}, {momentum}"
            )
        super().__init__(hop_length=cfg.hop_length, n_mels=cfg.n_mels, mel_config=cfg)
        self.n_iter = int(n_iter)
        self.momentum = float(momentum)
        self.nnls_iters = int(nnls_iters)
        self.seed = int(seed)
        self.frontend = MelFrontend.from_config(cfg)
        basis = self.frontend.mel_basis.double()  # (n_mels, n_freqs)
        self.register_buffer("mel_pinv", torch.linalg.pinv(basis).float(), persistent=False)
        # The analysis window zero-padded to n_fft (as torch.stft does for win_length < n_fft).
        left = (cfg.n_fft - cfg.win_length) // 2
        window = F.pad(self.frontend.window, (left, cfg.n_fft - cfg.win_length - left))
        self.register_buffer("synthesis_window", window, persistent=False)

    def mel_to_magnitude(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel ``(B, n_mels, frames)`` -> non-negative linear magnitude ``(B, n_fft/2+1, frames)``."""
        target = torch.exp(mel.float())
        basis = self.frontend.mel_basis
        mag = torch.clamp(self.mel_pinv @ target, min=0.0)
        if self.nnls_iters:
            eps = 1e-10
            numer = basis.T @ target  # fixed part of the multiplicative update
            mag = mag + 1e-6 * mag.amax(dim=1, keepdim=True).clamp(min=eps)  # leave no exact zeros
            for _ in range(self.nnls_iters):
                mag = mag * numer / (basis.T @ (basis @ mag) + eps)
        return mag

    def _stft(self, wav: torch.Tensor) -> torch.Tensor:
        cfg = self.config_
        pad = (cfg.n_fft - cfg.hop_length) // 2
        x = F.pad(wav.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        return torch.stft(
            x, cfg.n_fft, cfg.hop_length, cfg.win_length, window=self.frontend.window, center=False,
            return_complex=True,
        )

    def _istft(self, spec: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Least-squares inverse of `_stft`: windowed overlap-add, cropped to the unpadded signal."""
        cfg = self.config_
        frames = spec.shape[-1]
        chunks = torch.fft.irfft(spec, n=cfg.n_fft, dim=1) * self.synthesis_window[:, None]
        length = (frames - 1) * cfg.hop_length + cfg.n_fft
        fold = {"output_size": (1, length), "kernel_size": (1, cfg.n_fft), "stride": (1, cfg.hop_length)}
        signal = F.fold(chunks, **fold).flatten(1)
        win_sq = self.synthesis_window.pow(2)[None, :, None].expand(1, -1, frames)
        norm = F.fold(win_sq, **fold).flatten(1)
        signal = signal / torch.where(norm > 1e-8, norm, torch.ones_like(norm))
        pad = (cfg.n_fft - cfg.hop_length) // 2
        return signal[:, pad : pad + num_samples]

    def init_args(self) -> dict[str, Any]:
        return {"mel_config": self.config_.to_dict(), "n_iter": self.n_iter, "momentum": self.momentum,
                "nnls_iters": self.nnls_iters, "seed": self.seed}

    @property
    def config_(self) -> MelConfig:
        assert self.mel_config is not None
        return self.mel_config

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """``mel (B, n_mels, frames)`` -> ``wav (B, frames * hop_length)``."""
        self.check_mel(mel)
        with torch.autocast(device_type=mel.device.type, enabled=False):
            mag = self.mel_to_magnitude(mel)
            num_samples = mel.shape[-1] * self.hop_length
            gen = torch.Generator().manual_seed(self.seed)
            # one phase draw shared by the batch: an item's output does not depend on its batch
            phase = torch.rand(mag.shape[1:], generator=gen).to(mag.device) * (2 * torch.pi)
            angles = torch.polar(torch.ones_like(mag), phase.expand_as(mag))
            previous = torch.zeros_like(angles)
            wav = self._istft(mag * angles, num_samples)
            for _ in range(self.n_iter):
                rebuilt = self._stft(wav)
                accelerated = rebuilt - (self.momentum / (1 + self.momentum)) * previous
                angles = accelerated / accelerated.abs().clamp(min=1e-16)
                previous = rebuilt
                wav = self._istft(mag * angles, num_samples)
        return wav
