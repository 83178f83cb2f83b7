"""Rebuild a trained module from its self-describing checkpoint.

Checkpoints written through ``tta fit`` carry the resolved YAML config
(``checkpoint["tta"]["config"]``); `load_trained` instantiates the ``model`` section with the
same classes, loads the weights strictly and restores tta's counters and EMA.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch import nn

from tta.registry import load_builtin, load_plugins, resolve_config
from tta.utils.pipeline_folder import model_state, read_pipeline_meta
from tta.utils.weights import load_checkpoint, load_state_dict_strict


class CheckpointConfigError(KeyError):
    """The checkpoint does not record the config needed to rebuild its module."""

    def __str__(self) -> str:
        return str(self.args[0])


def build_network(config: dict[str, Any], base: type = nn.Module) -> Any:
    """Instantiate a ``{"class_path": ..., "init_args": ...}`` config of a ``base`` subclass
    (registry names resolved), through the same jsonargparse path as ``tta fit``."""
    from jsonargparse import ArgumentParser

    load_builtin()
    load_plugins()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, "component", required=True)
    cfg = parser.parse_object({"component": resolve_config(config)})
    return parser.instantiate_classes(cfg).component


def build_model(model_config: dict[str, Any]) -> L.LightningModule:
    """Instantiate a ``{"class_path": ..., "init_args": ...}`` model config (names resolved)."""
    return build_network(model_config, L.LightningModule)


def model_config(ckpt: Mapping[str, Any], source: str | os.PathLike) -> dict[str, Any]:
    """The ``model`` section of the run config stored in a loaded checkpoint (``checkpoint["tta"]["config"]``)."""
    text = ckpt.get("tta", {}).get("config")
    if text is None:
        raise CheckpointConfigError(
            f"{source} holds no run config (checkpoint['tta']['config']); it was not written by `tta fit`"
        )
    config = yaml.safe_load(text)
    if "model" not in config:
        raise CheckpointConfigError(f"{source}: the stored config has no 'model' section")
    return config["model"]


def load_trained(path: str | os.PathLike, use_ema: bool = False, map_location: str = "cpu") -> L.LightningModule:
    """The module saved in checkpoint ``path`` in eval mode (EMA weights with ``use_ema``)."""
    return trained_from_checkpoint(load_checkpoint(path, map_location=map_location), path, use_ema)


def load_trained_part(path: str | os.PathLike, attr: str, what: str,
                      use_ema: bool = False) -> tuple[L.LightningModule, Any]:
    """`load_trained` and the module's ``attr`` network (e.g. ``clap``); a TypeError names the
    module a checkpoint holds when it has no ``attr`` (``what``: the checkpoint kind expected)."""
    module = load_trained(path, use_ema=use_ema)
    part = getattr(module, attr, None)
    if part is None:
        raise TypeError(f"{path} is a {type(module).__name__} checkpoint, not a {what} one (no `{attr}`)")
    return module, part


def trained_from_checkpoint(ckpt: Mapping[str, Any], source: str | os.PathLike,
                            use_ema: bool = False) -> L.LightningModule:
    """`load_trained` for a checkpoint already read (``source`` names it in errors)."""
    model = build_model(model_config(ckpt, source))
    load_state_dict_strict(model, ckpt["state_dict"], source=str(source))
    model.on_load_checkpoint(ckpt)
    if use_ema:
        ema = getattr(model, "ema", None)
        if ema is None:
            raise CheckpointConfigError(f"{source} holds no EMA weights (trained with ema_decay=None)")
        ema.copy_to(model.ema_target())
    return model.eval()


def trained_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The module state dict held by a ``tta fit`` checkpoint, or by a pipeline folder (every
    model component; e.g. to initialise a model from an imported public one)."""
    if Path(path).is_dir():
        return model_state(path, read_pipeline_meta(path))
    return load_checkpoint(path)["state_dict"]
