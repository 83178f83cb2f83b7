"""MelGAN generator (Kumar et al., 2019) for any hop length.

log-mel ``(B, n_mels, frames)`` -> reflection pad + conv k7 (``ngf * 2**len(ratios)`` channels)
-> per upsampling ratio ``r``: LeakyReLU(0.2) + transposed conv (kernel ``2r``, stride ``r``,
padding ``r // 2 + r % 2``, output padding ``r % 2``: exactly ``r`` samples per input sample,
channels halved) + a residual stack of units with dilations ``1, 3, 9, ...`` -> LeakyReLU
-> reflection pad + conv k7 to one channel -> tanh. ``hop = prod(ratios)``; the official code
fixes ``ratios = [8, 8, 2, 2]`` (hop 256).

Every conv is weight-normalised with ``torch.nn.utils.parametrizations.weight_norm`` (keys
``<layer>.parametrizations.weight.original0`` = g and ``original1`` = v); call
`MelGANGenerator.remove_weight_norm` to fold it for inference. The official checkpoint layout
(an ``nn.Sequential`` called ``model``) maps onto these names in `tta.vocoders.melgan.importers`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tta.data.mel import MelConfig
from tta.registry import register
from tta.vocoders.base import Vocoder
from tta.vocoders.weight_norm import WeightNormConvs

LRELU_SLOPE = 0.2
EDGE_KERNEL = 7  # conv_pre / conv_post kernel (reflection-padded by 3)
RESIDUAL_DILATION_BASE = 3  # dilations 1, 3, 9, ... of a residual stack


class ResidualUnit(nn.Module):
    """``shortcut(x) + conv_out(lrelu(conv_dilated(reflect_pad(lrelu(x)))))`` at a fixed width.

    ``conv_dilated`` is a k3 conv with the given dilation, ``conv_out`` and ``shortcut`` are 1x1
    convs (the official code has a learned 1x1 shortcut, not an identity).
    """

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.dilation = dilation
        self.conv_dilated = nn.Conv1d(channels, channels, kernel_size=3, dilation=dilation)
        self.conv_out = nn.Conv1d(channels, channels, kernel_size=1)
        self.shortcut = nn.Conv1d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pad(F.leaky_relu(x, LRELU_SLOPE), (self.dilation, self.dilation), mode="reflect")
        y = self.conv_out(F.leaky_relu(self.conv_dilated(y), LRELU_SLOPE))
        return self.shortcut(x) + y


@register("vocoder", "melgan_generator")
class MelGANGenerator(WeightNormConvs, Vocoder):
    """MelGAN generator: log-mel ``(B, n_mels, frames)`` -> waveform ``(B, frames * hop)`` in ``[-1, 1]``.

    Args:
        n_mels: mel bins of the input (``n_mel_channels`` upstream).
        ratios: stride of each transposed conv, each ``>= 2``; ``hop = prod(ratios)``.
        ngf: channels of the last stage; the first conv has ``ngf * 2**len(ratios)``.
        n_residual_layers: residual units per stage (dilations ``3**j``).
        log10_input: the network expects ``log10`` mels (the official MelGAN front-end); tta's
            natural-log mels are converted by ``1 / ln(10)`` first. Set by the importer.
        use_weight_norm: weight-normalise every conv (training); see `remove_weight_norm`.
        mel_config: the mel front-end (a `MelConfig`, preset name or dict), when known.
    """

    def __init__(
        self,
        n_mels: int = 80,
        ratios: Sequence[int] = (8, 8, 2, 2),
        ngf: int = 32,
        n_residual_layers: int = 3,
        log10_input: bool = False,
        use_weight_norm: bool = True,
        mel_config: MelConfig | str | dict | None = None,
    ) -> None:
        ratios = [int(r) for r in ratios]
        if not ratios or any(r < 2 for r in ratios):
            raise ValueError(f"MelGANGenerator: ratios must be a non-empty list of integers >= 2, got {ratios}")
        if int(n_mels) <= 0 or int(ngf) <= 0 or int(n_residual_layers) < 0:
            raise ValueError(f"MelGANGenerator: n_mels ({n_mels}) and ngf ({ngf}) must be positive and "
                             f"n_residual_layers ({n_residual_layers}) >= 0")
        super().__init__(hop_length=math.prod(ratios), n_mels=int(n_mels))
        self.config: dict[str, Any] = {"n_mels": int(n_mels), "ratios": ratios, "ngf": int(ngf),
                                       "n_residual_layers": int(n_residual_layers), "log10_input": bool(log10_input)}
        channels = int(ngf) * 2 ** len(ratios)
        self.conv_pre = nn.Conv1d(int(n_mels), channels, EDGE_KERNEL)
        self.ups = nn.ModuleList()
        self.res_stacks = nn.ModuleList()
        for r in ratios:
            self.ups.append(nn.ConvTranspose1d(channels, channels // 2, kernel_size=2 * r, stride=r,
                                               padding=r // 2 + r % 2, output_padding=r % 2))
            channels //= 2
            self.res_stacks.append(nn.ModuleList(
                ResidualUnit(channels, RESIDUAL_DILATION_BASE**j) for j in range(int(n_residual_layers))
            ))
        self.conv_post = nn.Conv1d(channels, 1, EDGE_KERNEL)
        self.min_frames = self._min_frames(ratios, int(n_residual_layers))
        if use_weight_norm:
            self.apply_weight_norm()
        self.set_mel_config(mel_config)

    @staticmethod
    def _min_frames(ratios: Sequence[int], n_residual_layers: int) -> int:
        """Fewest input frames every reflection pad accepts (pad < length)."""
        need = EDGE_KERNEL // 2 + 1
        if n_residual_layers:
            widest = RESIDUAL_DILATION_BASE ** (n_residual_layers - 1)
            for upsampled in (math.prod(ratios[: i + 1]) for i in range(len(ratios))):
                need = max(need, -(-(widest + 1) // upsampled))
        return need

    def _convs(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]

    def init_args(self) -> dict[str, Any]:
        """`WeightNormConvs.init_args` with ``ratios`` as a list (JSON)."""
        return {**super().init_args(), "ratios": list(self.config["ratios"])}

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """``mel (B, n_mels, frames)`` -> ``wav (B, frames * hop_length)`` in ``[-1, 1]``."""
        self.check_mel(mel)
        frames = mel.shape[-1]
        if frames < self.min_frames:
            raise ValueError(f"MelGANGenerator needs at least {self.min_frames} mel frames (its reflection pads), "
                             f"got {frames}")
        x = mel / math.log(10.0) if self.config["log10_input"] else mel
        pad = EDGE_KERNEL // 2
        x = self.conv_pre(F.pad(x, (pad, pad), mode="reflect"))
        for up, stack in zip(self.ups, self.res_stacks):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            for unit in stack:
                x = unit(x)
        x = F.pad(F.leaky_relu(x, LRELU_SLOPE), (pad, pad), mode="reflect")
        wav = torch.tanh(self.conv_post(x))[:, 0]
        if wav.shape[-1] != frames * self.hop_length:  # cannot happen with these paddings; guards edits
            raise RuntimeError(f"MelGANGenerator produced {wav.shape[-1]} samples for {frames} frames "
                               f"(expected {frames * self.hop_length})")
        return wav
