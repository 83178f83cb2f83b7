"""Loading Hugging Face text models from *local* folders only.

A usable folder holds ``config.json``, the weights as ``*.safetensors`` and tokenizer files
(``tokenizer.json``, or the slow-tokenizer vocabularies ``vocab.txt`` / ``vocab.json`` +
``merges.txt`` / ``spiece.model``). Nothing here ever contacts a hub: a missing folder is an
error naming the path, never a download. Weights load in float32 and strictly: a parameter the
network needs but the checkpoint lacks, or one whose shape differs, raises
`tta.utils.weights.WeightMismatchError`; checkpoint entries the network does not use (an LM or
pooler head of the saved architecture) are logged and dropped.

``transformers`` and ``tokenizers`` are imported lazily, so importing `tta.encoders` never
requires them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from tta.utils.weights import WeightMismatchError, describe_mismatch

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
# buffers whose presence in a checkpoint depends on the transformers version that wrote it
_BUFFER_DRIFT = ("position_ids", "token_type_ids")


class HFFolderError(FileNotFoundError):
    """A local Hugging Face model folder is missing or incomplete."""


def is_buffer_drift(key: str) -> bool:
    """True for non-learned buffers (``*.position_ids``, ``*.token_type_ids``) saved by some versions only."""
    return key.rsplit(".", 1)[-1] in _BUFFER_DRIFT


def check_hf_folder(path: str | os.PathLike, need_tokenizer: bool = True) -> Path:
    """Return ``path`` as a `Path` after checking it holds config, safetensors weights and a tokenizer.

    Raises `HFFolderError` naming the folder and every missing piece.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise HFFolderError(
            f"text encoder folder not found: {folder} (expected a local Hugging Face folder with config.json, "
            "*.safetensors weights and tokenizer files; tta never downloads from a hub, so a hub id is not a path)"
        )
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors weights (pytorch_model.bin is not loaded: convert it to safetensors)")
    if need_tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    if missing:
        raise HFFolderError(f"{folder} is not a complete Hugging Face model folder: missing {'; '.join(missing)}")
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of ``folder`` as a dict; a clear error for unreadable JSON."""
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_model_type(folder: Path, allowed: frozenset[str], encoder: str) -> str:
    """The ``model_type`` of ``folder``'s config, which must be one of ``allowed``."""
    model_type = read_config(folder).get("model_type")
    if model_type not in allowed:
        raise ValueError(
            f"{folder / 'config.json'}: model_type {model_type!r} cannot be used by {encoder}; "
            f"expected one of {', '.join(sorted(allowed))}"
        )
    return str(model_type)


def load_tokenizer(folder: Path) -> Any:
    """``AutoTokenizer.from_pretrained(folder, local_files_only=True)``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_model_strict(
    model_cls: Any, folder: Path, unused_prefixes: tuple[str, ...] | None = None, **kwargs: Any
) -> torch.nn.Module:
    """``model_cls.from_pretrained(folder)`` offline, from safetensors, in float32, strictly.

    Missing or shape-mismatched parameters raise `WeightMismatchError`. Checkpoint entries the
    network does not use (heads of the saved architecture) are logged at INFO level; with
    ``unused_prefixes`` only entries starting with one of them may be unused, and any other one
    (e.g. a layer the config does not declare) raises `WeightMismatchError` too.
    """
    model, info = model_cls.from_pretrained(
        str(folder),
        local_files_only=True,
        use_safetensors=True,
        output_loading_info=True,
        dtype=torch.float32,
        **kwargs,
    )
    unexpected = sorted(info.get("unexpected_keys", ()))
    extra = []
    if unused_prefixes is not None:
        extra = [k for k in unexpected if not k.startswith(unused_prefixes) and not is_buffer_drift(k)]
    missing = sorted(k for k in info.get("missing_keys", ()) if not is_buffer_drift(k))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    errors = list(info.get("error_msgs", ()))
    problems = describe_mismatch(missing=missing, unexpected=extra, shapes=mismatched, errors=errors)
    if problems:
        raise WeightMismatchError(f"cannot load {folder} into {type(model).__name__}: {problems}")
    if unexpected:
        log.info(
            "%s: %d checkpoint entries unused by %s (e.g. %s)",
            folder,
            len(unexpected),
            type(model).__name__,
            ", ".join(unexpected[:5]),
        )
    return model
