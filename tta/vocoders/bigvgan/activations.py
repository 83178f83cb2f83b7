"""BigVGAN's periodic activations and their anti-aliased wrapper (plain torch, CPU and GPU alike).

* `Snake` (Liu Ziyin et al., 2020): ``x + 1/alpha * sin^2(alpha * x)`` and `SnakeBeta`:
  ``x + 1/beta * sin^2(alpha * x)``, with one trainable ``alpha`` (and ``beta``) per channel.
  With ``logscale=True`` the parameters hold logarithms (initialised to 0, i.e. ``alpha = 1``),
  otherwise the values themselves (initialised to 1), as BigVGAN's ``snake_logscale``.
* `AntiAliasActivation`: upsample 2x -> activation -> downsample 2x, both resamplers low-pass
  filtered with a Kaiser-windowed sinc. The periodic activation creates harmonics above the
  Nyquist frequency of the signal; running it at twice the rate and low-passing before
  decimating keeps them from folding back as aliases (BigVGAN's AMP module, after StyleGAN3's
  alias-free design).

Constants (all BigVGAN's defaults, ``alias_free_activation/torch`` of NVIDIA/BigVGAN v2.4):

* ``RESAMPLE_RATIO = 2``: ``Activation1d(up_ratio=2, down_ratio=2)``.
* ``FILTER_KERNEL_SIZE = 12``: ``Activation1d(up_kernel_size=12, down_kernel_size=12)`` (also
  ``int(6 * ratio // 2) * 2`` of ``UpSample1d`` / ``DownSample1d`` for ratio 2).
* cutoff ``0.5 / ratio`` and transition half-width ``0.6 / ratio`` (in cycles per sample of the
  upsampled signal): ``UpSample1d`` / ``DownSample1d``.
* Kaiser ``beta`` from the attenuation estimate ``A = 2.285 (K/2 - 1) pi 4 h + 7.95`` and
  Kaiser's empirical formula (``0.1102 (A - 8.7)`` above 50 dB, ``0.5842 (A - 21)^0.4 +
  0.07886 (A - 21)`` from 21 dB, else 0): ``kaiser_sinc_filter1d`` (after julius' low-pass).
  The taps are normalised to sum to one (unit gain at DC).
* Replicate padding before both filters; ``SNAKE_EPS = 1e-9`` guards the division (upstream's
  ``no_div_by_zero``).

The filters are *persistent* buffers in upstream's layout (``upsample.filter`` and
``downsample.lowpass.filter``, shape ``(1, 1, 12)``), because NVIDIA's published checkpoints
contain them: a strict load of those checkpoints needs the keys. They are constants, rebuilt
identically here; `check_filters` verifies that a loaded state still holds these values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

RESAMPLE_RATIO = 2
FILTER_KERNEL_SIZE = 12
CUTOFF = 0.5  # divided by the ratio
HALF_WIDTH = 0.6  # divided by the ratio
SNAKE_EPS = 1e-9
ACTIVATIONS = ("snake", "snakebeta")


def kaiser_beta(half_size: int, half_width: float) -> float:
    """Kaiser window ``beta`` for a filter of ``2 * half_size`` taps and transition half-width
    ``half_width`` (cycles per sample), from the estimated stop-band attenuation in dB."""
    attenuation = 2.285 * (half_size - 1) * math.pi * (4 * half_width) + 7.95
    if attenuation > 50.0:
        return 0.1102 * (attenuation - 8.7)
    if attenuation >= 21.0:
        return 0.5842 * (attenuation - 21.0) ** 0.4 + 0.07886 * (attenuation - 21.0)
    return 0.0


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """Low-pass FIR taps ``(1, 1, kernel_size)``: a sinc of cutoff ``cutoff`` (cycles per sample,
    at most 0.5) under a Kaiser window, normalised to unit DC gain. Even sizes are centred
    between two taps, odd sizes on one."""
    if not 0.0 < cutoff <= 0.5:
        raise ValueError(f"kaiser_sinc_filter: cutoff must be in (0, 0.5] cycles per sample, got {cutoff}")
    if kernel_size < 2:
        raise ValueError(f"kaiser_sinc_filter: kernel_size must be >= 2, got {kernel_size}")
    half = kernel_size // 2
    window = torch.kaiser_window(kernel_size, periodic=False, beta=kaiser_beta(half, half_width))
    offset = 0.5 if kernel_size % 2 == 0 else 0.0
    t = torch.arange(kernel_size, dtype=torch.float32) - half + offset
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * t)
    return (taps / taps.sum()).view(1, 1, kernel_size)


class LowPassFilter1d(nn.Module):
    """Depthwise FIR low-pass of ``(B, C, T)`` with replicate padding, optionally strided
    (``stride = ratio`` decimates). Output length ``ceil(T / stride)`` for even kernels."""

    def __init__(self, cutoff: float, half_width: float, kernel_size: int = FILTER_KERNEL_SIZE,
                 stride: int = 1) -> None:
        super().__init__()
        self.stride = int(stride)
        self.design = (float(cutoff), float(half_width))
        self.pad_left = kernel_size // 2 - (1 if kernel_size % 2 == 0 else 0)
        self.pad_right = kernel_size // 2
        self.register_buffer("filter", kaiser_sinc_filter(cutoff, half_width, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad_left, self.pad_right), mode="replicate")
        return F.conv1d(x, self.filter.expand(x.shape[1], -1, -1), stride=self.stride, groups=x.shape[1])


class Upsample1d(nn.Module):
    """``(B, C, T) -> (B, C, ratio * T)``: zero-stuffing transposed conv with the low-pass taps
    (gain ``ratio``), on a replicate-padded input whose padding is cropped off afterwards."""

    def __init__(self, ratio: int = RESAMPLE_RATIO, kernel_size: int = FILTER_KERNEL_SIZE) -> None:
        super().__init__()
        self.ratio = int(ratio)
        self.pad = kernel_size // ratio - 1
        self.crop_left = self.pad * ratio + (kernel_size - ratio) // 2
        self.crop_right = self.pad * ratio + (kernel_size - ratio + 1) // 2
        self.design = (CUTOFF / ratio, HALF_WIDTH / ratio)
        self.register_buffer("filter", kaiser_sinc_filter(*self.design, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        x = self.ratio * F.conv_transpose1d(x, self.filter.expand(x.shape[1], -1, -1), stride=self.ratio,
                                            groups=x.shape[1])
        return x[..., self.crop_left : x.shape[-1] - self.crop_right]


class Downsample1d(nn.Module):
    """``(B, C, ratio * T) -> (B, C, T)``: low-pass at ``0.5 / ratio``, keep every ``ratio``-th sample."""

    def __init__(self, ratio: int = RESAMPLE_RATIO, kernel_size: int = FILTER_KERNEL_SIZE) -> None:
        super().__init__()
        self.lowpass = LowPassFilter1d(CUTOFF / ratio, HALF_WIDTH / ratio, kernel_size, stride=ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowpass(x)


class Snake(nn.Module):
    """``x + 1/alpha * sin^2(alpha x)`` per channel of ``(B, C, T)``.

    Args:
        channels: number of channels ``C`` (one ``alpha`` each).
        logscale: store ``log(alpha)`` (initialised to 0) instead of ``alpha`` (initialised to 1).
    """

    def __init__(self, channels: int, logscale: bool = False) -> None:
        super().__init__()
        self.logscale = bool(logscale)
        self.alpha = nn.Parameter(self._init(channels))

    def _init(self, channels: int) -> torch.Tensor:
        return torch.zeros(channels) if self.logscale else torch.ones(channels)

    def _value(self, p: torch.Tensor) -> torch.Tensor:
        p = p[None, :, None]
        return p.exp() if self.logscale else p

    def _magnitude(self) -> torch.Tensor:
        return self._value(self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self._value(self.alpha)
        return x + (1.0 / (self._magnitude() + SNAKE_EPS)) * torch.sin(x * alpha).pow(2)


class SnakeBeta(Snake):
    """``x + 1/beta * sin^2(alpha x)``: Snake with a separate per-channel magnitude ``beta``
    (stored and initialised like ``alpha``)."""

    def __init__(self, channels: int, logscale: bool = False) -> None:
        super().__init__(channels, logscale)
        self.beta = nn.Parameter(self._init(channels))

    def _magnitude(self) -> torch.Tensor:
        return self._value(self.beta)


def snake_activation(name: str, channels: int, logscale: bool) -> Snake:
    """`Snake` (``"snake"``) or `SnakeBeta` (``"snakebeta"``) over ``channels`` channels."""
    if name == "snake":
        return Snake(channels, logscale)
    if name == "snakebeta":
        return SnakeBeta(channels, logscale)
    raise ValueError(f"unknown BigVGAN activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")


class AntiAliasActivation(nn.Module):
    """``act`` applied at ``ratio`` times the rate: `Upsample1d` -> ``act`` -> `Downsample1d`.

    Submodule names (``act``, ``upsample``, ``downsample``) follow BigVGAN's ``Activation1d``.
    """

    def __init__(self, act: nn.Module, ratio: int = RESAMPLE_RATIO, kernel_size: int = FILTER_KERNEL_SIZE) -> None:
        super().__init__()
        self.act = act
        self.upsample = Upsample1d(ratio, kernel_size)
        self.downsample = Downsample1d(ratio, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))


def filter_buffers(module: nn.Module) -> dict[str, nn.Module]:
    """``{state-dict key: owner}`` of every resampling filter buffer inside ``module``."""
    return {(f"{name}.filter" if name else "filter"): sub for name, sub in module.named_modules()
            if isinstance(sub, (Upsample1d, LowPassFilter1d))}


def check_filters(module: nn.Module, source: str, atol: float = 1e-6) -> None:
    """Raise `ValueError` naming the first key whose resampling taps differ from the design above
    (e.g. a checkpoint written with other cutoffs); the network assumes these filters."""
    for key, owner in filter_buffers(module).items():
        taps = owner.filter.detach().cpu().float()
        expected = kaiser_sinc_filter(*owner.design, taps.shape[-1])
        if not torch.allclose(taps, expected, rtol=0.0, atol=atol):
            diff = float((taps - expected).abs().max())
            raise ValueError(f"{source}: resampling filter {key!r} differs from BigVGAN's Kaiser-sinc design "
                             f"(max |difference| {diff:.3g}); the checkpoint was written with other filters")
