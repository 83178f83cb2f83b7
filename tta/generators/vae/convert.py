"""Import mel-VAE weights from diffusers and latent-diffusion (AudioLDM) checkpoints.

* `diffusers_vae_to_tta` maps a diffusers ``AutoencoderKL`` state dict (the ``vae/`` of the
  diffusers AudioLDM pipelines) onto `AutoencoderKL`'s LDM-style names by a key table;
  attention ``Linear`` weights become 1x1 conv weights. Both the current (``to_q`` ...
  ``to_out.0``) and the pre-0.14 (``query`` ... ``proj_attn``) attention names are accepted.
* `diffusers_config_to_tta` turns the diffusers ``config.json`` into constructor arguments.
* `load_diffusers_vae` builds the network from a local diffusers folder and loads it strictly.
* `ldm_first_stage_to_tta` takes the ``first_stage_model.*`` entries of an original AudioLDM /
  latent-diffusion checkpoint (their names are already ours) and drops, with a log line, the
  vocoder and loss/discriminator entries that AudioLDM stores there too.

Unknown keys raise `ValueError`; nothing is silently dropped.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tta.generators.vae.network import AutoencoderKL
from tta.utils.weights import load_checkpoint, load_state_dict_strict

log = logging.getLogger(__name__)

__all__ = ["diffusers_config_to_tta", "diffusers_vae_to_tta", "ldm_first_stage_to_tta", "load_diffusers_vae"]

# attention sub-module names: diffusers (new and pre-0.14) -> LDM
_ATTN_NAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "query": "q",
    "to_k": "k",
    "key": "k",
    "to_v": "v",
    "value": "v",
    "to_out.0": "proj_out",
    "proj_attn": "proj_out",
}
_ATTN_RE = re.compile(r"^(group_norm|to_q|query|to_k|key|to_v|value|to_out\.0|proj_attn)\.(weight|bias)$")
_RESNET_RE = re.compile(r"^(norm1|conv1|norm2|conv2|conv_shortcut)\.(weight|bias)$")
_TOP_RE = re.compile(r"^(encoder|decoder)\.(conv_in|conv_norm_out|conv_out)\.(weight|bias)$")
_DOWN_RE = re.compile(r"^encoder\.down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)$")
_UP_RE = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)$")
_MID_RE = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_QUANT_RE = re.compile(r"^(quant_conv|post_quant_conv)\.(weight|bias)$")


def _resnet_suffix(src_prefix: str, rest: str, state: Mapping[str, torch.Tensor], key: str) -> str:
    m = _RESNET_RE.match(rest)
    if m is None:
        raise ValueError(f"unknown diffusers resnet parameter {key!r}")
    name, kind = m.groups()
    if name == "conv_shortcut":
        kernel = state[f"{src_prefix}conv_shortcut.weight"].shape[-1]
        name = "nin_shortcut" if kernel == 1 else "conv_shortcut"
    return f"{name}.{kind}"


def _attn_param(rest: str, value: torch.Tensor, key: str) -> tuple[str, torch.Tensor]:
    m = _ATTN_RE.match(rest)
    if m is None:
        raise ValueError(f"unknown diffusers attention parameter {key!r}")
    name, kind = m.groups()
    ours = _ATTN_NAMES[name]
    if ours != "norm" and kind == "weight" and value.ndim == 2:
        value = value[:, :, None, None]  # Linear (out, in) -> 1x1 conv (out, in, 1, 1)
    return f"{ours}.{kind}", value


def diffusers_vae_to_tta(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to `tta` `AutoencoderKL` keys.

    Raises `ValueError` naming any key the table does not know.
    """
    up_levels = {int(m.group(1)) for k in state_dict if (m := _UP_RE.match(k))}
    n_up = max(up_levels) + 1 if up_levels else 0
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        new_key: str
        if m := _TOP_RE.match(key):
            part, name, kind = m.groups()
            new_key = f"{part}.{'norm_out' if name == 'conv_norm_out' else name}.{kind}"
        elif m := _QUANT_RE.match(key):
            new_key = key
        elif m := _DOWN_RE.match(key):
            level, group, idx, rest = m.groups()
            src = f"encoder.down_blocks.{level}.{group}.{idx}."
            if group == "resnets":
                new_key = f"encoder.down.{level}.block.{idx}.{_resnet_suffix(src, rest, state_dict, key)}"
            elif group == "attentions":
                suffix, value = _attn_param(rest, value, key)
                new_key = f"encoder.down.{level}.attn.{idx}.{suffix}"
            elif idx == "0" and rest in ("conv.weight", "conv.bias"):
                new_key = f"encoder.down.{level}.downsample.{rest}"
            else:
                unknown.append(key)
                continue
        elif m := _UP_RE.match(key):
            level_s, group, idx, rest = m.groups()
            level = n_up - 1 - int(level_s)  # diffusers counts from the bottleneck, LDM from full resolution
            src = f"decoder.up_blocks.{level_s}.{group}.{idx}."
            if group == "resnets":
                new_key = f"decoder.up.{level}.block.{idx}.{_resnet_suffix(src, rest, state_dict, key)}"
            elif group == "attentions":
                suffix, value = _attn_param(rest, value, key)
                new_key = f"decoder.up.{level}.attn.{idx}.{suffix}"
            elif idx == "0" and rest in ("conv.weight", "conv.bias"):
                new_key = f"decoder.up.{level}.upsample.{rest}"
            else:
                unknown.append(key)
                continue
        elif m := _MID_RE.match(key):
            part, group, idx, rest = m.groups()
            src = f"{part}.mid_block.{group}.{idx}."
            if group == "resnets" and idx in ("0", "1"):
                block = "block_1" if idx == "0" else "block_2"
                new_key = f"{part}.mid.{block}.{_resnet_suffix(src, rest, state_dict, key)}"
            elif group == "attentions" and idx == "0":
                suffix, value = _attn_param(rest, value, key)
                new_key = f"{part}.mid.attn_1.{suffix}"
            else:
                unknown.append(key)
                continue
        else:
            unknown.append(key)
            continue
        out[new_key] = value
    if unknown:
        raise ValueError(
            f"diffusers_vae_to_tta: {len(unknown)} key(s) not in the diffusers AutoencoderKL key table: "
            + ", ".join(unknown[:10])
        )
    return out


def diffusers_config_to_tta(config: Mapping[str, Any], resolution: int = 256) -> dict[str, Any]:
    """`AutoencoderKL` constructor arguments for a diffusers ``AutoencoderKL`` ``config.json``.

    ``block_out_channels`` must be multiples of the first entry; attention down/up blocks
    (``AttnDownEncoderBlock2D``) become ``attn_resolutions`` relative to ``resolution``.
    ``scaling_factor`` is not a network argument (the latent diffusion module owns it).
    """
    channels: Sequence[int] = config.get("block_out_channels", (64,))
    ch = int(channels[0])
    if any(c % ch for c in channels):
        raise ValueError(f"block_out_channels {list(channels)} are not multiples of {ch}")
    groups = int(config.get("norm_num_groups", 32))
    if groups != 32:
        raise ValueError(f"norm_num_groups={groups} is not supported (tta's VAE uses GroupNorm(32))")
    for flag in ("use_quant_conv", "use_post_quant_conv"):
        if not config.get(flag, True):
            raise ValueError(f"diffusers config has {flag}=False; tta's AutoencoderKL always has it")
    n = len(channels)
    down = list(config.get("down_block_types", ["DownEncoderBlock2D"] * n))
    up = list(config.get("up_block_types", ["UpDecoderBlock2D"] * n))
    known_down = {"DownEncoderBlock2D", "AttnDownEncoderBlock2D"}
    known_up = {"UpDecoderBlock2D", "AttnUpDecoderBlock2D"}
    if len(down) != n or len(up) != n or set(down) - known_down or set(up) - known_up:
        raise ValueError(f"unsupported diffusers block types: down {down}, up {up}")
    attn_down = [i for i, t in enumerate(down) if t.startswith("Attn")]
    attn_up = sorted(n - 1 - i for i, t in enumerate(up) if t.startswith("Attn"))
    if attn_down != attn_up:
        raise ValueError(f"asymmetric attention levels (down {down}, up {up}) are not supported")
    latent = int(config.get("latent_channels", 4))
    return {
        "ch": ch,
        "ch_mult": tuple(c // ch for c in channels),
        "num_res_blocks": int(config.get("layers_per_block", 1)),
        "z_channels": latent,
        "embed_dim": latent,
        "attn_resolutions": tuple(resolution // 2**i for i in attn_down),
        "dropout": 0.0,
        "in_channels": int(config.get("in_channels", 3)),
        "out_channels": int(config.get("out_channels", 3)),
        "mid_attention": bool(config.get("mid_block_add_attention", True)),
        "resolution": resolution,
    }


def load_diffusers_vae(path: str | os.PathLike) -> AutoencoderKL:
    """Build and strictly load an `AutoencoderKL` from a local diffusers VAE folder.

    ``path`` is the VAE folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or
    ``.bin``) or a pipeline folder with a ``vae/`` subfolder. No network access.
    """
    root = Path(path)
    folder = root / "vae" if (root / "vae" / "config.json").is_file() else root
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no diffusers VAE config.json in {root} (nor in {root / 'vae'})")
    config = json.loads(config_file.read_text())
    weights = next(
        (folder / name for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
         if (folder / name).is_file()),
        None,
    )
    if weights is None:
        raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors/.bin in {folder}")
    model = AutoencoderKL(**diffusers_config_to_tta(config))
    state = diffusers_vae_to_tta(load_checkpoint(weights))
    load_state_dict_strict(model, state, source=str(weights))
    log.info("loaded diffusers VAE from %s (%d tensors)", weights, len(state))
    return model


def ldm_first_stage_to_tta(
    state_dict: Mapping[str, torch.Tensor],
    prefix: str = "first_stage_model.",
    ignore: Sequence[str] = ("vocoder.", "loss."),
) -> dict[str, torch.Tensor]:
    """The VAE entries of an original AudioLDM / LDM checkpoint, with ``prefix`` stripped.

    Entries under ``prefix + ignore[i]`` (AudioLDM keeps its vocoder and the training loss there)
    are dropped with a log line; everything else under ``prefix`` is returned for a strict load.
    """
    out: dict[str, torch.Tensor] = {}
    dropped: dict[str, int] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        skip = next((p for p in ignore if rest.startswith(p)), None)
        if skip is not None:
            dropped[skip] = dropped.get(skip, 0) + 1
            continue
        out[rest] = value
    if not out:
        raise ValueError(f"no keys start with {prefix!r}; is this a latent-diffusion checkpoint?")
    for name, count in dropped.items():
        log.info("ldm_first_stage_to_tta: ignored %d %s%s* entries (not part of the VAE)", count, prefix, name)
    return out
