"""Safe loading and saving of weights and checkpoints.

Weights load from ``*.safetensors`` or through ``torch.load(weights_only=True)``. A pickle that
would execute code on load is refused with `UnsafeCheckpointError` naming the file. Saves are
atomic: written to a temporary file in the target directory, then renamed over the target.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tta.utils.files import atomic_path


class UnsafeCheckpointError(RuntimeError):
    """The file is a pickle that cannot be loaded without running arbitrary code."""


class WeightMismatchError(RuntimeError):
    """A state dict does not match the network it is loaded into."""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a torch checkpoint or safetensors file without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it contains pickled objects that could run code when loaded "
            f"(torch.load weights_only=True rejected it: {str(exc).splitlines()[0]}). "
            "Convert it to safetensors or a plain state dict in a trusted environment."
        ) from exc


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename over it."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def load_state_dict_strict(
    module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state dict"
) -> None:
    """``module.load_state_dict(state, strict=True)`` with a readable error listing the keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs expected {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = describe_mismatch(missing=missing, unexpected=unexpected, shapes=shapes)
    if problems:
        raise WeightMismatchError(f"cannot load {source} into {type(module).__name__}: {problems}")
    module.load_state_dict(state, strict=True)


def describe_mismatch(missing: list[str] = (), unexpected: list[str] = (), shapes: list[str] = (),
                      errors: list[str] = ()) -> str:
    """One readable line listing (the first few) missing/unexpected keys, shape mismatches and
    errors; empty when there is nothing to report."""
    parts = []
    for label, items, sep in (("missing keys", missing, ", "), ("unexpected keys", unexpected, ", "),
                              ("shape mismatches", shapes, "; "), ("errors", errors, "; ")):
        if items:
            parts.append(f"{label} ({len(items)}): {sep.join(list(items)[:10])}")
    return " | ".join(parts)


def state_hash(*modules: nn.Module) -> str:
    """SHA-256 of the weights of ``modules`` (names, shapes and values; floating tensors as float32,
    so the same weights hash alike in a checkpoint and in a pipeline folder, on any device)."""
    import hashlib

    h = hashlib.sha256()
    for n, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().to("cpu")
            t = t.float() if t.is_floating_point() else t
            h.update(f"{n}:{name}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
