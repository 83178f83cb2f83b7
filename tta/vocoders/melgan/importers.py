"""Import official MelGAN generators (descriptinc/melgan-neurips) into `MelGANGenerator`.

Upstream layout: a run folder with ``best_netG.pt`` / ``netG.pt`` (``torch.save`` of the
generator's state dict) and ``args.yml`` (``yaml.dump`` of the training script's
``argparse.Namespace``; ``n_mel_channels``, ``ngf``, ``n_residual_layers`` describe the
generator). The generator is one ``nn.Sequential`` called ``model``, so keys are indices:
``model.1`` the first conv; per stage ``i`` (``s = 2 + i * (2 + n_residual_layers)``)
``model.{s+1}`` the transposed conv and ``model.{s+2+j}.block.2`` / ``.block.4`` / ``.shortcut``
residual unit ``j``; the last conv after the stages. Convs carry ``weight_g`` / ``weight_v`` (old
``torch.nn.utils.weight_norm``). Upstream fixes ``ratios = [8, 8, 2, 2]`` and computes log10 mels
at 22.05 kHz (n_fft 1024, hop 256, 80 mels, 0 Hz to Nyquist): `OFFICIAL_MEL`, with
``log10_input=True`` so that tta's natural-log mels are converted.

Weights are read by `tta.utils.weights.load_checkpoint` and loaded with `load_state_dict_strict`;
``args.yml`` is read with a safe YAML loader (Python tags become plain data, never objects).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from tta.data.mel import MelConfig
from tta.utils.weights import load_checkpoint, load_state_dict_strict
from tta.vocoders.base import resolve_mel_config
from tta.vocoders.hifigan.importers import VocoderWeightsNotFoundError, locate_checkpoint, original_to_tta_state_dict
from tta.vocoders.melgan.generator import MelGANGenerator

log = logging.getLogger(__name__)

OFFICIAL_RATIOS = (8, 8, 2, 2)
OFFICIAL_DEFAULTS = {"n_mel_channels": 80, "ngf": 32, "n_residual_layers": 3}  # upstream argparse defaults
OFFICIAL_MEL = MelConfig(name="melgan_official", sample_rate=22050, n_fft=1024, win_length=1024, hop_length=256,
                         n_mels=80, f_min=0.0, f_max=None, log_floor=1e-5)
GENERATOR_FILES = ("best_netG.pt", "netG.pt")
_ARGS_TO_OURS = {"n_mel_channels": "n_mels", "ngf": "ngf", "n_residual_layers": "n_residual_layers"}
_UNIT_LAYERS = {"block.2": "conv_dilated", "block.4": "conv_out", "shortcut": "shortcut"}


class _ArgsLoader(yaml.SafeLoader):
    """Safe loader for ``yaml.dump(argparse.Namespace)``: ``!!python/...`` tags read as plain data."""


def _python_tag_as_data(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_ArgsLoader.add_multi_constructor("tag:yaml.org,2002:python/", _python_tag_as_data)


def read_official_args(path: str | os.PathLike) -> dict[str, Any]:
    """The training arguments stored in an upstream ``args.yml``, as a plain dict."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_ArgsLoader)  # a SafeLoader subclass: no objects built
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not readable as MelGAN args.yml: {exc}") from exc
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected a mapping of training arguments, got {type(data).__name__}")
    return data


def official_key_map(ratios: Sequence[int], n_residual_layers: int) -> dict[str, str]:
    """``{official module prefix: tta module prefix}`` for the generator's weighted layers."""
    mapping = {"model.1": "conv_pre"}
    stage = 2 + n_residual_layers  # LeakyReLU, transposed conv, residual units
    for i in range(len(ratios)):
        start = 2 + i * stage
        mapping[f"model.{start + 1}"] = f"ups.{i}"
        for j in range(n_residual_layers):
            for theirs, ours in _UNIT_LAYERS.items():
                mapping[f"model.{start + 2 + j}.{theirs}"] = f"res_stacks.{i}.{j}.{ours}"
    mapping[f"model.{2 + len(ratios) * stage + 2}"] = "conv_post"  # after LeakyReLU, ReflectionPad1d
    return mapping


def official_to_tta_state_dict(state: Mapping[str, torch.Tensor], ratios: Sequence[int] = OFFICIAL_RATIOS,
                               n_residual_layers: int = 3) -> dict[str, torch.Tensor]:
    """Rename an upstream generator state dict to `MelGANGenerator` names (``weight_g`` / ``weight_v``
    to weight-norm parametrisations). Keys outside the layout are kept, so a strict load names them."""
    mapping = official_key_map(ratios, n_residual_layers)
    out = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        out[f"{mapping.get(prefix, prefix)}.{leaf}" if prefix else key] = value
    return original_to_tta_state_dict(out)


def _find_generator_file(folder: Path) -> Path:
    for name in GENERATOR_FILES:
        if (folder / name).is_file():
            return folder / name
    raise VocoderWeightsNotFoundError(
        f"no MelGAN generator checkpoint ({' or '.join(GENERATOR_FILES)}) in {folder}; "
        f"found: {', '.join(sorted(p.name for p in folder.iterdir())) or '(empty)'}"
    )


def _architecture(args_path: Path, given: dict[str, int | None]) -> dict[str, int]:
    """``n_mels`` / ``ngf`` / ``n_residual_layers`` from ``args.yml`` (when present), the caller, or
    the upstream defaults; a ValueError when the caller contradicts the file."""
    args = read_official_args(args_path) if args_path.is_file() else {}
    if not args:
        log.info("%s not found: using the upstream generator defaults %s unless given", args_path, OFFICIAL_DEFAULTS)
    arch = {}
    for theirs, ours in _ARGS_TO_OURS.items():
        from_file = args.get(theirs)
        if from_file is not None and not isinstance(from_file, int):
            raise TypeError(f"{args_path}: {theirs} must be an integer, got {from_file!r}")
        if from_file is not None and given[ours] is not None and given[ours] != from_file:
            raise ValueError(f"{args_path}: {theirs} is {from_file}, but {ours}={given[ours]} was given")
        value = from_file if from_file is not None else given[ours]
        arch[ours] = int(OFFICIAL_DEFAULTS[theirs] if value is None else value)
    return arch


def load_melgan(
    path: str | os.PathLike,
    mel_config: MelConfig | str | dict | None = OFFICIAL_MEL,
    log10_input: bool = True,
    n_mels: int | None = None,
    ngf: int | None = None,
    n_residual_layers: int | None = None,
    inference: bool = True,
    map_location: str | torch.device = "cpu",
) -> MelGANGenerator:
    """Load an upstream MelGAN generator: a run folder (``best_netG.pt``, else ``netG.pt``) or a
    checkpoint file, with ``args.yml`` beside it when present.

    Args:
        path: the folder or the ``*.pt`` file.
        mel_config: the mels the checkpoint was trained on (default: upstream's `OFFICIAL_MEL`).
        log10_input: the checkpoint expects log10 mels (upstream's ``Audio2Mel``).
        n_mels, ngf, n_residual_layers: the architecture when ``args.yml`` is absent (default:
            upstream's 80, 32, 3); when given with ``args.yml`` they must agree with it.
        inference: fold weight norm (the default); ``False`` keeps it for fine-tuning.
        map_location: device of the loaded tensors.

    Returns:
        the generator in eval mode.
    """
    folder, ckpt_path = locate_checkpoint(path, _find_generator_file, "MelGAN checkpoint or run folder")
    args_path = folder / "args.yml"
    arch = _architecture(args_path, {"n_mels": n_mels, "ngf": ngf, "n_residual_layers": n_residual_layers})
    state = load_checkpoint(ckpt_path, map_location=map_location)
    if not isinstance(state, Mapping):
        raise TypeError(f"{ckpt_path}: expected an upstream MelGAN generator state dict, got {type(state).__name__}")
    if not any(str(k).startswith("model.") for k in state):
        raise ValueError(f"{ckpt_path}: expected an upstream MelGAN generator state dict (model.N.* keys), "
                         f"got keys {list(state)[:5]}")
    generator = MelGANGenerator(**arch, ratios=OFFICIAL_RATIOS, log10_input=log10_input, use_weight_norm=True)
    try:
        generator.set_mel_config(resolve_mel_config(mel_config))
    except ValueError as exc:
        raise ValueError(f"{ckpt_path}: {exc}") from exc
    state = official_to_tta_state_dict(state, OFFICIAL_RATIOS, arch["n_residual_layers"])
    load_state_dict_strict(generator, state, source=f"{ckpt_path} (args {args_path})")
    if inference:
        generator.remove_weight_norm()
    log.info("loaded MelGAN generator from %s (%s)", ckpt_path, arch)
    return generator.eval()
