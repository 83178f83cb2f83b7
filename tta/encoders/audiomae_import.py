"""Load the published AudioMAE checkpoint (facebookresearch/AudioMAE, ``pretrained.pth``) into
`tta.encoders.audiomae.AudioMAE`, strictly.

The file is a torch checkpoint ``{"model": state_dict, ...}`` of the whole masked autoencoder.
Its encoder keys (``cls_token``, ``patch_embed.proj.*``, ``blocks.i.*``, ``norm.*``) load by name;
``pos_embed`` is the fixed 2-D sin-cos table, which tta recomputes, so it is *checked* against the
recomputed one (a layout that disagrees is refused rather than loaded wrongly); the decoder keys
(``mask_token``, ``decoder_*``) are dropped by an explicit list. Anything else is unexpected and
refused, as is a missing key. A fine-tuned classifier checkpoint (``fc_norm`` / ``head``, no
``norm``) is refused by name: feature extraction uses the pretrained encoder.

``save_audiomae_encoder`` writes what `RetrievalFeatureExtractor`'s ``audio_weights`` reads (tta's
layout, safetensors), so the conversion runs once::

    python -c "from tta.encoders.audiomae_import import convert; convert('pretrained.pth', 'mae.safetensors')"

or pass the ``pretrained.pth`` itself as ``audio_weights`` (detected by its ``model`` key).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tta.encoders.audiomae import AudioMAE, sincos_2d
from tta.utils.weights import load_checkpoint, load_state_dict_strict

log = logging.getLogger(__name__)

__all__ = ["DECODER_PREFIXES", "audiomae_state_dict", "convert", "is_official_layout", "load_audiomae_weights"]

#: keys of the MAE decoder (pre-training only), dropped on import
DECODER_PREFIXES = ("mask_token", "decoder_embed.", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                    "decoder_pred.")
_FINETUNED_KEYS = ("fc_norm.weight", "head.weight")
POS_TOLERANCE = 1e-4


def _read(path: str | os.PathLike) -> Any:
    """The checkpoint object; ``argparse.Namespace`` (the training ``args`` the MAE scripts store)
    is the only class allowed beyond tensors and containers."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_checkpoint(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_checkpoint(path)


def is_official_layout(obj: Any) -> bool:
    """Whether ``obj`` is an AudioMAE training checkpoint (a dict with a ``model`` state dict)."""
    return isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping)


def audiomae_state_dict(obj: Mapping[str, Any], encoder: AudioMAE, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The encoder state dict in tta's layout from an official checkpoint object (or its
    ``model`` dict), after checking ``pos_embed`` against ``encoder``'s recomputed table."""
    state = dict(obj["model"] if is_official_layout(obj) else obj)
    if any(k in state for k in _FINETUNED_KEYS) and "norm.weight" not in state:
        raise ValueError(f"{source}: a fine-tuned AudioMAE classifier (fc_norm / head keys); "
                         "feature extraction needs the pretrained encoder checkpoint (pretrained.pth)")
    dropped = sorted(k for k in state if k.startswith(DECODER_PREFIXES))
    for key in dropped:
        del state[key]
    if dropped:
        log.info("%s: dropped %d AudioMAE decoder tensors", source, len(dropped))
    pos = state.pop("pos_embed", None)
    if pos is not None:
        _check_pos_embed(pos, encoder, source)
    return state


def _check_pos_embed(pos: torch.Tensor, encoder: AudioMAE, source: str) -> None:
    if encoder.num_frames is None:
        raise ValueError(f"{source}: the checkpoint's pos_embed fixes the clip length; build AudioMAE with "
                         "num_frames (1024 for the public model)")
    rows = encoder.num_frames // encoder.patch_size
    expected = sincos_2d(encoder.embed_dim, rows, encoder.freq_patches)
    table = pos.reshape(-1, pos.shape[-1]).float()
    if table.shape[0] == expected.shape[0] + 1:  # the [CLS] position (zeros) comes first
        table = table[1:]
    if table.shape != expected.shape:
        raise ValueError(f"{source}: pos_embed has {tuple(table.shape)} positions x width, the encoder "
                         f"expects {tuple(expected.shape)} ({rows} time x {encoder.freq_patches} frequency patches)")
    err = (table - expected).abs().max().item()
    if err > POS_TOLERANCE:
        raise ValueError(f"{source}: pos_embed differs from the 2-D sin-cos table tta computes "
                         f"(max |diff| {err:.3g}); the patch grid or its ordering is not AudioMAE's")


def load_audiomae_weights(encoder: AudioMAE, path: str | os.PathLike) -> AudioMAE:
    """Load ``path`` (official ``pretrained.pth`` or a tta-layout state dict) into ``encoder``
    strictly; returns it. With ``reduction="linear"`` the file must also hold ``proj.*``."""
    source = os.fspath(path)
    obj = _read(path)
    if not isinstance(obj, Mapping):
        raise TypeError(f"{source}: expected a state dict or {{'model': state_dict}}, got {type(obj).__name__}")
    load_state_dict_strict(encoder, audiomae_state_dict(obj, encoder, source), source=source)
    return encoder


def convert(src: str | os.PathLike, dst: str | os.PathLike, **encoder_args: Any) -> Path:
    """Check ``src`` against an `AudioMAE` (ViT-B, ``reduction="group_mean"`` unless given) and
    write its encoder weights to ``dst`` (safetensors, tta's layout)."""
    from safetensors.torch import save_file

    encoder_args.setdefault("reduction", "group_mean")
    encoder = load_audiomae_weights(AudioMAE(**encoder_args), src)
    dst = Path(dst)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(dst))
    log.info("wrote the AudioMAE encoder of %s to %s", src, dst)
    return dst
