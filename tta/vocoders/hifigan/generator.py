"""HiFi-GAN generator (Kong et al., 2020) for any hop length.

The module names follow the original implementation (``conv_pre``, ``ups.N``,
``resblocks.N.convs1.M`` / ``convs2.M`` for ResBlock1, ``resblocks.N.convs.M`` for ResBlock2,
``conv_post``), so that original checkpoints map onto this network by renaming only the
weight-norm tensors (see `tta.vocoders.hifigan.importers`).

Weight norm is applied with ``torch.nn.utils.parametrizations.weight_norm`` (state-dict keys
``<layer>.parametrizations.weight.original0`` = g and ``original1`` = v); call
`HiFiGANGenerator.remove_weight_norm` before inference to fold it into plain weights.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from tta.data.mel import MelConfig
from tta.registry import register
from tta.vocoders.base import Vocoder, config_init_args
from tta.vocoders.weight_norm import WeightNormConvs

log = logging.getLogger(__name__)

LRELU_SLOPE = 0.1

# Keys of the original HiFi-GAN config.json that do not describe the generator architecture.
NON_ARCHITECTURE_KEYS = frozenset(
    {
        "num_gpus", "batch_size", "learning_rate", "adam_b1", "adam_b2", "lr_decay", "seed",
        "segment_size", "num_freq", "n_fft", "hop_size", "win_size", "sampling_rate", "fmin", "fmax",
        "fmax_for_loss", "num_workers", "dist_config", "fine_tuning", "training_epochs",
        "stdout_interval", "checkpoint_interval", "summary_interval", "validation_interval",
        "checkpoint_path", "input_wavs_dir", "input_mels_dir", "input_training_file",
        "input_validation_file",
    }
)
_ORIGINAL_TO_ARG = {"num_mels": "n_mels"}


def _padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def _has_weight_norm(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight")


class ResBlock1(nn.Module):
    """Pairs of (dilated conv, conv) with leaky-ReLU pre-activations and a residual per pair."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int], slope: float = LRELU_SLOPE) -> None:
        super().__init__()
        self.slope = slope
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=_padding(kernel_size, d)) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=_padding(kernel_size)) for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            y = c2(F.leaky_relu(c1(F.leaky_relu(x, self.slope)), self.slope))
            x = x + y
        return x


class ResBlock2(nn.Module):
    """Single dilated convs with leaky-ReLU pre-activation and a residual each (HiFi-GAN V3)."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int], slope: float = LRELU_SLOPE) -> None:
        super().__init__()
        self.slope = slope
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=_padding(kernel_size, d)) for d in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs:
            x = x + c(F.leaky_relu(x, self.slope))
        return x


@register("vocoder", "hifigan_generator")
class HiFiGANGenerator(WeightNormConvs, Vocoder):
    """HiFi-GAN generator: log-mel ``(B, n_mels, frames)`` -> waveform ``(B, frames * hop)``.

    ``hop = prod(upsample_rates)``. When an upsampling layer has ``kernel - rate`` odd (e.g.
    AudioLDM's 16 kHz vocoder, rates 5,4,2,2,2 / kernels 16,16,8,4,4) the transposed convs
    produce a few extra samples at the end; they are cropped so the output is exactly
    ``frames * hop`` samples (the same crop AudioLDM applies).

    Args:
        n_mels: mel bins of the input (``num_mels`` in the original config).
        upsample_rates: stride of each transposed conv.
        upsample_kernel_sizes: kernel of each transposed conv (``>= rate``).
        upsample_initial_channel: channels after ``conv_pre``; halved by every upsampling.
        resblock: ``"1"`` (V1/V2) or ``"2"`` (V3).
        resblock_kernel_sizes: kernel of each parallel residual block (MRF).
        resblock_dilation_sizes: dilations of each residual block.
        leaky_relu_slope: slope of the inner leaky ReLUs (the final one uses 0.01, as the original).
        normalize_input: standardise the input as ``(mel - mean) / scale`` with per-bin buffers
            ``mean`` and ``scale`` (SpeechT5HifiGan's ``normalize_before``).
        use_weight_norm: apply weight norm (training); see `remove_weight_norm`.
        mel_config: the mel front-end (a `MelConfig` or a preset name), when known.
    """

    def __init__(
        self,
        n_mels: int = 80,
        upsample_rates: Sequence[int] = (8, 8, 2, 2),
        upsample_kernel_sizes: Sequence[int] = (16, 16, 4, 4),
        upsample_initial_channel: int = 512,
        resblock: str = "1",
        resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
        resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        leaky_relu_slope: float = LRELU_SLOPE,
        normalize_input: bool = False,
        use_weight_norm: bool = True,
        mel_config: MelConfig | str | None = None,
    ) -> None:
        upsample_rates = [int(r) for r in upsample_rates]
        upsample_kernel_sizes = [int(k) for k in upsample_kernel_sizes]
        resblock = str(resblock)
        self._validate(n_mels, upsample_rates, upsample_kernel_sizes, upsample_initial_channel, resblock,
                       resblock_kernel_sizes, resblock_dilation_sizes)
        super().__init__(hop_length=math.prod(upsample_rates), n_mels=n_mels)
        self.config: dict[str, Any] = {
            "n_mels": int(n_mels),
            "upsample_rates": list(upsample_rates),
            "upsample_kernel_sizes": list(upsample_kernel_sizes),
            "upsample_initial_channel": int(upsample_initial_channel),
            "resblock": resblock,
            "resblock_kernel_sizes": [int(k) for k in resblock_kernel_sizes],
            "resblock_dilation_sizes": [[int(d) for d in ds] for ds in resblock_dilation_sizes],
            "leaky_relu_slope": float(leaky_relu_slope),
            "normalize_input": bool(normalize_input),
        }
        self.slope = float(leaky_relu_slope)
        self.num_kernels = len(resblock_kernel_sizes)
        block_cls = ResBlock1 if resblock == "1" else ResBlock2

        self.conv_pre = nn.Conv1d(n_mels, upsample_initial_channel, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        ch = upsample_initial_channel
        for rate, kernel in zip(upsample_rates, upsample_kernel_sizes):
            self.ups.append(nn.ConvTranspose1d(ch, ch // 2, kernel, stride=rate, padding=(kernel - rate) // 2))
            ch //= 2
            for k, dil in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(block_cls(ch, int(k), [int(d) for d in dil], self.slope))
        self.conv_post = nn.Conv1d(ch, 1, 7, padding=3)
        if normalize_input:
            self.register_buffer("mean", torch.zeros(n_mels))
            self.register_buffer("scale", torch.ones(n_mels))
        self._init_weights()
        if use_weight_norm:
            self.apply_weight_norm()
        self.set_mel_config(mel_config)

    @staticmethod
    def _validate(
        n_mels: int,
        rates: Sequence[int],
        kernels: Sequence[int],
        channels: int,
        resblock: str,
        rb_kernels: Sequence[int],
        rb_dilations: Sequence[Sequence[int]],
    ) -> None:
        if resblock not in ("1", "2"):
            raise ValueError(f"HiFiGANGenerator: resblock must be '1' or '2', got {resblock!r}")
        if len(rates) == 0 or len(rates) != len(kernels):
            raise ValueError(
                f"HiFiGANGenerator: upsample_rates {list(rates)} and upsample_kernel_sizes {list(kernels)} "
                "must be non-empty and of equal length"
            )
        for r, k in zip(rates, kernels):
            if r <= 0 or k < r:
                raise ValueError(f"HiFiGANGenerator: upsample kernel {k} must be >= its rate {r} > 0")
        if len(rb_kernels) == 0 or len(rb_kernels) != len(rb_dilations):
            raise ValueError(
                "HiFiGANGenerator: resblock_kernel_sizes and resblock_dilation_sizes must be non-empty "
                f"and of equal length, got {list(rb_kernels)} and {[list(d) for d in rb_dilations]}"
            )
        if channels % (2 ** len(rates)) != 0:
            raise ValueError(
                f"HiFiGANGenerator: upsample_initial_channel {channels} must be divisible by "
                f"2**{len(rates)} (it is halved at every upsampling)"
            )
        if n_mels <= 0:
            raise ValueError(f"HiFiGANGenerator: n_mels must be positive, got {n_mels}")

    def _init_weights(self) -> None:
        for module in list(self.ups) + [m for m in self.resblocks.modules() if isinstance(m, nn.Conv1d)]:
            nn.init.normal_(module.weight, 0.0, 0.01)

    def _convs(self) -> list[nn.Module]:
        layers: list[nn.Module] = [self.conv_pre, *self.ups]
        layers += [m for m in self.resblocks.modules() if isinstance(m, nn.Conv1d)]
        layers.append(self.conv_post)
        return layers

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any], **kwargs: Any) -> HiFiGANGenerator:
        """Build from an original HiFi-GAN ``config.json`` dict (training keys are ignored).

        ``num_mels`` maps to ``n_mels``; unknown keys raise `ValueError` (they may change the
        architecture). ``kwargs`` are passed to the constructor (e.g. ``use_weight_norm``).
        """
        args = config_init_args(cls, config, _ORIGINAL_TO_ARG, NON_ARCHITECTURE_KEYS, "HiFi-GAN")
        args.update(kwargs)
        return cls(**args)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """``mel (B, n_mels, frames)`` -> ``wav (B, frames * hop_length)`` in ``[-1, 1]``."""
        self.check_mel(mel)
        frames = mel.shape[-1]
        x = mel
        if self.config["normalize_input"]:
            x = (x - self.mean[:, None]) / self.scale[:, None]
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, self.slope))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            acc = blocks[0](x)
            for block in blocks[1:]:
                acc = acc + block(x)
            x = acc / self.num_kernels
        x = torch.tanh(self.conv_post(F.leaky_relu(x)))
        return x[:, 0, : frames * self.hop_length]
