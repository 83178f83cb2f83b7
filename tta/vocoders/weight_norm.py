"""Weight norm over a vocoder generator's convolutions (HiFi-GAN, BigVGAN, MelGAN).

Generators list the convolutions that carry it (`_convs`, ``conv_pre`` first); the mixin applies
``torch.nn.utils.parametrizations.weight_norm`` to them (state keys
``<layer>.parametrizations.weight.original0`` = g, ``original1`` = v) and folds it back into plain
weights for inference, leaving the output unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["WeightNormConvs"]


class WeightNormConvs:
    """Mixin for `nn.Module` generators: ``has_weight_norm``, ``apply_weight_norm()``, ``remove_weight_norm()``,
    and ``init_args()`` from the generator's ``config`` (its architecture) and ``mel_config``."""

    config: dict[str, Any]

    def _convs(self) -> list[nn.Module]:
        """The weight-normalised convolutions, ``conv_pre`` first."""
        raise NotImplementedError(f"{type(self).__name__} must list its weight-normalised convolutions in _convs()")

    @property
    def has_weight_norm(self) -> bool:
        """Whether the convolutions are weight-norm parametrised."""
        return parametrize.is_parametrized(self._convs()[0], "weight")

    def apply_weight_norm(self) -> None:
        """Parametrise every conv with weight norm (no-op for layers that already have it)."""
        for layer in self._convs():
            if not parametrize.is_parametrized(layer, "weight"):
                weight_norm(layer)

    def remove_weight_norm(self) -> None:
        """Fold weight norm into plain weights (for inference); the output is unchanged."""
        for layer in self._convs():
            if parametrize.is_parametrized(layer, "weight"):
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)

    def init_args(self) -> dict[str, Any]:
        """The architecture, the current weight-norm state and the mel front-end."""
        mel_config = getattr(self, "mel_config", None)
        mel = mel_config.to_dict() if mel_config is not None else None
        return {**self.config, "use_weight_norm": self.has_weight_norm, "mel_config": mel}
