"""Spectral distances between a reference and an estimated waveform (vocoder evaluation).

Both functions take waveforms ``(B, T)`` (or ``(T,)``), trim both to the shorter length,
compute in float32 and return one value per item, shape ``(B,)`` (a scalar for 1-D inputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tta.data.mel import MelFrontend

DEFAULT_RESOLUTIONS: tuple[tuple[int, int, int], ...] = ((512, 128, 512), (1024, 256, 1024), (2048, 512, 2048))
MAG_FLOOR = 1e-7


def _pair(wav_ref: torch.Tensor, wav_est: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if wav_ref.dim() != wav_est.dim() or wav_ref.dim() not in (1, 2):
        raise ValueError(
            f"expected two waveforms (B, T) or (T,) of the same rank, got {tuple(wav_ref.shape)} "
            f"and {tuple(wav_est.shape)}"
        )
    single = wav_ref.dim() == 1
    if single:
        wav_ref, wav_est = wav_ref[None], wav_est[None]
    if wav_ref.shape[0] != wav_est.shape[0]:
        raise ValueError(f"batch sizes differ: {wav_ref.shape[0]} vs {wav_est.shape[0]}")
    n = min(wav_ref.shape[-1], wav_est.shape[-1])
    return wav_ref[:, :n].float(), wav_est[:, :n].float(), single


def mel_l1(wav_ref: torch.Tensor, wav_est: torch.Tensor, frontend: MelFrontend) -> torch.Tensor:
    """Mean absolute log-mel difference per item (natural-log units of ``frontend``)."""
    ref, est, single = _pair(wav_ref, wav_est)
    with torch.autocast(device_type=ref.device.type, enabled=False):
        dist = (frontend(ref) - frontend(est)).abs().mean(dim=(1, 2))
    return dist[0] if single else dist


def _magnitude(wav: torch.Tensor, n_fft: int, hop: int, win: int) -> torch.Tensor:
    window = torch.hann_window(win, device=wav.device)
    spec = torch.stft(wav, n_fft, hop, win, window=window, center=True, pad_mode="reflect", return_complex=True)
    return spec.abs().clamp(min=MAG_FLOOR)


def multi_resolution_stft_distance(
    wav_ref: torch.Tensor,
    wav_est: torch.Tensor,
    resolutions: Sequence[tuple[int, int, int]] = DEFAULT_RESOLUTIONS,
) -> torch.Tensor:
    """Mean over ``(n_fft, hop, win)`` resolutions of spectral convergence + log-magnitude L1.

    Spectral convergence is ``||S_ref - S_est||_F / ||S_ref||_F``; the log term is
    ``mean|log S_ref - log S_est|`` with magnitudes floored at ``1e-7``.
    """
    if not resolutions:
        raise ValueError("multi_resolution_stft_distance: no resolutions given")
    ref, est, single = _pair(wav_ref, wav_est)
    total = torch.zeros(ref.shape[0], device=ref.device)
    with torch.autocast(device_type=ref.device.type, enabled=False):
        for n_fft, hop, win in resolutions:
            s_ref = _magnitude(ref, n_fft, hop, win)
            s_est = _magnitude(est, n_fft, hop, win)
            convergence = torch.linalg.vector_norm(s_ref - s_est, dim=(1, 2)) / torch.linalg.vector_norm(
                s_ref, dim=(1, 2)
            ).clamp(min=MAG_FLOOR)
            log_l1 = (s_ref.log() - s_est.log()).abs().mean(dim=(1, 2))
            total = total + convergence + log_l1
    dist = total / len(resolutions)
    return dist[0] if single else dist
