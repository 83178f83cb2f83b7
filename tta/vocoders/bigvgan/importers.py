"""Import NVIDIA's published BigVGAN generators into `BigVGANGenerator`.

Layout (NVIDIA/BigVGAN v2.4, ``BigVGAN._save_pretrained``; the same for v1 and v2 releases): a
folder with

* ``config.json``: the training hyper-parameters (architecture, mel and training keys);
* ``bigvgan_generator.pt``: ``{"generator": state_dict}`` with old-style weight-norm keys
  (``conv_pre.weight_g`` / ``weight_v``, ``ups.N.0.*``, ``resblocks.N.convs1.M.*``,
  ``resblocks.N.activations.K.act.alpha`` / ``beta``, the persistent resampling filters
  ``resblocks.N.activations.K.upsample.filter`` / ``downsample.lowpass.filter``,
  ``activation_post.*``, ``conv_post.*``).

The weight-norm keys are renamed with HiFi-GAN's helpers (`original_to_tta_state_dict`); the file
is read with `tta.utils.weights.load_checkpoint` (``weights_only=True``) and loaded with
`load_state_dict_strict`; the resampling filters must equal tta's Kaiser-sinc design
(`tta.vocoders.bigvgan.activations.check_filters`). The mel keys of ``config.json``
(``sampling_rate``, ``n_fft``, ``hop_size``, ``win_size``, ``num_mels``, ``fmin``, ``fmax``) set the
generator's `MelConfig`; given a ``mel_config`` to compose with, any difference is refused by name.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from tta.data.mel import MelConfig, MelMismatchError
from tta.utils.weights import load_checkpoint, load_state_dict_strict
from tta.vocoders.base import resolve_mel_config
from tta.vocoders.bigvgan.activations import check_filters
from tta.vocoders.bigvgan.generator import BigVGANGenerator
from tta.vocoders.hifigan.importers import (
    VocoderWeightsNotFoundError,
    mel_config_from_original,
    original_to_tta_state_dict,
    read_json_config,
    uses_weight_norm,
)

log = logging.getLogger(__name__)

GENERATOR_FILE = "bigvgan_generator.pt"
CONFIG_FILE = "config.json"
# config.json key -> MelConfig field, for the error messages.
MEL_KEYS = {"sampling_rate": "sample_rate", "n_fft": "n_fft", "hop_size": "hop_length", "win_size": "win_length",
            "num_mels": "n_mels", "fmin": "f_min", "fmax": "f_max"}


def mel_config_from_bigvgan(config: Mapping[str, object], source: str, name: str = "bigvgan") -> MelConfig:
    """The `MelConfig` of a BigVGAN ``config.json`` (BigVGAN's mel is tta's ``stft`` kind, log floor
    1e-5); ``fmax: null`` means Nyquist and becomes ``sampling_rate / 2``. Raises `ValueError`
    naming the missing keys."""
    missing = [k for k in MEL_KEYS if k not in config]
    if missing:
        raise ValueError(f"{source}: missing mel keys {missing} (BigVGAN configs give {list(MEL_KEYS)})")
    try:
        cfg = mel_config_from_original(config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: invalid mel keys: {exc}") from exc
    f_max = cfg.sample_rate / 2 if cfg.f_max is None else cfg.f_max
    return dataclasses.replace(cfg, f_max=f_max, name=name)


def check_mel_matches(found: MelConfig, wanted: MelConfig, source: str) -> None:
    """Raise `MelMismatchError` naming every ``config.json`` key that differs from ``wanted``."""
    diffs = []
    for key, field in MEL_KEYS.items():
        a, b = getattr(found, field), getattr(wanted, field)
        if a != b:
            diffs.append(f"{key} {a!r} != {b!r} ({wanted.name}.{field})")
    if found.kind != wanted.kind or found.log_floor != wanted.log_floor:
        diffs.append(f"mel kind/log floor {found.kind}/{found.log_floor} != {wanted.kind}/{wanted.log_floor} "
                     f"({wanted.name})")
    if diffs:
        raise MelMismatchError(f"{source}: the BigVGAN vocoder was trained on other mels than {wanted.name!r}: "
                               + "; ".join(diffs))


def _generator_state(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(path, map_location=map_location)
    if not isinstance(ckpt, Mapping) or "generator" not in ckpt or not isinstance(ckpt["generator"], Mapping):
        keys = sorted(map(str, ckpt))[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(f"{path}: expected {{'generator': state_dict}} (NVIDIA's BigVGAN layout), got {keys}")
    return original_to_tta_state_dict(ckpt["generator"])


def load_bigvgan(
    folder: str | os.PathLike,
    mel_config: MelConfig | str | dict | None = None,
    inference: bool = True,
    map_location: str | torch.device = "cpu",
) -> BigVGANGenerator:
    """Load a BigVGAN folder (``config.json`` + ``bigvgan_generator.pt``).

    Args:
        folder: the folder in NVIDIA's published layout.
        mel_config: the mels the vocoder will be composed with (a `MelConfig`, preset name or
            dict); a difference in any mel key of ``config.json`` raises `MelMismatchError`.
            ``None``: the generator carries the config's mels, unchecked.
        inference: fold weight norm (default); ``False`` keeps it for fine-tuning.
        map_location: device the weights are read to.

    Returns the generator in eval mode with ``mel_config`` set.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VocoderWeightsNotFoundError(f"BigVGAN folder not found: {folder}")
    config_path, weights_path = folder / CONFIG_FILE, folder / GENERATOR_FILE
    if not weights_path.is_file():
        present = ", ".join(sorted(p.name for p in folder.iterdir())) or "(empty)"
        raise VocoderWeightsNotFoundError(f"no {GENERATOR_FILE} in {folder}; found: {present}")
    config = read_json_config(config_path)
    found = mel_config_from_bigvgan(config, str(config_path), name=f"bigvgan:{folder.name}")
    wanted = resolve_mel_config(mel_config)
    if wanted is not None:
        check_mel_matches(found, wanted, str(config_path))
        found = wanted
    state = _generator_state(weights_path, map_location)
    try:
        generator = BigVGANGenerator.from_config_dict(config, use_weight_norm=uses_weight_norm(state, str(weights_path)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_path}: {exc}") from exc
    if generator.hop_length != found.hop_length:
        raise ValueError(f"{config_path}: hop_size {found.hop_length} != product of upsample_rates "
                         f"{generator.config['upsample_rates']} = {generator.hop_length}")
    generator.set_mel_config(found)
    source = f"{weights_path} (config {config_path})"
    load_state_dict_strict(generator, state, source=source)
    check_filters(generator, source)
    if inference:
        generator.remove_weight_norm()
    else:
        generator.apply_weight_norm()
    log.info("loaded BigVGAN generator from %s (hop %d, %d mels)", weights_path, generator.hop_length,
             generator.n_mels)
    return generator.eval()
