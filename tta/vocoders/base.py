"""The interface shared by every vocoder of tta.

A vocoder turns a log-mel spectrogram ``(B, n_mels, frames)`` (as produced by
`tta.data.mel.MelFrontend`) into a waveform ``(B, frames * hop_length)``. It carries the
`MelConfig` it expects when that is known, so that a pipeline can refuse to compose it with a
generator trained on different mels (`MelConfig.check_compatible`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from tta.data.mel import MelConfig


def resolve_mel_config(mel_config: MelConfig | str | dict | None) -> MelConfig | None:
    """Accept a `MelConfig`, a preset name, a dict of fields, or ``None``."""
    if mel_config is None or isinstance(mel_config, MelConfig):
        return mel_config
    if isinstance(mel_config, str):
        return MelConfig.preset(mel_config)
    if isinstance(mel_config, dict):
        return MelConfig.from_dict(mel_config)
    raise TypeError(f"mel_config must be a MelConfig, a preset name or a dict, got {type(mel_config).__name__}")


class Vocoder(nn.Module):
    """Base class: ``forward(mel (B, n_mels, frames)) -> wav (B, frames * hop_length)``.

    Attributes:
        hop_length: samples per mel frame.
        n_mels: number of mel bins expected on input.
        mel_config: the mel front-end the vocoder was trained on, or ``None`` when unknown.
        needs_weights: whether it must be trained (or imported) before use. Registered vocoders
            with ``needs_weights = False`` are built by name from a mel config alone
            (``cls(mel_config=...)``, `tta.training.vocoding.resolve_vocoder`).
        config_class: the class a stored config names (`tta.vocoders.factory.vocoder_config`), when
            not the vocoder's own: a subclass that only fetches weights (``UniversalHiFiGAN``)
            describes itself as its plain parent, so that a pipeline folder rebuilds it without
            the weights' source. ``None``: the class itself.
    """

    needs_weights: ClassVar[bool] = True
    config_class: ClassVar[type[Vocoder] | None] = None
    hop_length: int
    n_mels: int
    mel_config: MelConfig | None

    def __init__(self, hop_length: int, n_mels: int, mel_config: MelConfig | None = None) -> None:
        super().__init__()
        self.hop_length = int(hop_length)
        self.n_mels = int(n_mels)
        self.mel_config = None
        self.set_mel_config(mel_config)

    @property
    def sample_rate(self) -> int | None:
        """Output sample rate, when the mel config is known."""
        return None if self.mel_config is None else self.mel_config.sample_rate

    def set_mel_config(self, mel_config: MelConfig | str | dict | None) -> None:
        """Attach the mel front-end; raises if its hop or mel count contradicts the network."""
        cfg = resolve_mel_config(mel_config)
        if cfg is not None:
            if cfg.hop_length != self.hop_length:
                raise ValueError(
                    f"{type(self).__name__}: mel config {cfg.name!r} has hop_length {cfg.hop_length}, "
                    f"but the vocoder produces {self.hop_length} samples per frame"
                )
            if cfg.n_mels != self.n_mels:
                raise ValueError(
                    f"{type(self).__name__}: mel config {cfg.name!r} has n_mels {cfg.n_mels}, "
                    f"but the vocoder expects {self.n_mels} mel bins"
                )
        self.mel_config = cfg

    def check_mel(self, mel: torch.Tensor) -> None:
        """Raise a readable error unless ``mel`` is ``(B, n_mels, frames)``."""
        if mel.dim() != 3 or mel.shape[1] != self.n_mels:
            raise ValueError(
                f"{type(self).__name__} expects a log-mel of shape (B, {self.n_mels}, frames), "
                f"got {tuple(mel.shape)}"
            )

    def init_args(self) -> dict[str, Any]:
        """Constructor arguments rebuilding this vocoder (JSON-serialisable): pipeline folders store
        ``{"class_path": ..., "init_args": init_args()}`` next to the weights."""
        raise NotImplementedError(
            f"{type(self).__name__} does not describe its constructor arguments; implement init_args() "
            "so that pipeline folders can store it"
        )

    def forward(self, mel: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Vocode ``mel (B, n_mels, frames)`` into ``wav (B, frames * hop_length)``."""
        raise NotImplementedError


def config_init_args(cls: type, config: Mapping[str, Any], renames: Mapping[str, str], ignored: frozenset[str],
                     what: str, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Constructor arguments of ``cls`` from a published ``config.json`` dict: keys renamed by
    ``renames`` (e.g. ``num_mels`` -> ``n_mels``), ``ignored`` (training / data keys) skipped; a key
    naming no argument (``exclude`` ones included) raises `ValueError`, since it may change the
    network, as does one argument given under two names."""
    arg_names = set(inspect.signature(cls.__init__).parameters) - {"self"} - set(exclude)
    args: dict[str, Any] = {}
    unknown = []
    for key, value in config.items():
        if key in ignored:
            continue
        name = renames.get(key, key)
        if name not in arg_names:
            unknown.append(key)
        elif name in args:
            raise ValueError(f"{what} config gives {name!r} twice (under two names)")
        else:
            args[name] = value
    if unknown:
        known = sorted((arg_names - set(renames.values())) | set(renames))
        raise ValueError(f"{what} config has unknown architecture keys {sorted(unknown)}; known keys: {known} "
                         f"(ignored: training, data and discriminator keys)")
    return args
