"""BigVGAN's multi-resolution discriminator (MRD; registered ``bigvgan_mrd``).

One `ResolutionDiscriminator` per STFT resolution ``(n_fft, hop_length, win_length)``, each a
stack of 2-D convs over the linear magnitude spectrogram ``(B, 1, n_fft/2+1, frames)`` (after
UnivNet; BigVGAN v1's ``DiscriminatorR``). BigVGAN pairs it with HiFi-GAN's multi-period
discriminator, which tta reuses as is (``hifigan_mpd``,
`tta.vocoders.hifigan.discriminators.MultiPeriodDiscriminator`).

Constants from NVIDIA/BigVGAN v2.4 (``discriminators.py`` and every v1 config):

* resolutions ``((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))``;
* 32 channels per conv (x ``channel_mult``, upstream's ``discriminator_channel_mult``):
  ``(3, 9)`` kernels, the middle three strided by 2 along time, then ``(3, 3)`` and a ``(3, 3)``
  one-channel ``conv_post``; leaky ReLU 0.1; weight norm (spectral norm on request);
* the spectrogram: reflect-pad ``(n_fft - hop) / 2`` both sides, ``center=False``, and no window
  given to ``torch.stft`` upstream, i.e. a *rectangular* window of ``win_length`` samples; tta
  passes that window explicitly, so the values are identical.

Same interface as every `tta.vocoders.gan.GANVocoderModule` discriminator: ``forward(wav (B, T)
| (B, 1, T)) -> (logits, feature_maps)`` with one entry per resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from tta.registry import register
from tta.vocoders.hifigan.discriminators import (
    DiscriminatorOutput,
    as_batch_channel_time,
    leaky_conv_stack,
    scaled_width,
)

RESOLUTIONS = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))
MRD_CHANNELS = 32


class ResolutionDiscriminator(nn.Module):
    """2-D convs over the magnitude STFT at one resolution ``(n_fft, hop_length, win_length)``."""

    def __init__(self, resolution: Sequence[int], channel_mult: float = 1.0, use_spectral_norm: bool = False) -> None:
        super().__init__()
        if len(resolution) != 3 or any(int(v) <= 0 for v in resolution):
            raise ValueError(f"ResolutionDiscriminator: resolution must be (n_fft, hop_length, win_length) > 0, "
                             f"got {list(resolution)}")
        self.n_fft, self.hop_length, self.win_length = (int(v) for v in resolution)
        if self.win_length > self.n_fft or self.hop_length > self.n_fft:
            raise ValueError(f"ResolutionDiscriminator: resolution {list(resolution)} needs hop_length and "
                             "win_length <= n_fft")
        norm = spectral_norm if use_spectral_norm else weight_norm
        ch = scaled_width(MRD_CHANNELS, channel_mult)
        self.convs = nn.ModuleList([
            norm(nn.Conv2d(1, ch, (3, 9), padding=(1, 4))),
            *(norm(nn.Conv2d(ch, ch, (3, 9), stride=(1, 2), padding=(1, 4))) for _ in range(3)),
            norm(nn.Conv2d(ch, ch, (3, 3), padding=(1, 1))),
        ])
        self.conv_post = norm(nn.Conv2d(ch, 1, (3, 3), padding=(1, 1)))
        self.register_buffer("window", torch.ones(self.win_length), persistent=False)

    def spectrogram(self, wav: torch.Tensor) -> torch.Tensor:
        """Linear magnitude ``(B, n_fft/2+1, frames)`` of ``wav (B, 1, T)``; ``frames = T // hop``
        when ``n_fft - hop`` is even."""
        pad = (self.n_fft - self.hop_length) // 2
        if wav.shape[-1] <= pad:
            raise ValueError(f"ResolutionDiscriminator (n_fft {self.n_fft}, hop {self.hop_length}): the waveform has "
                             f"{wav.shape[-1]} samples, it needs more than {pad} (use longer training segments)")
        x = F.pad(wav, (pad, pad), mode="reflect").squeeze(1)
        spec = torch.stft(x, n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                          window=self.window.to(x.dtype), center=False, return_complex=True)
        return spec.abs()

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return leaky_conv_stack(self.spectrogram(as_batch_channel_time(wav)).unsqueeze(1), self.convs, self.conv_post)


@register("discriminator", "bigvgan_mrd")
class MultiResolutionDiscriminator(nn.Module):
    """One `ResolutionDiscriminator` per STFT resolution (BigVGAN's MRD).

    Args:
        resolutions: ``(n_fft, hop_length, win_length)`` of each sub-discriminator.
        channel_mult: width multiplier (1.0 = BigVGAN's 32 channels).
        use_spectral_norm: spectral instead of weight norm (upstream's ``use_spectral_norm``).
    """

    def __init__(self, resolutions: Sequence[Sequence[int]] = RESOLUTIONS, channel_mult: float = 1.0,
                 use_spectral_norm: bool = False) -> None:
        super().__init__()
        if not resolutions:
            raise ValueError("MultiResolutionDiscriminator: resolutions is empty")
        self.resolutions = [[int(v) for v in r] for r in resolutions]
        self.discriminators = nn.ModuleList(
            ResolutionDiscriminator(r, channel_mult, use_spectral_norm) for r in self.resolutions
        )

    def forward(self, wav: torch.Tensor) -> DiscriminatorOutput:
        """``wav (B, T)`` -> (list of logits ``(B, n)``, list of feature-map lists)."""
        logits, fmaps = [], []
        for d in self.discriminators:
            logit, fmap = d(wav)
            logits.append(logit)
            fmaps.append(fmap)
        return logits, fmaps
