"""Import diffusers ``UNet2DConditionModel`` weights (AudioLDM layout) into `tta.nn.unet.UNetModel`.

`UNetModel` uses diffusers' submodule names wherever the structure is the same, so the key table
is two renames inside every resnet::

    *.resnets.{j}.time_emb_proj.*   ->  *.resnets.{j}.temb_proj.*
    *.resnets.{j}.conv_shortcut.*   ->  *.resnets.{j}.nin_shortcut.*      (1x1 channel change)

Every other key (``conv_in``, ``time_embedding.linear_{1,2}``, ``class_embedding``,
``down_blocks.{i}.{resnets,attentions,downsamplers}``, ``mid_block``, ``up_blocks``,
``conv_norm_out``, ``conv_out``; inside attentions ``norm``, ``proj_in``,
``transformer_blocks.{k}.{norm1,attn1,norm2,attn2,norm3,ff}``, ``proj_out``) is kept as is.

Loading is strict: every key of the file is consumed and every parameter filled, else
`WeightMismatchError` lists the keys. The only exception is explicit: with ``context_dims`` the
named cross-attentions (``cross_norms.<name>`` / ``cross_attns.<name>``, absent from AudioLDM)
keep their initialisation (zero output projection, so the model starts exactly at AudioLDM).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tta.nn.unet import UNetModel
from tta.utils.weights import (
    WeightMismatchError,
    describe_mismatch,
    load_checkpoint,
    load_state_dict_strict,
)

log = logging.getLogger(__name__)

__all__ = [
    "convert_diffusers_unet_state_dict",
    "unet_config_from_diffusers",
    "unet_from_diffusers",
]

WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# keys every diffusers UNet2DConditionModel of the AudioLDM layout has, as regular expressions
_BLOCK = r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)"
_TRANSFORMER = (
    r"transformer_blocks\.\d+\.(norm[123]\.(weight|bias)|attn[12]\.(to_[qkv]\.(weight|bias)|to_out\.0\.(weight|bias))"
    r"|ff\.net\.0\.proj\.(weight|bias)|ff\.net\.2\.(weight|bias))"
)
_KNOWN = re.compile(
    r"^("
    r"(conv_in|conv_out|conv_norm_out|class_embedding|time_embedding\.linear_[12])\.(weight|bias)"
    rf"|{_BLOCK}\.resnets\.\d+\.(norm1|conv1|time_emb_proj|norm2|conv2|conv_shortcut)\.(weight|bias)"
    rf"|{_BLOCK}\.attentions\.\d+\.((norm|proj_in|proj_out)\.(weight|bias)|{_TRANSFORMER})"
    r"|down_blocks\.\d+\.downsamplers\.0\.conv\.(weight|bias)"
    r"|up_blocks\.\d+\.upsamplers\.0\.conv\.(weight|bias)"
    r")$"
)
_RESNET_RENAME = re.compile(r"(\.resnets\.\d+\.)(time_emb_proj|conv_shortcut)\.")
_RENAMES = {"time_emb_proj": "temb_proj", "conv_shortcut": "nin_shortcut"}

# diffusers config entries that must keep the value AudioLDM uses (anything else is unsupported)
_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
# entries read below, or without effect on the fp32 network
_USED = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "dropout", "norm_num_groups", "cross_attention_dim", "transformer_layers_per_block",
    "attention_head_dim", "use_linear_projection", "class_embed_type", "projection_class_embeddings_input_dim",
    "class_embeddings_concat", "sample_size", "upcast_attention", "addition_embed_type_num_heads",
}  # fmt: skip


def convert_diffusers_unet_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DConditionModel`` (AudioLDM layout) state dict to `UNetModel` keys.

    Raises `ValueError` listing the keys outside the AudioLDM key table (e.g. ``add_embedding``).
    """
    unknown = sorted(k for k in state_dict if not _KNOWN.match(k))
    if unknown:
        raise ValueError(
            f"{len(unknown)} diffusers UNet key(s) are not in the AudioLDM key table: {', '.join(unknown[:10])}"
        )
    return {
        _RESNET_RENAME.sub(lambda m: m.group(1) + _RENAMES[m.group(2)] + ".", k): v
        for k, v in state_dict.items()
    }


def _per_level(config: Mapping[str, Any], key: str, default: Any, n: int) -> list[Any]:
    value = config.get(key, default)
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(
            f"diffusers UNet config {key}={value!r} needs {n} entries (one per block)"
        )
    return values


def unet_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """`UNetModel` keyword arguments for a diffusers ``UNet2DConditionModel`` ``config.json``.

    Supports the AudioLDM layout (``DownBlock2D`` / ``CrossAttnDownBlock2D`` levels mirrored by the
    up blocks, context-free ``attn2`` with ``cross_attention_dim`` equal to the level width,
    optional ``simple_projection`` class embedding concatenated to the time embedding); raises
    `ValueError` naming the field for anything else.
    """
    cls = config.get("_class_name", "UNet2DConditionModel")
    if cls != "UNet2DConditionModel":
        raise ValueError(
            f"diffusers UNet config: _class_name {cls!r} is not supported (UNet2DConditionModel)"
        )
    unknown = sorted(
        k
        for k in config
        if not k.startswith("_") and k not in _FIXED and k not in _USED
    )
    if unknown:
        raise ValueError(f"diffusers UNet config: unsupported field(s) {unknown}")
    for key, expected in _FIXED.items():
        if key in config and config[key] != expected:
            raise ValueError(
                f"diffusers UNet config: {key}={config[key]!r} is not supported (only {expected!r})"
            )
    channels = [int(c) for c in config.get("block_out_channels", ())]
    if not channels or any(c % channels[0] for c in channels):
        raise ValueError(
            f"diffusers UNet config: block_out_channels {channels} must be multiples of the first entry"
        )
    n = len(channels)
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    if len(down) != n or len(up) != n:
        raise ValueError(
            f"diffusers UNet config: need {n} down and up block types, got {down} and {up}"
        )
    attn_down = []
    for i, (d, u) in enumerate(zip(down, reversed(up), strict=True)):
        pair = {
            "DownBlock2D": "UpBlock2D",
            "CrossAttnDownBlock2D": "CrossAttnUpBlock2D",
        }
        if pair.get(d) != u:
            raise ValueError(
                f"diffusers UNet config: level {i} has down {d!r} and up {u!r}; only mirrored "
                "DownBlock2D/UpBlock2D and CrossAttnDownBlock2D/CrossAttnUpBlock2D are supported"
            )
        if d.startswith("CrossAttn"):
            attn_down.append(i)
    layers = _per_level(config, "layers_per_block", 2, n)
    if len(set(layers)) != 1:
        raise ValueError(
            f"diffusers UNet config: layers_per_block {layers} must be the same for every level"
        )
    depth = _per_level(config, "transformer_layers_per_block", 1, n)
    if len(set(depth)) != 1 or not isinstance(depth[0], int):
        raise ValueError(
            f"diffusers UNet config: transformer_layers_per_block {depth} must be one int"
        )
    cross = _per_level(config, "cross_attention_dim", 1280, n)
    for i in [*attn_down, n - 1]:  # attention levels and the bottleneck
        if cross[i] != channels[i]:
            raise ValueError(
                f"diffusers UNet config: cross_attention_dim {cross} must equal block_out_channels {channels} "
                "(AudioLDM's attn2 attends to the hidden states; text cross-attention is not supported)"
            )
    heads = [
        int(h) for h in _per_level(config, "attention_head_dim", 8, n)
    ]  # diffusers: a head *count*
    film_dim = 0
    embed = config.get("class_embed_type")
    if embed is not None:
        if embed != "simple_projection" or not config.get(
            "class_embeddings_concat", False
        ):
            raise ValueError(
                f"diffusers UNet config: class_embed_type={embed!r}, class_embeddings_concat="
                f"{config.get('class_embeddings_concat')!r}; only 'simple_projection' concatenated is supported"
            )
        film_dim = int(config["projection_class_embeddings_input_dim"])
    elif config.get("class_embeddings_concat"):
        raise ValueError(
            "diffusers UNet config: class_embeddings_concat without a class_embed_type"
        )
    groups = config.get("norm_num_groups", 32)
    if groups is None:
        raise ValueError(
            "diffusers UNet config: norm_num_groups=None (no output norm) is not supported"
        )
    return {
        "in_channels": int(config.get("in_channels", 4)),
        "out_channels": int(config.get("out_channels", 4)),
        "model_channels": channels[0],
        "channel_mult": tuple(c // channels[0] for c in channels),
        "num_res_blocks": int(layers[0]),
        "attention_resolutions": tuple(2**i for i in attn_down),
        "num_heads": tuple(heads),
        "film_dim": film_dim,
        "self_attn2": True,
        "dropout": float(config.get("dropout", 0.0)),
        "num_groups": int(groups),
        "transformer_depth": int(depth[0]),
        "use_linear_projection": bool(config.get("use_linear_projection", False)),
    }


def _read_folder(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    folder = path / "unet" if (path / "unet" / "config.json").is_file() else path
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no diffusers UNet config.json in {path} (nor in {path / 'unet'})"
        )
    weights = next((folder / n for n in WEIGHTS_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"no {' or '.join(WEIGHTS_NAMES)} in {folder}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from exc
    return config, load_checkpoint(weights), str(weights)


def unet_from_diffusers(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None = None,
    context_dims: dict[str, int] | None = None,
    **overrides: Any,
) -> UNetModel:
    """Build a `UNetModel` and load diffusers ``UNet2DConditionModel`` weights into it, strictly.

    Args:
        source: a local diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
            or a pipeline folder with ``unet/``), or an already loaded diffusers state dict.
        config: the diffusers config (required with a state dict; read from the folder otherwise).
        context_dims: named cross-attentions to add (e.g. ``{"retrieval": 768}`` for Re-AudioLDM);
            their parameters are new (zero output projection), every other one comes from the file.
        overrides: further `UNetModel` arguments (e.g. ``gradient_checkpointing=True``, ``dropout``).
    """
    if isinstance(source, Mapping):
        if config is None:
            raise ValueError(
                "unet_from_diffusers: a state dict source needs its diffusers config"
            )
        state, where = dict(source), "state dict"
    else:
        file_config, state, where = _read_folder(Path(source))
        config = file_config if config is None else config
    kwargs = {**unet_config_from_diffusers(config), **overrides}
    if context_dims:
        kwargs["context_dims"] = context_dims
    model = UNetModel(**kwargs)
    converted = convert_diffusers_unet_state_dict(state)
    names = tuple(model.context_dims)
    if names:
        own = model.state_dict()
        new = {
            k
            for k in own
            if any(
                f".cross_norms.{n}." in k or f".cross_attns.{n}." in k for n in names
            )
        }
        clash = sorted(new & set(converted))
        missing = sorted(set(own) - set(converted) - new)
        unexpected = sorted(set(converted) - set(own))
        shapes = [f"{k}: {tuple(converted[k].shape)} vs expected {tuple(own[k].shape)}"
                  for k in set(own) & set(converted) if converted[k].shape != own[k].shape]  # fmt: skip
        problems = describe_mismatch(
            missing=missing, unexpected=unexpected + clash, shapes=shapes
        )
        if problems:
            raise WeightMismatchError(f"cannot load {where} into UNetModel: {problems}")
        own.update(converted)
        model.load_state_dict(own, strict=True)
        log.info(
            "loaded diffusers UNet from %s; %d new cross-attention tensors for %s",
            where,
            len(new),
            names,
        )
    else:
        load_state_dict_strict(model, converted, source=where)
        log.info("loaded diffusers UNet from %s (%d tensors)", where, len(converted))
    return model
