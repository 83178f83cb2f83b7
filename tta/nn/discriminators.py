"""PatchGAN discriminators: `NLayerDiscriminator` (images / mels, as used by the LDM / AudioLDM
autoencoders) and `STFTPatchDiscriminator` (the same network on a waveform's log-magnitude STFT,
with the waveform-discriminator interface of `tta.vocoders.gan.GANVocoderModule`).

`NLayerDiscriminator` keeps the ``main.{i}`` layer indices of the taming-transformers /
latent-diffusion PatchGAN, so a checkpoint's ``loss.discriminator.*`` entries load by prefix
stripping (with the same ``n_layers`` and norm). The GAN losses live in `tta.nn.gan_losses`.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from tta.registry import register

log = logging.getLogger(__name__)

__all__ = ["ActNorm", "NLayerDiscriminator", "STFTPatchDiscriminator", "weights_init"]

NormKind = Literal["batch", "actnorm", "none"]


class ActNorm(nn.Module):
    """Per-channel affine ``scale * (x + loc)`` initialised from the first training batch.

    On the first forward pass in training mode ``loc`` and ``scale`` are set so that the output
    has zero mean and unit variance per channel; ``initialized`` is a buffer, so the
    initialisation survives checkpointing.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        mean = flat.mean(dim=1)
        std = flat.std(dim=1) if flat.shape[1] > 1 else torch.ones_like(mean)
        self.loc.copy_((-mean).view_as(self.loc))
        self.scale.copy_((1.0 / (std + 1e-6)).view_as(self.scale))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        if self.training and int(self.initialized.item()) == 0:
            self._initialize(x)
        return self.scale * (x + self.loc)


def _norm_layer(kind: NormKind, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "actnorm":
        return ActNorm(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown discriminator norm {kind!r}; choose 'batch', 'actnorm' or 'none'")


@register("network", "patchgan")
class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming-transformers): one logit per receptive-field patch.

    Args:
        input_nc: input channels (1 for mels).
        ndf: width of the first layer; doubled per layer up to ``8 * ndf``.
        n_layers: number of stride-2 conv layers (3 gives a 70x70 receptive field).
        use_actnorm: use `ActNorm` instead of BatchNorm (taming's switch; overrides ``norm``).
        norm: ``"batch"`` (default), ``"actnorm"`` or ``"none"``. Convs followed by a norm
            layer have no bias, except with ActNorm (as in taming).
        init_weights: apply `weights_init` (DCGAN init, as LDM does) at construction.

    Input ``(B, input_nc, H, W)`` -> logits ``(B, 1, H', W')``; for H = W = 64 and 3 layers,
    H' = W' = 6.
    """

    def __init__(
        self,
        input_nc: int = 1,
        ndf: int = 64,
        n_layers: int = 3,
        use_actnorm: bool = False,
        norm: NormKind = "batch",
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"NLayerDiscriminator needs n_layers >= 1, got {n_layers}")
        kind: NormKind = "actnorm" if use_actnorm else norm
        _norm_layer(kind, 1)  # validate early with a clear message
        use_bias = kind != "batch"
        kw, padw = 4, 1
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw),
            nn.LeakyReLU(0.2, True),
        ]
        nf_mult = 1
        for n in range(1, n_layers):
            nf_mult_prev, nf_mult = nf_mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=2, padding=padw, bias=use_bias),
                _norm_layer(kind, ndf * nf_mult),
                nn.LeakyReLU(0.2, True),
            ]
        nf_mult_prev, nf_mult = nf_mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=1, padding=padw, bias=use_bias),
            _norm_layer(kind, ndf * nf_mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw),
        ]
        self.norm = kind
        self.main = nn.Sequential(*layers)
        if init_weights:
            self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, input_nc, H, W) -> patch logits (B, 1, H', W')."""
        return self.main(x)


def weights_init(module: nn.Module) -> None:
    """DCGAN init, for ``discriminator.apply(weights_init)``: conv N(0, 0.02); BatchNorm N(1, 0.02), bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


@register("discriminator", "stft_patchgan")
class STFTPatchDiscriminator(nn.Module):
    """`NLayerDiscriminator` on the log-magnitude STFT ``(B, 1, n_fft // 2 + 1, frames)`` of a waveform.

    ``forward(wav (B, T) | (B, 1, T)) -> ([logits (B, n)], [[feature maps]])``: one
    sub-discriminator, its feature maps taken after every LeakyReLU and at the output, the
    interface of HiFi-GAN's MPD / MSD, so it plugs into `GANVocoderModule` by config.

    Args:
        n_fft, hop_length, win_length: the STFT (Hann window, centred; ``win_length`` defaults to
            ``n_fft``).
        ndf, n_layers: the PatchGAN's width and depth (both spectrogram sides must be at least
            ``3 * 2**n_layers``).
        norm: PatchGAN norm; ``"none"`` by default, since the real and generated batches pass
            separately and would get different batch statistics.
    """

    def __init__(
        self,
        n_fft: int = 1024,
        hop_length: int = 256,
        win_length: int | None = None,
        ndf: int = 32,
        n_layers: int = 3,
        norm: NormKind = "none",
    ) -> None:
        super().__init__()
        win = win_length or n_fft
        if not 0 < hop_length <= win <= n_fft:
            raise ValueError(f"STFTPatchDiscriminator needs 0 < hop_length <= win_length <= n_fft, got "
                             f"{hop_length}, {win}, {n_fft}")
        self.n_fft, self.hop_length, self.win_length = int(n_fft), int(hop_length), int(win)
        self.min_size = 3 * 2**n_layers
        self.patchgan = NLayerDiscriminator(input_nc=1, ndf=ndf, n_layers=n_layers, norm=norm)
        self.register_buffer("window", torch.hann_window(self.win_length), persistent=False)

    def spectrogram(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav (B, T) | (B, 1, T)`` -> log-magnitude ``(B, 1, n_fft // 2 + 1, frames)``."""
        if wav.dim() == 3 and wav.shape[1] == 1:
            wav = wav.squeeze(1)
        if wav.dim() != 2:
            raise ValueError(f"STFTPatchDiscriminator expects a waveform (B, T) or (B, 1, T), got {tuple(wav.shape)}")
        spec = torch.stft(wav.float(), self.n_fft, self.hop_length, self.win_length, self.window, center=True,
                          return_complex=True).abs()
        return torch.log(spec.clamp(min=1e-5)).unsqueeze(1)

    def forward(self, wav: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """``wav (B, T)`` -> ([patch logits ``(B, n)``], [feature maps])."""
        x = self.spectrogram(wav)
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"STFTPatchDiscriminator: a {tuple(x.shape[-2:])} spectrogram is smaller than the {self.min_size} "
                "bins/frames the PatchGAN needs; use longer segments, a smaller hop_length or fewer n_layers"
            )
        fmaps = []
        for layer in self.patchgan.main:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                fmaps.append(x)
        fmaps.append(x)
        return [torch.flatten(x, 1)], [fmaps]
