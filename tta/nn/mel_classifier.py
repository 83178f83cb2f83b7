"""`MelClassifierNet` (registered network ``mel_classifier_net``): a VGG-style 2-D CNN on log-mels.

The stand-in for the "Melception" classifier of SpecVQGAN / "Diverse and Vivid Sound Generation":
trained by tta on any labelled manifest (`tta.encoders.mel_classifier`), it gives

- ``forward(mel) -> logits (B, num_classes)`` (sigmoid multi-label or softmax single-label: the
  training module's loss decides);
- ``features(mel) -> [(B, C_s, n_mels / 2^s, frames / 2^s)]``: one feature map per stage, the
  multi-scale features of the VQGAN's perceptual loss (`MelClassifierFeatures`);
- ``embedding(mel) -> (B, channels[-1])``: the pooled pre-logit features (spectrogram FID).

Layout::

    log-mel (B, n_mels, F) -> BatchNorm over mel bins (per-bin standardisation, PANNs' bn0)
      -> stage 0: convs_per_stage x [conv3x3 - BN - ReLU]               -> feature 0
      -> stage s > 0: avgpool 2x2 (ceil), convs_per_stage x [...]       -> feature s
      -> mean over frequency, then mean + max over time                 -> embedding
      -> dropout -> linear                                              -> logits

Inputs are natural-log mels as `tta.data.mel.MelFrontend` returns them, ``(B, n_mels, frames)`` or
``(B, 1, n_mels, frames)``; any number of frames (pooling rounds up, global pooling at the end).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tta.registry import register

__all__ = ["MelClassifierFeatures", "MelClassifierNet"]


def _stage(c_in: int, c_out: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]  # fmt: skip
    return nn.Sequential(*layers)


@register("network", "mel_classifier_net")
class MelClassifierNet(nn.Module):
    """VGG-style mel classifier (see the module docstring).

    Args:
        n_mels: mel bins of the input (the mel preset's).
        num_classes: size of the label vocabulary.
        channels: output channels of each stage; ``len(channels)`` stages, each but the first
            after a 2x2 average pooling.
        convs_per_stage: 3x3 conv - BN - ReLU blocks per stage.
        dropout: before the linear head.
    """

    def __init__(self, n_mels: int = 80, num_classes: int = 527, channels: Sequence[int] = (64, 128, 256, 512),
                 convs_per_stage: int = 2, dropout: float = 0.2) -> None:  # fmt: skip
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if n_mels < 1 or num_classes < 1 or not channels or min(channels) < 1 or convs_per_stage < 1:
            raise ValueError(f"MelClassifierNet: n_mels ({n_mels}), num_classes ({num_classes}), channels "
                             f"({channels}) and convs_per_stage ({convs_per_stage}) must be positive")  # fmt: skip
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MelClassifierNet: dropout must be in [0, 1), got {dropout}")
        self.n_mels, self.num_classes, self.channels = int(n_mels), int(num_classes), channels
        self.dim = channels[-1]
        self.input_norm = nn.BatchNorm1d(self.n_mels)
        self.stages = nn.ModuleList(
            _stage(1 if i == 0 else channels[i - 1], c, convs_per_stage) for i, c in enumerate(channels)
        )
        self.pool = nn.AvgPool2d(2, ceil_mode=True)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.dim, self.num_classes)

    def _prepare(self, mel: torch.Tensor) -> torch.Tensor:
        """``(B, n_mels, F)`` or ``(B, 1, n_mels, F)`` -> normalised ``(B, 1, n_mels, F)``."""
        if mel.dim() == 4 and mel.shape[1] == 1:
            mel = mel[:, 0]
        if mel.dim() != 3 or mel.shape[1] != self.n_mels:
            raise ValueError(f"MelClassifierNet: expected log-mels (B, {self.n_mels}, frames) or "
                             f"(B, 1, {self.n_mels}, frames), got {tuple(mel.shape)}")  # fmt: skip
        return self.input_norm(mel.float()).unsqueeze(1)

    def features(self, mel: torch.Tensor) -> list[torch.Tensor]:
        """One feature map per stage, ``(B, channels[s], ceil(n_mels / 2^s), ceil(F / 2^s))``."""
        h, out = self._prepare(mel), []
        for i, stage in enumerate(self.stages):
            h = stage(self.pool(h) if i else h)
            out.append(h)
        return out

    @staticmethod
    def pool_features(last: torch.Tensor) -> torch.Tensor:
        """Last feature map ``(B, C, H, W)`` -> ``(B, C)``: mean over frequency, then mean + max over time."""
        h = last.mean(dim=2)
        return h.mean(dim=2) + h.amax(dim=2)

    def embedding(self, mel: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features ``(B, dim)``."""
        return self.pool_features(self.features(mel)[-1])

    def classify_embedding(self, emb: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of pooled features."""
        return self.head(self.dropout(emb))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.classify_embedding(self.embedding(mel))


class MelClassifierFeatures(nn.Module):
    """The multi-scale ``features`` of a (frozen) `MelClassifierNet` as ``forward``: the form the
    VQGAN's ``perceptual`` network takes, mels ``(B, 1, n_mels, frames)`` -> list of feature maps."""

    def __init__(self, net: MelClassifierNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, mel: torch.Tensor) -> list[torch.Tensor]:
        return self.net.features(mel)
