"""Reading pipeline folders: ``pipeline.json`` (format checked, relative paths resolved) and the
components' safetensors files. Shared by the pipelines, which write the folders, and by the
training modules that start from one (``init_from``), so neither imports the other."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "PIPELINE_FILE", "VOCODER", "component_state", "model_state", "read_pipeline_meta",
           "resolve_relative_paths"]

FORMAT = "tta-pipeline/1"
PIPELINE_FILE = "pipeline.json"
VOCODER = "vocoder"  #: the component file of the vocoder; every other one holds model weights


def resolve_relative_paths(meta: dict[str, Any], folder: Path, source: Path | str) -> None:
    """Make the entries named in ``meta["relative_paths"]`` absolute, in place.

    Each entry is a ``/``-separated key path into ``meta`` (e.g.
    ``model/init_args/clap/init_args/text_encoder/init_args/path``) whose value is a path
    relative to the pipeline folder (files an importer copied into it).
    """
    for pointer in meta.get("relative_paths") or ():
        *parents, last = str(pointer).split("/")
        node: Any = meta
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get(last), str):
            raise KeyError(f"{source}: relative_paths entry {pointer!r} does not name a path string in the file")
        node[last] = str(folder / node[last])


def read_pipeline_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """``pipeline.json`` of a pipeline folder (format checked, relative paths resolved)."""
    folder = Path(folder)
    meta_path = folder / PIPELINE_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is neither a checkpoint nor a pipeline folder (no {PIPELINE_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    resolve_relative_paths(meta, folder, meta_path)
    return meta


def component_state(folder: str | os.PathLike, meta: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    """The state dict of component ``name`` (``unet``, ``vae``, ...) of a pipeline folder."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / meta["files"][name]))


def model_state(folder: str | os.PathLike, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's full state dict: every component of a pipeline folder but the vocoder."""
    state: dict[str, torch.Tensor] = {}
    for name in meta["files"]:
        if name != VOCODER:
            state.update(component_state(folder, meta, name))
    return state
