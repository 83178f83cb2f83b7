"""AudioLDM-style KL autoencoder on log-mel spectrograms.

Input layout is AudioLDM's ``(B, 1, frames, n_mels)``. With ``ch_mult=(1, 2, 4)`` the encoder
downsamples twice, so time and frequency are compressed by 4 (1024 x 64 -> 256 x 16, with
``embed_dim`` latent channels).

Submodule names follow the original latent-diffusion / AudioLDM code, so the keys of a public
AudioLDM checkpoint's ``first_stage_model.*`` entries load after stripping that prefix::

    encoder.conv_in
    encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}
    encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out}     (only for levels in attn_resolutions)
    encoder.down.{i}.downsample.conv                    (all levels but the last)
    encoder.mid.{block_1,attn_1,block_2}
    encoder.norm_out, encoder.conv_out
    decoder.conv_in, decoder.mid.*, decoder.up.{i}.block.{j}, decoder.up.{i}.upsample.conv
    decoder.norm_out, decoder.conv_out
    quant_conv, post_quant_conv

``decoder.up.{i}`` is the level of resolution ``i`` (``up.0`` is the full-resolution level),
as in the original code.

`ConvMelAutoencoder` holds what the VAE shares with the spectrogram VQGAN
(`tta.generators.vqgan.network.SpectrogramVQGAN`): encoder, decoder, the 1x1 convs around the
latent, size checks and ``latent_kind`` (continuous here, discrete for the VQGAN).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tta.generators.vae.distribution import DiagonalGaussian
from tta.nn.blocks import (
    Downsample2D,
    ResnetBlock2D,
    SpatialSelfAttention,
    Upsample2D,
    normalization,
)
from tta.registry import register

log = logging.getLogger(__name__)

__all__ = ["AutoencoderKL", "ConvMelAutoencoder", "Decoder", "Encoder"]


def _mid_block(channels: int, dropout: float, attention: bool) -> nn.Module:
    """res - attn - res at the bottleneck (``attn_1`` is an `nn.Identity` without attention)."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock2D(channels, channels, dropout=dropout)
    mid.attn_1 = SpatialSelfAttention(channels) if attention else nn.Identity()
    mid.block_2 = ResnetBlock2D(channels, channels, dropout=dropout)
    return mid


def _check_ch_mult(ch_mult: Sequence[int]) -> tuple[int, ...]:
    mult = tuple(int(m) for m in ch_mult)
    if not mult or any(m <= 0 for m in mult):
        raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult!r}")
    return mult


class Encoder(nn.Module):
    """Mel -> Gaussian moments ``(B, 2*z_channels, frames/f, n_mels/f)`` (or z_channels if not double_z).

    ``f = 2 ** (len(ch_mult) - 1)``. A level ``i`` gets attention blocks after its res blocks when
    ``resolution // 2**i`` is in ``attn_resolutions`` (the LDM convention, where ``resolution`` is
    the nominal input size; AudioLDM uses none).
    """

    def __init__(
        self,
        in_channels: int = 1,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        z_channels: int = 8,
        double_z: bool = True,
        dropout: float = 0.0,
        resolution: int = 256,
        mid_attention: bool = True,
    ) -> None:
        super().__init__()
        ch_mult = _check_ch_mult(ch_mult)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        in_ch_mult = (1, *ch_mult)
        curr_res = resolution
        block_in = ch
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock2D(block_in, block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(SpatialSelfAttention(block_in))
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample2D(block_in, with_conv=True)
                curr_res //= 2
            self.down.append(level)

        self.mid = _mid_block(block_in, dropout, mid_attention)
        self.norm_out = normalization(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, 2*z_channels, H/f, W/f)."""
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``(B, z_channels, h, w)`` -> mel ``(B, out_channels, h*f, w*f)``.

    Mirror of `Encoder` with ``num_res_blocks + 1`` res blocks per level.
    """

    def __init__(
        self,
        out_channels: int = 1,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        z_channels: int = 8,
        dropout: float = 0.0,
        resolution: int = 256,
        mid_attention: bool = True,
    ) -> None:
        super().__init__()
        ch_mult = _check_ch_mult(ch_mult)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid_block(block_in, dropout, mid_attention)

        levels: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock2D(block_in, block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(SpatialSelfAttention(block_in))
            if i_level != 0:
                level.upsample = Upsample2D(block_in, with_conv=True)
                curr_res *= 2
            levels.insert(0, level)  # up[i] is the level of resolution i, as in LDM
        self.up = nn.ModuleList(levels)

        self.norm_out = normalization(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z_channels, h, w) -> (B, out_channels, h*f, w*f)."""
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class ConvMelAutoencoder(nn.Module):
    """The conv autoencoder shared by the mel VAE and the spectrogram VQGAN (the autoencoder interface).

    ``encoder -> quant_conv -> latent -> post_quant_conv -> decoder`` on mels ``(B, in_channels,
    frames, n_mels)`` (AudioLDM's layout); both sides are compressed by ``downsample_factor``.
    Subclasses set ``latent_kind`` (``"continuous"``: `AutoencoderKL`, whose ``encode`` returns a
    `DiagonalGaussian`; ``"discrete"``: `SpectrogramVQGAN`, whose ``encode`` returns codes) and
    implement ``encode`` / ``decode``; ``decode`` always maps ``(B, embed_dim, h, w)`` latents to mels.
    ``double_z``: the encoder emits ``2 * z_channels`` (mean and log-variance) and ``quant_conv``
    maps them to ``2 * embed_dim``.
    """

    latent_kind: ClassVar[str] = ""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        embed_dim: int,
        attn_resolutions: Sequence[int],
        dropout: float,
        in_channels: int,
        out_channels: int,
        mid_attention: bool,
        resolution: int,
        double_z: bool,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        ch_mult = _check_ch_mult(ch_mult)
        for arg, value in (("ch", ch), ("z_channels", z_channels), ("embed_dim", embed_dim),
                           ("in_channels", in_channels), ("out_channels", out_channels)):
            if value <= 0:
                raise ValueError(f"{name}: {arg} must be positive, got {value}")
        if num_res_blocks < 0:
            raise ValueError(f"{name}: num_res_blocks must be >= 0, got {num_res_blocks}")
        self.config = {
            "ch": ch, "ch_mult": list(ch_mult), "num_res_blocks": num_res_blocks, "z_channels": z_channels,
            "embed_dim": embed_dim, "attn_resolutions": list(attn_resolutions), "dropout": dropout,
            "in_channels": in_channels, "out_channels": out_channels, "mid_attention": mid_attention,
            "resolution": resolution,
        }
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.embed_dim = embed_dim
        self.z_channels = z_channels
        self.encoder = Encoder(
            in_channels=in_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions, z_channels=z_channels, double_z=double_z, dropout=dropout,
            resolution=resolution, mid_attention=mid_attention,
        )
        self.decoder = Decoder(
            out_channels=out_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions, z_channels=z_channels, dropout=dropout,
            resolution=resolution, mid_attention=mid_attention,
        )
        moments = 2 if double_z else 1
        self.quant_conv = nn.Conv2d(moments * z_channels, moments * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        self._factor = 2 ** (len(ch_mult) - 1)

    @property
    def downsample_factor(self) -> int:
        """Compression of both time and frequency, ``2 ** (len(ch_mult) - 1)``."""
        return self._factor

    def _check_size(self, frames: int, n_mels: int, what: str) -> None:
        f = self._factor
        if frames % f != 0 or n_mels % f != 0:
            raise ValueError(
                f"{type(self).__name__}: {what} has frames={frames}, n_mels={n_mels}; both must be divisible "
                f"by the downsample factor {f} (pad the mel, e.g. frames to "
                f"{-(-frames // f) * f} and n_mels to {-(-n_mels // f) * f})"
            )

    def _check_mel(self, mel: torch.Tensor) -> None:
        if mel.ndim != 4 or mel.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}.encode expects a mel of shape (B, {self.in_channels}, frames, n_mels) "
                f"(AudioLDM layout); got {tuple(mel.shape)}"
            )
        self._check_size(int(mel.shape[2]), int(mel.shape[3]), f"input mel {tuple(mel.shape)}")

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(
                f"{type(self).__name__}.decode expects a latent of shape (B, {self.embed_dim}, h, w); "
                f"got {tuple(z.shape)}"
            )

    def latent_shape(self, frames: int, n_mels: int) -> tuple[int, int, int]:
        """Latent shape ``(embed_dim, frames / f, n_mels / f)`` of one mel; ValueError if not divisible."""
        self._check_size(frames, n_mels, "latent_shape request")
        return (self.embed_dim, frames // self._factor, n_mels // self._factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, embed_dim, h, w)`` -> mel ``(B, out_channels, h*f, w*f)``."""
        self._check_latent(z)
        return self.decoder(self.post_quant_conv(z))

    def last_layer_weight(self) -> torch.Tensor:
        """Weight of the decoder's last conv (for LDM's adaptive discriminator weight)."""
        return self.decoder.conv_out.weight


@register("autoencoder", "mel_vae")
class AutoencoderKL(ConvMelAutoencoder):
    """KL-regularised mel autoencoder (AudioLDM's first stage); continuous latents.

    Args:
        ch: base width; level ``i`` has ``ch * ch_mult[i]`` channels.
        ch_mult: width multipliers; ``len(ch_mult) - 1`` downsamplings by 2.
        num_res_blocks: res blocks per encoder level (decoder levels have one more).
        z_channels: channels of the encoder output / decoder input.
        embed_dim: latent channels after ``quant_conv`` (the diffusion model's channels).
        attn_resolutions: nominal resolutions (see `Encoder`) with attention blocks.
        dropout: dropout inside res blocks.
        in_channels: input channels (1 for mels).
        out_channels: output channels (1 for mels).
        mid_attention: self-attention between the two bottleneck res blocks.
        resolution: nominal input size for ``attn_resolutions`` (only matters when it is set).
    """

    latent_kind: ClassVar[str] = "continuous"

    def __init__(
        self,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 8,
        embed_dim: int = 8,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        in_channels: int = 1,
        out_channels: int = 1,
        mid_attention: bool = True,
        resolution: int = 256,
    ) -> None:
        super().__init__(
            ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels, embed_dim=embed_dim,
            attn_resolutions=attn_resolutions, dropout=dropout, in_channels=in_channels,
            out_channels=out_channels, mid_attention=mid_attention, resolution=resolution, double_z=True,
        )

    def encode(self, mel: torch.Tensor) -> DiagonalGaussian:
        """Mel ``(B, in_channels, frames, n_mels)`` -> posterior over ``(B, embed_dim, frames/f, n_mels/f)``."""
        self._check_mel(mel)
        moments = self.quant_conv(self.encoder(mel))
        return DiagonalGaussian(moments)

    def forward(
        self, mel: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Encode, sample (or take the mode) and decode: returns ``(reconstruction, posterior)``."""
        posterior = self.encode(mel)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
