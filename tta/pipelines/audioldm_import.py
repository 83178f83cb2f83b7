"""Import a public diffusers AudioLDM folder as a tta pipeline folder (``tta pipeline import-audioldm``).

A diffusers ``AudioLDMPipeline`` folder (e.g. a local copy of cvssp/audioldm-s-full-v2) holds
``model_index.json`` and one folder per component::

    unet/          UNet2DConditionModel    -> tta.nn.unet.UNetModel (tta.generators.ldm.unet_import)
    vae/           AutoencoderKL           -> tta AutoencoderKL + scale_factor (tta.generators.vae.convert)
    text_encoder/  ClapTextModelWithProjection \\
    tokenizer/     RoBERTa tokenizer        -> ClapTextOnly(LaionClapTextEncoder) (tta.encoders.clap_import)
    vocoder/       SpeechT5HifiGan         -> HiFiGANGenerator (tta.vocoders.hifigan.importers)
    scheduler/     scheduler_config.json   -> the DiffusionSchedule arguments

`import_audioldm` composes the existing importers into a ``latent_diffusion`` module with
``retrieval: null`` and ``film_null: empty_prompt`` (diffusers conditions the UNet's class
embedding on the L2-normalised CLAP ``text_embeds`` of the prompt and uses the prompt ``""`` as
the unconditional branch) and writes it with `tta.pipelines.ldm.write_components`, so
`tta.pipelines.ldm.load_pipeline` loads the folder unchanged.

The text encoder is not a tta network config alone: its RoBERTa tower is built from a Hugging
Face folder. The importer copies ``text_encoder/`` and ``tokenizer/`` into ``OUT/text_encoder/``
(a ``pytorch_model.bin`` is rewritten as ``model.safetensors``), refers to it by the relative path
``text_encoder`` and lists that entry in ``pipeline.json``'s ``relative_paths``; the folder can
therefore be moved as a whole. Its weights are also in ``clap.safetensors`` (loaded strictly on
top, as for every pipeline), so the tower is stored twice.

The scheduler config gives ``num_train_timesteps``, ``beta_start``, ``beta_end``,
``beta_schedule`` (``scaled_linear`` or ``linear``) and ``prediction_type`` (``epsilon`` ->
``eps``, ``v_prediction`` -> ``v``); anything tta's schedule cannot represent (trained betas,
zero-terminal-SNR rescaling, other schedules or prediction types) is an error naming the field.
Sampler-only settings (``clip_sample``, ``set_alpha_to_one``, ``steps_offset``, ...) are not
stored: tta samples with its own samplers (DDIM as AudioLDM: eta 0, ``steps_offset`` 1, no
clipping); values that differ from those are logged as a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tta.data.mel import MelConfig
from tta.utils.files import atomic_dir

log = logging.getLogger(__name__)

__all__ = [
    "COMPONENT_FOLDERS",
    "check_audioldm_folder",
    "import_audioldm",
    "schedule_from_diffusers",
]

PIPELINE_CLASS = "AudioLDMPipeline"
#: component folder -> what diffusers stores there
COMPONENT_FOLDERS = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "transformers ClapTextModelWithProjection",
    "tokenizer": "RoBERTa tokenizer",
    "vocoder": "transformers SpeechT5HifiGan",
    "scheduler": "scheduler_config.json",
}
TEXT_FOLDER = "text_encoder"
TEXT_PATH_POINTER = "model/init_args/clap/init_args/text_encoder/init_args/path"
#: sampling defaults of imported pipelines (AudioLDM's text_to_audio: DDIM 200 steps, guidance 2.5)
IMPORT_DEFAULTS = {"steps": 200, "sampler": "ddim", "guidance": 2.5, "candidates": 1}

_PREDICTION = {"epsilon": "eps", "v_prediction": "v"}
_SCHEDULES = ("scaled_linear", "linear")
# what tta's DDIM does; another value only changes the folder's own sampler (logged)
_SAMPLER_SETTINGS = {
    "clip_sample": False,
    "thresholding": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
_MODULE_CLASS = "tta.generators.ldm.module.LatentDiffusionModule"
_UNET_CLASS = "tta.nn.unet.UNetModel"
_VAE_CLASS = "tta.generators.vae.network.AutoencoderKL"
_CLAP_CLASS = "tta.encoders.clap.text_only.ClapTextOnly"
_TEXT_CLASS = "tta.encoders.clap_import.LaionClapTextEncoder"
_TEXT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}"
        ) from exc
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_audioldm_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """``model_index.json`` of a complete diffusers ``AudioLDMPipeline`` folder.

    Raises `FileNotFoundError` naming every missing component folder, `ValueError` for another
    pipeline class (AudioLDM 2 and MusicLDM have other architectures).
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"AudioLDM folder not found: {root} (a local diffusers AudioLDMPipeline folder)"
        )
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{root} has no model_index.json; it is not a diffusers pipeline folder"
        )
    index = _read_json(index_path)
    cls = index.get("_class_name")
    if cls != PIPELINE_CLASS:
        raise ValueError(
            f"{index_path}: _class_name is {cls!r}; only {PIPELINE_CLASS!r} folders can be imported"
        )
    missing = [
        f"{name}/ ({what})"
        for name, what in COMPONENT_FOLDERS.items()
        if not (root / name).is_dir()
    ]
    if missing:
        raise FileNotFoundError(
            f"{root} is not a complete AudioLDM folder: missing {', '.join(missing)}"
        )
    return index


def schedule_from_diffusers(
    config: Mapping[str, Any], source: str = "scheduler_config.json"
) -> dict[str, Any]:
    """`DiffusionSchedule` / ``latent_diffusion`` arguments from a diffusers scheduler config."""
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule"):
        if config.get(key) is None:
            raise ValueError(f"{source}: missing {key!r}")
    if config.get("trained_betas") is not None:
        raise ValueError(
            f"{source}: trained_betas are not supported (tta's schedule is {'/'.join(_SCHEDULES)})"
        )
    if config.get("rescale_betas_zero_snr"):
        raise ValueError(f"{source}: rescale_betas_zero_snr=true is not supported")
    schedule = config["beta_schedule"]
    if schedule not in _SCHEDULES:
        raise ValueError(
            f"{source}: beta_schedule {schedule!r} is not supported (only {', '.join(_SCHEDULES)})"
        )
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTION:
        raise ValueError(
            f"{source}: prediction_type {prediction!r} is not supported (only {', '.join(_PREDICTION)})"
        )
    differs = {
        k: config[k]
        for k, v in _SAMPLER_SETTINGS.items()
        if k in config and config[k] != v
    }
    cls = config.get("_class_name")
    if differs or cls not in (None, "DDIMScheduler"):
        log.warning(
            "%s: the folder samples with %s %s; tta samples with its own samplers (DDIM: %s), so generations "
            "differ from the folder's own sampler", source, cls, differs or "", _SAMPLER_SETTINGS,
        )  # fmt: skip
    return {
        "num_train_timesteps": int(config["num_train_timesteps"]),
        "beta_start": float(config["beta_start"]),
        "beta_end": float(config["beta_end"]),
        "beta_schedule": schedule,
        "objective": _PREDICTION[prediction],
    }


def _copy_text_encoder(root: Path, dest: Path) -> None:
    """``text_encoder/`` + ``tokenizer/`` -> ``dest`` (config, model.safetensors, tokenizer files)."""
    from safetensors.torch import save_file

    from tta.utils.weights import load_checkpoint

    src, tok = root / "text_encoder", root / "tokenizer"
    if not (src / "config.json").is_file():
        raise FileNotFoundError(
            f"{src} has no config.json (a ClapTextModelWithProjection folder)"
        )
    weights = next((src / n for n in _TEXT_WEIGHTS if (src / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(
            f"{src} has no {' or '.join(_TEXT_WEIGHTS)} (sharded text encoders are not supported)"
        )
    dest.mkdir(parents=True)
    shutil.copy2(src / "config.json", dest / "config.json")
    if weights.suffix == ".safetensors":
        shutil.copy2(weights, dest / "model.safetensors")
    else:  # read without unpickling code (weights_only), stored as safetensors
        state = {k: v.contiguous() for k, v in load_checkpoint(weights).items()}
        save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    files = sorted(p for p in tok.iterdir() if p.is_file())
    clash = [p.name for p in files if (dest / p.name).exists()]
    if clash:
        raise ValueError(
            f"{tok}: tokenizer files {clash} clash with the text encoder's files"
        )
    for p in files:
        shutil.copy2(p, dest / p.name)


def _text_max_length(
    folder: Path, roberta: Mapping[str, Any], requested: int | None
) -> int:
    limit = (
        int(roberta["max_position_embeddings"])
        - int(roberta.get("pad_token_id", 1))
        - 1
    )
    if requested is not None:
        return int(requested)
    tok_config = folder / "tokenizer_config.json"
    stored = (
        _read_json(tok_config).get("model_max_length") if tok_config.is_file() else None
    )
    # diffusers pads/truncates prompts to the tokenizer's model_max_length; cap it by the positions
    return limit if stored is None or int(stored) > limit else int(stored)


def _build_clap(text_dir: Path, max_length: int | None) -> tuple[Any, dict[str, Any]]:
    from tta.encoders.clap.text_only import ClapTextOnly
    from tta.encoders.clap_import import LaionClapTextEncoder, read_clap_text
    from tta.utils.weights import load_state_dict_strict

    weights = read_clap_text(text_dir)
    if weights.projection_act != "relu":
        raise ValueError(
            f"{text_dir / 'config.json'}: projection_hidden_act {weights.projection_act!r} (only relu)"
        )
    length = _text_max_length(text_dir, weights.roberta_config, max_length)
    encoder = LaionClapTextEncoder(text_dir, max_length=length, preloaded=weights)
    clap = ClapTextOnly(encoder, joint_dim=weights.projection_dim, projection="laion")
    load_state_dict_strict(
        clap.text_projection,
        weights.projection,
        source=f"{text_dir} (text_projection.*)",
    )
    config = {
        "class_path": _CLAP_CLASS,
        "init_args": {
            "text_encoder": {
                "class_path": _TEXT_CLASS,
                "init_args": {"path": TEXT_FOLDER, "max_length": length},
            },
            "joint_dim": weights.projection_dim,
            "projection": "laion",
        },
    }
    return clap.freeze_all(), config


def _build_vae(root: Path, mel: MelConfig) -> tuple[Any, dict[str, Any], float]:
    from tta.generators.vae.convert import diffusers_config_to_tta, load_diffusers_vae

    config_path = root / "vae" / "config.json"
    config = _read_json(config_path)
    scale = config.get("scaling_factor")
    if scale is None:
        raise ValueError(
            f"{config_path}: missing 'scaling_factor' (the latent scale AudioLDM samples with)"
        )
    for key in ("in_channels", "out_channels"):
        if int(config.get(key, 3)) != 1:
            raise ValueError(
                f"{config_path}: {key}={config.get(key, 3)}; a mel VAE has 1 (image layout (B,1,T,mels))"
            )
    vae = load_diffusers_vae(root / "vae")
    if mel.n_mels % vae.downsample_factor:
        raise ValueError(f"{config_path}: the VAE downsamples by {vae.downsample_factor}, which does not divide "
                         f"the {mel.n_mels} mel bins of {mel.name!r}")  # fmt: skip
    return (
        vae,
        {"class_path": _VAE_CLASS, "init_args": diffusers_config_to_tta(config)},
        float(scale),
    )


def _build_unet(root: Path) -> tuple[Any, dict[str, Any]]:
    from tta.generators.ldm.unet_import import (
        unet_config_from_diffusers,
        unet_from_diffusers,
    )

    config = _read_json(root / "unet" / "config.json")
    kwargs = unet_config_from_diffusers(config)
    unet = unet_from_diffusers(root / "unet", config=config)
    return unet, {"class_path": _UNET_CLASS, "init_args": kwargs}


def _check_widths(root: Path, unet: Any, clap: Any, vae: Any) -> None:
    if unet.film_dim != clap.joint_dim:
        raise ValueError(
            f"{root / 'unet' / 'config.json'}: projection_class_embeddings_input_dim {unet.film_dim} differs from the "
            f"text projection width {clap.joint_dim} of {root / 'text_encoder'}"
        )
    if unet.in_channels != vae.embed_dim or unet.out_channels != vae.embed_dim:
        raise ValueError(
            f"{root / 'unet' / 'config.json'}: in/out_channels {unet.in_channels}/{unet.out_channels} differ from the "
            f"VAE's {vae.embed_dim} latent channels ({root / 'vae' / 'config.json'})"
        )


def import_audioldm(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    mel: str | MelConfig = "audioldm",
    text_max_length: int | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Path:
    """Write a tta pipeline folder at ``out`` from a local diffusers ``AudioLDMPipeline`` folder.

    Args:
        folder: the diffusers folder (``model_index.json`` + ``unet/``, ``vae/``, ``text_encoder/``,
            ``tokenizer/``, ``vocoder/``, ``scheduler/``).
        out: the new pipeline folder (must not exist or be empty); assembled beside it and renamed
            into place, so a failed import leaves nothing behind.
        mel: the mel front-end of the VAE and vocoder (AudioLDM: preset ``audioldm``); the vocoder's
            sample rate, hop and mel bins are checked against it.
        text_max_length: most prompt tokens (default: the tokenizer's ``model_max_length``, as
            diffusers, capped by the text encoder's positions).
        defaults: sampling defaults stored in the folder (default `IMPORT_DEFAULTS`).
    """
    from tta.generators.ldm.module import LatentDiffusionModule
    from tta.pipelines.base import write_components, write_meta
    from tta.vocoders.factory import vocoder_config
    from tta.vocoders.hifigan.importers import load_speecht5_hifigan

    root, out = Path(folder).expanduser(), Path(out).expanduser()
    index = check_audioldm_folder(root)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"pipeline target {out} exists and is not an empty folder"
        )
    mel_config = MelConfig.preset(mel) if isinstance(mel, str) else mel
    scheduler_path = root / "scheduler" / "scheduler_config.json"
    schedule = schedule_from_diffusers(_read_json(scheduler_path), str(scheduler_path))

    with atomic_dir(out) as tmp:
        unet, unet_config = _build_unet(root)
        vae, vae_config, scale = _build_vae(root, mel_config)
        _copy_text_encoder(root, tmp / TEXT_FOLDER)
        clap, clap_config = _build_clap(tmp / TEXT_FOLDER, text_max_length)
        _check_widths(root, unet, clap, vae)
        vocoder = load_speecht5_hifigan(root / "vocoder", mel_config=mel_config)
        vocoder.requires_grad_(False)
        mel_arg: str | dict[str, Any] = mel if isinstance(mel, str) else mel.to_dict()
        common = {
            "retrieval": None,
            "film_null": "empty_prompt",
            "mel": mel_arg,
            **schedule,
        }
        module = LatentDiffusionModule(
            unet=unet, vae=vae, scale_factor=scale, clap=clap, **common
        ).eval()
        model_config = {
            "class_path": _MODULE_CLASS,
            "init_args": {"unet": unet_config, "vae": vae_config, "scale_factor": scale, "clap": clap_config,
                          **common, "init_from": None},
        }  # fmt: skip
        files = write_components(module.generator, vocoder, tmp)
        write_meta(tmp, {
            "kind": "latent_diffusion",
            "mel": module.mel_config.to_dict(),
            "model": model_config,
            "vocoder": vocoder_config(vocoder),
            "files": files,
            "defaults": {**IMPORT_DEFAULTS, **(defaults or {})},
            "retrieval": None,
            "relative_paths": [TEXT_PATH_POINTER],
            "source": {"diffusers": str(root.resolve()), "pipeline": PIPELINE_CLASS,
                       "diffusers_version": index.get("_diffusers_version")},
        })  # fmt: skip
    log.info("imported the AudioLDM folder %s as the pipeline %s", root, out)
    return out
