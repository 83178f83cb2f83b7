"""Spectrogram VQGAN (SpecVQGAN / "Diverse and Vivid Sound Generation"): the conv mel autoencoder
of `tta.generators.vae.network` with a `VectorQuantizer` between encoder and decoder.

Same submodules and layout as `AutoencoderKL` (``encoder``, ``quant_conv``, ``post_quant_conv``,
``decoder``; mels ``(B, 1, frames, n_mels)``), with ``double_z=False`` and the codebook under
``quantize.*``. The latent of a mel is a grid of code indices ``(B, frames/f, n_mels/f)``; the
prior's sequence is that grid in time-major (column-major over frequency x time) order, which is
the row-major order of this ``(time, freq)`` layout (`indices_to_sequence`, `sequence_to_indices`).

The autoencoder interface (`ConvMelAutoencoder`): ``latent_kind`` (``"continuous"`` for the VAE,
``"discrete"`` here), ``downsample_factor``, ``latent_shape(frames, n_mels)``, ``encode(mel)``,
``decode(z)`` and ``last_layer_weight()``. ``encode`` returns what the latent is: a
`DiagonalGaussian` for the VAE, ``(z_q, indices, vq_loss, info)`` here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar

import torch

from tta.generators.vae.network import ConvMelAutoencoder
from tta.nn.quantize import VectorQuantizer, flatten_time_major, unflatten_time_major
from tta.registry import register

log = logging.getLogger(__name__)

__all__ = ["SpectrogramVQGAN"]


@register("autoencoder", "spectrogram_vqgan")
class SpectrogramVQGAN(ConvMelAutoencoder):
    """Mel VQGAN: encoder -> ``quant_conv`` -> ``quantize`` -> ``post_quant_conv`` -> decoder.

    Args:
        ch, ch_mult, num_res_blocks, z_channels, embed_dim, attn_resolutions, dropout, in_channels,
            out_channels, mid_attention, resolution: as `AutoencoderKL` (``embed_dim`` is the code
            dimension; SpecVQGAN: ch 128, ch_mult (1, 1, 2, 2, 4), 2 res blocks, 256 / 256).
        quantizer: the codebook (default: a plain `VectorQuantizer` of 1024 codes of ``embed_dim``);
            its ``dim`` must equal ``embed_dim``.
    """

    latent_kind: ClassVar[str] = "discrete"

    def __init__(
        self,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        embed_dim: int = 256,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        in_channels: int = 1,
        out_channels: int = 1,
        mid_attention: bool = True,
        resolution: int = 256,
        quantizer: VectorQuantizer | None = None,
    ) -> None:
        super().__init__(
            ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels, embed_dim=embed_dim,
            attn_resolutions=attn_resolutions, dropout=dropout, in_channels=in_channels,
            out_channels=out_channels, mid_attention=mid_attention, resolution=resolution, double_z=False,
        )
        self.quantize = quantizer if quantizer is not None else VectorQuantizer(num_codes=1024, dim=embed_dim)
        if self.quantize.dim != embed_dim:
            raise ValueError(f"SpectrogramVQGAN: the quantizer's dim {self.quantize.dim} must equal "
                             f"embed_dim {embed_dim}")  # fmt: skip
        self.config["quantizer"] = dict(self.quantize.config)

    @property
    def num_codes(self) -> int:
        """Codebook size (the prior's vocabulary)."""
        return self.quantize.num_codes

    def encode(
        self, mel: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Mel ``(B, in_channels, frames, n_mels)`` -> ``(z_q (B, embed_dim, frames/f, n_mels/f), indices
        (B, frames/f, n_mels/f), vq_loss, info)`` (``info`` as `VectorQuantizer.forward`)."""
        self._check_mel(mel)
        z_q, loss, info = self.quantize(self.quant_conv(self.encoder(mel)))
        return z_q, info["indices"], loss, info

    def decode_indices(self, indices: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Code indices -> mel: a grid ``(B, h, w)`` (``h = frames/f``, ``w = n_mels/f``) or a time-major
        sequence ``(B, h*w)`` with ``shape=(h, w)``."""
        if indices.dim() == 2:
            if shape is None or len(shape) != 2:
                raise ValueError("SpectrogramVQGAN.decode_indices: a flat (B, N) code sequence needs "
                                 f"shape=(frames/f, n_mels/f); got shape={shape!r}")  # fmt: skip
            h, w = (int(s) for s in shape)
            if indices.shape[1] != h * w:
                raise ValueError(f"SpectrogramVQGAN.decode_indices: {indices.shape[1]} codes do not fill a "
                                 f"{(h, w)} grid")  # fmt: skip
            indices = self.sequence_to_indices(indices, w)
        elif indices.dim() != 3:
            raise ValueError(f"SpectrogramVQGAN.decode_indices expects (B, h, w) or (B, h*w) indices, got "
                             f"{tuple(indices.shape)}")  # fmt: skip
        elif shape is not None and tuple(indices.shape[1:]) != tuple(int(s) for s in shape):
            raise ValueError(f"SpectrogramVQGAN.decode_indices: grid {tuple(indices.shape[1:])} != shape {tuple(shape)}")
        return self.decode(self.quantize.indices_to_codes(indices))

    @staticmethod
    def indices_to_sequence(indices: torch.Tensor) -> torch.Tensor:
        """Grid ``(B, frames/f, n_mels/f)`` -> the prior's time-major sequence ``(B, N)``."""
        if indices.dim() != 3:
            raise ValueError(f"indices_to_sequence expects a (B, time, freq) grid, got {tuple(indices.shape)}")
        return flatten_time_major(indices.transpose(1, 2))

    @staticmethod
    def sequence_to_indices(seq: torch.Tensor, freq: int) -> torch.Tensor:
        """Time-major sequence ``(B, N)`` -> grid ``(B, N / freq, freq)`` (``freq = n_mels / f``)."""
        return unflatten_time_major(seq, freq).transpose(1, 2)

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Encode, quantize and decode: ``(reconstruction, vq_loss, info)``."""
        z_q, _, loss, info = self.encode(mel)
        return self.decode(z_q), loss, info
