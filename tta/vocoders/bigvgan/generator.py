"""BigVGAN generator (Lee et al., 2023, "BigVGAN: A Universal Neural Vocoder with Large-Scale Training").

``conv_pre`` (k 7) -> per upsampling rate: transposed conv (channels halved) + the mean of
``len(resblock_kernel_sizes)`` AMP blocks (anti-aliased multi-periodicity residual blocks) ->
anti-aliased Snake/SnakeBeta -> ``conv_post`` (k 7) -> ``tanh`` (or a clamp to ``[-1, 1]``).
Unlike HiFi-GAN there is no leaky ReLU anywhere: every activation is a periodic Snake run at
twice the rate between Kaiser-sinc resamplers (`tta.vocoders.bigvgan.activations`).

Module names follow NVIDIA/BigVGAN (``conv_pre``, ``ups.N.0``, ``resblocks.N.convs1.M`` /
``convs2.M`` / ``activations.K.act.alpha``, ``activation_post``, ``conv_post``), so its
checkpoints load by renaming only the weight-norm tensors (`tta.vocoders.bigvgan.importers`).
Weight norm uses ``torch.nn.utils.parametrizations.weight_norm``; call `remove_weight_norm`
before inference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tta.data.mel import MelConfig
from tta.registry import register
from tta.vocoders.base import Vocoder, config_init_args
from tta.vocoders.bigvgan.activations import ACTIVATIONS, AntiAliasActivation, snake_activation
from tta.vocoders.hifigan.generator import NON_ARCHITECTURE_KEYS as HIFIGAN_NON_ARCHITECTURE_KEYS
from tta.vocoders.weight_norm import WeightNormConvs

# Keys of NVIDIA's BigVGAN config.json that do not describe the generator: HiFi-GAN's training /
# data keys plus BigVGAN's discriminator, loss and kernel options (NVIDIA/BigVGAN v2.4 configs,
# train.py, discriminators.py). ``use_cuda_kernel`` only selects a fused CUDA implementation of
# the same anti-aliased activation; tta always runs the plain-torch one.
NON_ARCHITECTURE_KEYS = HIFIGAN_NON_ARCHITECTURE_KEYS | frozenset(
    {
        "resolutions", "mpd_reshapes", "use_spectral_norm", "discriminator_channel_mult", "mrd_use_spectral_norm",
        "mrd_channel_mult", "use_cqtd_instead_of_mrd", "cqtd_filters", "cqtd_max_filters", "cqtd_filters_scale",
        "cqtd_dilations", "cqtd_hop_lengths", "cqtd_n_octaves", "cqtd_bins_per_octaves", "cqtd_in_channels",
        "cqtd_out_channels", "cqtd_normalize_volume", "use_mbd_instead_of_mrd", "mbd_fft_sizes",
        "use_multiscale_melloss", "lambda_melloss", "clip_grad_norm", "use_cuda_kernel",
    }
)
_ORIGINAL_TO_ARG = {"num_mels": "n_mels"}
INIT_STD = 0.01  # upstream ``init_weights``: N(0, 0.01) for ups, AMP convs and conv_post


def _padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


class AMPBlock1(nn.Module):
    """Per dilation: anti-aliased act -> dilated conv -> anti-aliased act -> conv, plus a residual.

    ``activations`` interleaves the two activations of each pair (upstream's order: even
    indices before ``convs1``, odd ones before ``convs2``).
    """

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int], activation: str,
                 logscale: bool) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=_padding(kernel_size, d)) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=_padding(kernel_size)) for _ in dilations
        )
        self.activations = nn.ModuleList(
            AntiAliasActivation(snake_activation(activation, channels, logscale)) for _ in range(2 * len(dilations))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = self.activations
        for i, (c1, c2) in enumerate(zip(self.convs1, self.convs2)):
            x = x + c2(acts[2 * i + 1](c1(acts[2 * i](x))))
        return x


class AMPBlock2(nn.Module):
    """Per dilation: anti-aliased act -> dilated conv, plus a residual (upstream ``resblock: "2"``)."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int], activation: str,
                 logscale: bool) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=_padding(kernel_size, d)) for d in dilations
        )
        self.activations = nn.ModuleList(
            AntiAliasActivation(snake_activation(activation, channels, logscale)) for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, act in zip(self.convs, self.activations):
            x = x + conv(act(x))
        return x


@register("vocoder", "bigvgan_generator")
class BigVGANGenerator(WeightNormConvs, Vocoder):
    """BigVGAN generator: log-mel ``(B, n_mels, frames)`` -> waveform ``(B, frames * hop)``.

    ``hop = prod(upsample_rates)``; when a transposed conv has ``kernel - rate`` odd it yields a
    sample more per layer, cropped so the output is exactly ``frames * hop`` samples. The
    defaults are BigVGAN-base's (``bigvgan_base_22khz_80band``: 22.05 kHz, 80 mels, hop 256).

    Args:
        n_mels: mel bins of the input (``num_mels`` in NVIDIA's config).
        upsample_rates, upsample_kernel_sizes: stride and kernel (``>= rate``) of each transposed conv.
        upsample_initial_channel: channels after ``conv_pre``; halved by every upsampling.
        resblock: ``"1"`` (`AMPBlock1`, BigVGAN's) or ``"2"`` (`AMPBlock2`).
        resblock_kernel_sizes, resblock_dilation_sizes: kernel and dilations of each parallel AMP block.
        activation: ``"snake"`` or ``"snakebeta"``.
        snake_logscale: Snake parameters stored as logarithms (every published config: ``true``).
        use_tanh_at_final: ``tanh`` on the output (v1); ``False`` clamps to ``[-1, 1]`` (v2).
        use_bias_at_final: bias of ``conv_post`` (v1); v2 drops it.
        use_weight_norm: weight-normalise every conv (training); see `remove_weight_norm`.
        mel_config: the mel front-end (a `MelConfig`, preset name or dict), when known.
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
        activation: str = "snakebeta",
        snake_logscale: bool = True,
        use_tanh_at_final: bool = True,
        use_bias_at_final: bool = True,
        use_weight_norm: bool = True,
        mel_config: MelConfig | str | dict | None = None,
    ) -> None:
        cfg: dict[str, Any] = {
            "n_mels": int(n_mels),
            "upsample_rates": [int(r) for r in upsample_rates],
            "upsample_kernel_sizes": [int(k) for k in upsample_kernel_sizes],
            "upsample_initial_channel": int(upsample_initial_channel),
            "resblock": str(resblock),
            "resblock_kernel_sizes": [int(k) for k in resblock_kernel_sizes],
            "resblock_dilation_sizes": [[int(d) for d in ds] for ds in resblock_dilation_sizes],
            "activation": str(activation),
            "snake_logscale": bool(snake_logscale),
            "use_tanh_at_final": bool(use_tanh_at_final),
            "use_bias_at_final": bool(use_bias_at_final),
        }
        _validate(cfg)
        super().__init__(hop_length=math.prod(cfg["upsample_rates"]), n_mels=cfg["n_mels"])
        self.config = cfg
        block_cls = AMPBlock1 if cfg["resblock"] == "1" else AMPBlock2
        self.num_kernels = len(cfg["resblock_kernel_sizes"])
        ch = cfg["upsample_initial_channel"]
        self.conv_pre = nn.Conv1d(cfg["n_mels"], ch, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for rate, kernel in zip(cfg["upsample_rates"], cfg["upsample_kernel_sizes"]):
            up = nn.ConvTranspose1d(ch, ch // 2, kernel, stride=rate, padding=(kernel - rate) // 2)
            self.ups.append(nn.ModuleList([up]))  # upstream nests each upsampler: keys ups.N.0.*
            ch //= 2
            for k, dil in zip(cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"]):
                self.resblocks.append(block_cls(ch, k, dil, cfg["activation"], cfg["snake_logscale"]))
        self.activation_post = AntiAliasActivation(snake_activation(cfg["activation"], ch, cfg["snake_logscale"]))
        self.conv_post = nn.Conv1d(ch, 1, 7, padding=3, bias=cfg["use_bias_at_final"])
        for layer in self._convs()[1:]:  # conv_pre keeps PyTorch's default init, as upstream
            nn.init.normal_(layer.weight, 0.0, INIT_STD)
        if use_weight_norm:
            self.apply_weight_norm()
        self.set_mel_config(mel_config)

    def _convs(self) -> list[nn.Module]:
        layers: list[nn.Module] = [self.conv_pre, *(up[0] for up in self.ups)]
        layers += [m for m in self.resblocks.modules() if isinstance(m, nn.Conv1d)]
        layers.append(self.conv_post)
        return layers

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any], **kwargs: Any) -> BigVGANGenerator:
        """Build from NVIDIA's BigVGAN ``config.json`` dict.

        ``num_mels`` maps to ``n_mels``; training, data and discriminator keys
        (`NON_ARCHITECTURE_KEYS`) are ignored; any other unknown key raises `ValueError`, since
        it may change the network. ``kwargs`` go to the constructor (e.g. ``use_weight_norm``).
        """
        args = config_init_args(cls, config, _ORIGINAL_TO_ARG, NON_ARCHITECTURE_KEYS, "BigVGAN",
                                exclude=frozenset({"use_weight_norm", "mel_config"}))
        args.update(kwargs)
        return cls(**args)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """``mel (B, n_mels, frames)`` -> ``wav (B, frames * hop_length)`` in ``[-1, 1]``."""
        self.check_mel(mel)
        frames = mel.shape[-1]
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up[0](x)
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            acc = blocks[0](x)
            for block in blocks[1:]:
                acc = acc + block(x)
            x = acc / self.num_kernels
        x = self.conv_post(self.activation_post(x))
        x = torch.tanh(x) if self.config["use_tanh_at_final"] else x.clamp(-1.0, 1.0)
        return x[:, 0, : frames * self.hop_length]


def _validate(cfg: Mapping[str, Any]) -> None:
    """Raise `ValueError` naming the first inconsistent architecture field."""
    rates, kernels = cfg["upsample_rates"], cfg["upsample_kernel_sizes"]
    if cfg["resblock"] not in ("1", "2"):
        raise ValueError(f"BigVGANGenerator: resblock must be '1' or '2', got {cfg['resblock']!r}")
    if cfg["activation"] not in ACTIVATIONS:
        raise ValueError(f"BigVGANGenerator: activation must be one of {list(ACTIVATIONS)}, got {cfg['activation']!r}")
    if not rates or len(rates) != len(kernels):
        raise ValueError(f"BigVGANGenerator: upsample_rates {rates} and upsample_kernel_sizes {kernels} must be "
                         "non-empty and of equal length")
    for r, k in zip(rates, kernels):
        if r <= 0 or k < r:
            raise ValueError(f"BigVGANGenerator: upsample kernel {k} must be >= its rate {r} > 0")
    rb_kernels, rb_dilations = cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"]
    if not rb_kernels or len(rb_kernels) != len(rb_dilations) or not all(rb_dilations):
        raise ValueError(f"BigVGANGenerator: resblock_kernel_sizes {rb_kernels} and resblock_dilation_sizes "
                         f"{rb_dilations} must be non-empty and of equal length")
    if cfg["upsample_initial_channel"] % (2 ** len(rates)) != 0:
        raise ValueError(f"BigVGANGenerator: upsample_initial_channel {cfg['upsample_initial_channel']} must be "
                         f"divisible by 2**{len(rates)} (it is halved at every upsampling)")
    if cfg["n_mels"] <= 0:
        raise ValueError(f"BigVGANGenerator: n_mels must be positive, got {cfg['n_mels']}")
