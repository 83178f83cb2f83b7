"""Mel <-> latent conversion around a trained `AutoencoderKL`, as diffusion models use it.

`mel_to_image` / `image_to_mel` convert between tta's mel layout ``(B, n_mels, frames)`` and the
autoencoder's image layout ``(B, 1, frames, n_mels)`` (AudioLDM's), padding the frames to the
downsample factor with the log floor (silence). `LatentCodec` adds the latent scale
(``scale_factor = 1 / std(z)``, measured by the VAE module) and freezes the autoencoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tta.data.mel import MelConfig
from tta.generators.vae.distribution import DiagonalGaussian
from tta.generators.vae.network import AutoencoderKL


def mel_to_image(mel: torch.Tensor, factor: int, log_floor: float) -> tuple[torch.Tensor, int]:
    """``(B, n_mels, F)`` -> ``(B, 1, F', n_mels)`` with ``F'`` padded to ``factor`` by ``log(log_floor)``."""
    if mel.ndim != 3:
        raise ValueError(f"expected a log-mel batch (B, n_mels, frames), got shape {tuple(mel.shape)}")
    frames, n_mels = mel.shape[-1], mel.shape[-2]
    if n_mels % factor:
        raise ValueError(f"n_mels={n_mels} is not divisible by the VAE's downsample factor {factor}")
    pad = (-frames) % factor
    x = F.pad(mel, (0, pad), value=math.log(log_floor)) if pad else mel
    return x.transpose(1, 2).unsqueeze(1), frames


def image_to_mel(x: torch.Tensor, frames: int | None = None) -> torch.Tensor:
    """``(B, 1, F', n_mels)`` -> ``(B, n_mels, frames)`` (cropped to ``frames`` when given)."""
    mel = x.squeeze(1).transpose(1, 2)
    return mel if frames is None else mel[..., :frames]


class LatentCodec(nn.Module):
    """A frozen mel autoencoder with its latent scale: ``encode(mel) -> z * scale``, ``decode(z) -> mel``.

    Args:
        autoencoder: the trained `AutoencoderKL`.
        mel_config: the mel front-end the autoencoder was trained on.
        scale_factor: ``1 / std(z)`` of the training latents.
    """

    def __init__(self, autoencoder: AutoencoderKL, mel_config: MelConfig, scale_factor: float) -> None:
        super().__init__()
        if not math.isfinite(scale_factor) or scale_factor <= 0:
            raise ValueError(f"scale_factor must be a positive finite number, got {scale_factor}")
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.mel_config = mel_config
        self.scale_factor = float(scale_factor)

    def train(self, mode: bool = True) -> LatentCodec:
        """The codec stays in eval mode (it is frozen)."""
        return super().train(False)

    @property
    def factor(self) -> int:
        """Compression of frames and mel bins."""
        return self.autoencoder.downsample_factor

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.embed_dim)

    def latent_shape(self, frames: int) -> tuple[int, int, int]:
        """Latent ``(C, ceil(frames / f), n_mels / f)`` of a mel with ``frames`` frames."""
        f = self.factor
        return (self.latent_channels, -(-frames // f), self.mel_config.n_mels // f)

    @torch.no_grad()
    def moments(self, mel: torch.Tensor) -> torch.Tensor:
        """The posterior's parameters ``(B, 2C, H, W)`` (mean and log-variance, unscaled) of
        log-mels ``(B, n_mels, frames)``: what a latent cache stores, so training still samples."""
        x, _ = mel_to_image(mel, self.factor, self.mel_config.log_floor)
        return self.autoencoder.encode(x).parameters

    def from_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None,
                     sample: bool = True) -> torch.Tensor:
        """Scaled latents from posterior parameters (a sample drawn with ``generator``, or the mode)."""
        posterior = DiagonalGaussian(moments)
        z = posterior.sample(generator=generator) if sample else posterior.mode()
        return z * self.scale_factor

    @torch.no_grad()
    def encode(self, mel: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """Log-mel ``(B, n_mels, frames)`` -> scaled latents (a posterior sample, or its mode)."""
        return self.from_moments(self.moments(mel), generator, sample)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """Scaled latents -> log-mel ``(B, n_mels, frames)``."""
        return image_to_mel(self.autoencoder.decode(z / self.scale_factor), frames)
