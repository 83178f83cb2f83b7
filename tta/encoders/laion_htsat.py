"""LAION CLAP's audio tower (transformers ``ClapAudioModel``, fusion off) as a tta `HTSAT`.

The structures are the same Swin-style HTS-AT, so there is no separate network: `laion_htsat`
builds our `HTSAT` with LAION's options (``head="mean"``: the pooled 768-d embedding is the mean
of the final LayerNorm-ed tokens, no token-semantic conv; ``resize="bicubic"``;
``pad="repeat"``; the ``laion`` mel preset: 48 kHz power mel in dB) and `map_laion_audio` turns
the ``audio_model.audio_encoder.*`` weights into its state dict with a key table:

=========================================================  ==================================
transformers (``audio_model.audio_encoder.``)               tta `HTSAT`
=========================================================  ==================================
``batch_norm.*``                                            ``bn0.*``
``patch_embed.proj.*`` / ``patch_embed.norm.*``             same
``layers.i.blocks.j.layernorm_before.*`` / ``_after.*``     ``layers.i.blocks.j.norm1.*`` / ``norm2.*``
``...attention.self.{query,key,value}.*``                   ``...attn.qkv.*`` (concatenated q, k, v)
``...attention.self.relative_position_bias_table``          ``...attn.relative_position_bias_table``
``...attention.self.relative_position_index``               checked equal to ours (a constant)
``...attention.output.dense.*``                             ``...attn.proj.*``
``...intermediate.dense.*`` / ``...output.dense.*``         ``...mlp.fc1.*`` / ``...mlp.fc2.*``
``layers.i.downsample.{norm,reduction}.*``, ``norm.*``      same
=========================================================  ==================================

Anything else (the fusion blocks of ``enable_fusion`` models) is an unexpected key.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from tta.encoders.htsat import HTSAT
from tta.utils.weights import WeightMismatchError, describe_mismatch

log = logging.getLogger(__name__)

AUDIO_PREFIX = "audio_model.audio_encoder."
PREPROCESSOR_FILE = "preprocessor_config.json"

_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_BLOCK_KEYS = {
    "layernorm_before.weight": "norm1.weight",
    "layernorm_before.bias": "norm1.bias",
    "layernorm_after.weight": "norm2.weight",
    "layernorm_after.bias": "norm2.bias",
    "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "intermediate.dense.weight": "mlp.fc1.weight",
    "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight",
    "output.dense.bias": "mlp.fc2.bias",
}
_QKV = re.compile(r"^attention\.self\.(query|key|value)\.(weight|bias)$")
_SAME = re.compile(
    r"^(patch_embed\.(proj|norm)\.(weight|bias)|norm\.(weight|bias)"
    r"|layers\.\d+\.downsample\.(norm\.weight|norm\.bias|reduction\.weight))$"
)
# config fields whose value our HTSAT hard-codes
_REQUIRED = {
    "enable_fusion": False,
    "flatten_patch_embeds": True,
    "enable_patch_layer_norm": True,
    "patch_embed_input_channels": 1,
    "hidden_act": "gelu",
    "qkv_bias": True,
    "layer_norm_eps": 1e-5,
}


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def read_preprocessor(folder: Path) -> dict[str, Any]:
    """The folder's ``preprocessor_config.json`` (ClapFeatureExtractor fields), or ``{}`` if absent."""
    path = folder / PREPROCESSOR_FILE
    if not path.is_file():
        log.info("%s: no %s; using the laion mel preset and 10 s windows", folder, PREPROCESSOR_FILE)
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise TypeError(f"{path}: not a JSON object")
    return data


def laion_htsat(audio_config: Any, preprocessor: dict[str, Any] | None = None, source: str = "config") -> HTSAT:
    """Our `HTSAT` shaped like a transformers ``ClapAudioConfig`` (fusion off) and its feature extractor.

    ``preprocessor`` holds ``ClapFeatureExtractor`` fields (sample rate, FFT, hop, mel range,
    window length ``max_length_s``, ``padding``); absent fields keep the ``laion`` preset's.
    """
    cfg, pre = audio_config, dict(preprocessor or {})
    for name, want in _REQUIRED.items():
        got = getattr(cfg, name, want)
        if got != want:
            raise ValueError(f"{source}: audio_config.{name}={got!r} is not supported (need {want!r})")
    if _pair(cfg.patch_size) != _pair(cfg.patch_stride) or _pair(cfg.patch_size)[0] != _pair(cfg.patch_size)[1]:
        raise ValueError(
            f"{source}: patch_size {cfg.patch_size} must be square and equal patch_stride {cfg.patch_stride}"
        )
    if cfg.spec_size % cfg.num_mel_bins:
        raise ValueError(f"{source}: spec_size {cfg.spec_size} is not a multiple of num_mel_bins {cfg.num_mel_bins}")
    width = int(cfg.patch_embeds_hidden_size) * 2 ** (len(cfg.depths) - 1)
    if int(cfg.hidden_size) != width:
        raise ValueError(f"{source}: audio hidden_size {cfg.hidden_size} != last stage width {width}")
    padding = pre.get("padding", "repeatpad")
    if padding not in ("repeatpad", "pad"):
        raise ValueError(f"{source}: feature-extractor padding {padding!r} is not supported ('repeatpad' or 'pad')")
    if pre.get("truncation", "rand_trunc") != "rand_trunc" or pre.get("top_db") is not None:
        raise ValueError(f"{source}: only truncation 'rand_trunc' without top_db is supported (fusion off)")
    if pre.get("feature_size", cfg.num_mel_bins) != cfg.num_mel_bins:
        raise ValueError(f"{source}: feature_size {pre['feature_size']} != num_mel_bins {cfg.num_mel_bins}")
    mel: dict[str, Any] = {"n_mels": int(cfg.num_mel_bins)}
    for ours, theirs, cast in (("sample_rate", "sampling_rate", int), ("hop_length", "hop_length", int),
                               ("f_min", "frequency_min", float), ("f_max", "frequency_max", float)):  # fmt: skip
        if theirs in pre:
            mel[ours] = cast(pre[theirs])
    if "fft_window_size" in pre:
        mel["n_fft"] = mel["win_length"] = int(pre["fft_window_size"])
    freq_ratio = cfg.spec_size // cfg.num_mel_bins
    return HTSAT(
        dim=width,
        embed_dim=int(cfg.patch_embeds_hidden_size),
        depths=tuple(cfg.depths),
        num_heads=tuple(cfg.num_attention_heads),
        window_size=int(cfg.window_size),
        patch_size=_pair(cfg.patch_size)[0],
        spec_frames=int(cfg.spec_size) * freq_ratio,
        freq_ratio=freq_ratio,
        mlp_ratio=float(cfg.mlp_ratio),
        drop_path=float(cfg.drop_path_rate),
        window_seconds=float(pre.get("max_length_s", 10.0)),
        mel_preset="laion",
        mel=mel,
        head="mean",
        resize="bicubic",
        pad="repeat" if padding == "repeatpad" else "zero",
    )


def map_laion_audio(state: dict[str, torch.Tensor], htsat: HTSAT, source: str) -> dict[str, torch.Tensor]:
    """``audio_model.audio_encoder.*`` weights -> a strict state dict of ``htsat`` (see the key table).

    Raises `WeightMismatchError` listing missing, unexpected and mis-shaped keys, or a
    relative-position index that differs from ours.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unexpected, errors = [], []
    for key, value in state.items():
        if not key.startswith(AUDIO_PREFIX):
            continue
        k = key[len(AUDIO_PREFIX) :]
        block = _BLOCK.match(k)
        if k.startswith("batch_norm."):
            out["bn0." + k[len("batch_norm.") :]] = value
        elif _SAME.match(k):
            out[k] = value
        elif block is not None:
            i, j, rest = block.groups()
            base = f"layers.{i}.blocks.{j}."
            part = _QKV.match(rest)
            if rest in _BLOCK_KEYS:
                out[base + _BLOCK_KEYS[rest]] = value
            elif part is not None:
                qkv.setdefault(f"{base}attn.qkv.{part.group(2)}", {})[part.group(1)] = value
            elif rest == "attention.self.relative_position_index":
                ours = htsat.layers[int(i)].blocks[int(j)].attn.relative_position_index
                if tuple(value.shape) != tuple(ours.shape) or not torch.equal(value.to(ours), ours):
                    errors.append(f"{key} differs from HTSAT's relative position index")
            else:
                unexpected.append(key)
        else:
            unexpected.append(key)
    for k, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            errors.append(f"{k}: only {sorted(parts)} of query/key/value present")
            continue
        out[k] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    own = htsat.state_dict()
    missing = sorted(set(own) - set(out))
    unexpected += [AUDIO_PREFIX + k for k in sorted(set(out) - set(own))]
    shapes = [
        f"{k}: {tuple(out[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in out and out[k].shape != own[k].shape
    ]
    problems = describe_mismatch(missing=missing, unexpected=sorted(unexpected), shapes=shapes, errors=errors)
    if problems:
        raise WeightMismatchError(f"{source}: the audio tower (audio_model.*) does not match a LAION HTSAT: {problems}")
    return out
