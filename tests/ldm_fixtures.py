"""Tiny latent-diffusion components for tests: VAE, CLAP, UNet, feature store, neighbour table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.hf_fixtures import make_bert_folder

CLAP_DIM = 16
CTX_DIM = 16


def tiny_vae_config() -> dict[str, Any]:
    return {"class_path": "tta.generators.vae.network.AutoencoderKL",
            "init_args": {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "mid_attention": False, "z_channels": 4,
                          "embed_dim": 4}}


def tiny_clap_config(bert: Path, joint_dim: int = CLAP_DIM) -> dict[str, Any]:
    audio = {"class_path": "tta.encoders.htsat.HTSAT",
             "init_args": {"dim": 32, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4,
                           "spec_frames": 64, "freq_ratio": 4, "drop_path": 0.0, "window_seconds": 1.0,
                           "mel_preset": "demo"}}
    text = {"class_path": "tta.encoders.text.BertTextEncoder",
            "init_args": {"path": str(bert), "max_length": 16, "trainable": False}}
    return {"class_path": "tta.encoders.clap.network.CLAP",
            "init_args": {"audio_encoder": audio, "text_encoder": text, "joint_dim": joint_dim, "dropout": 0.0}}


def tiny_unet_config(retrieval: bool = False) -> dict[str, Any]:
    args: dict[str, Any] = {"in_channels": 4, "out_channels": 4, "model_channels": 16, "channel_mult": [1, 2],
                            "num_res_blocks": 1, "attention_resolutions": [2], "num_head_channels": 8,
                            "film_dim": CLAP_DIM, "num_groups": 8}
    if retrieval:
        args["context_dims"] = {"retrieval": CTX_DIM}
    return {"class_path": "tta.nn.unet.UNetModel", "init_args": args}


def build(config: dict[str, Any]) -> Any:
    from tta.training.loading import build_network

    return build_network(config)


def make_store_and_table(ids: list[str], out: Path, k: int = 4, seed: int = 0, audio_dim: int = 12,
                         text_dim: int = 10, audio_len: int = 3, text_len: int = 5) -> tuple[Path, Path]:
    """A feature store with random audio (``audio_len`` x ``audio_dim``) and text (``text_len`` x
    ``text_dim``, the last 2 positions masked) features per clip, and a neighbour table whose
    neighbours of clip i are the next k clips (never i itself)."""
    from tta.retrieval.features import FeatureStore
    from tta.retrieval.neighbours import NeighbourTable

    g = torch.Generator().manual_seed(seed)
    n = len(ids)
    text_mask = torch.ones(n, text_len, dtype=torch.bool)
    text_mask[:, text_len - 2:] = False
    FeatureStore.write(out / "features", ids, audio=torch.randn(n, audio_len, audio_dim, generator=g),
                       audio_mask=torch.ones(n, audio_len, dtype=torch.bool),
                       text=torch.randn(n, text_len, text_dim, generator=g), text_mask=text_mask)
    positions = np.array([[(i + j) % n for j in range(1, k + 1)] for i in range(n)], dtype=np.int64)
    scores = np.linspace(1, 0, k, dtype=np.float32)[None].repeat(n, 0)
    (out / "index").mkdir(parents=True, exist_ok=True)
    NeighbourTable(ids, ids, positions, scores, {}).save(out / "index")
    return out / "features", out / "index"


def write_checkpoint(module: Any, model_config: dict[str, Any], path: Path) -> Path:
    """A checkpoint as `tta fit` writes it (state dict + tta section + the run config)."""
    import yaml

    ckpt: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    ckpt["tta"]["config"] = yaml.safe_dump({"model": model_config})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def component_checkpoints(root: Path, mel: str = "audioldm", joint_dim: int = CLAP_DIM) -> tuple[Path, Path]:
    """Tiny `vae` (8 latent channels, on ``mel``) and `clap_trainer` (joint width ``joint_dim``)
    checkpoints with stored configs."""
    vae_net = tiny_vae_config()
    vae_net["init_args"].update(z_channels=8, embed_dim=8)
    vae_cfg = {"class_path": "tta.generators.vae.module.VAEModule", "init_args": {"autoencoder": vae_net, "mel": mel}}
    clap_cfg = {"class_path": "tta.encoders.clap.module.CLAPModule",
                "init_args": {"clap": tiny_clap_config(make_bert_folder(root / "bert"), joint_dim), "mel": "demo"}}
    paths = []
    for name, cfg in (("vae", vae_cfg), ("clap", clap_cfg)):
        paths.append(write_checkpoint(build_module(cfg), cfg, root / f"{name}.ckpt"))
    return paths[0], paths[1]


def build_module(config: dict[str, Any]) -> Any:
    from tta.training.loading import build_model

    return build_model(config)


# --------------------------------------------------------------------------- DreamAudio
def tiny_mrc_config(ctx_dim: int, latent: int = 4, **overrides: Any) -> dict[str, Any]:
    """A tiny `MRCUNet` over ``latent`` channels whose prompt and reference captions are ``ctx_dim`` wide."""
    args: dict[str, Any] = {"in_channels": latent, "out_channels": latent, "model_channels": 16, "channel_mult": [1, 2],
                            "num_res_blocks": 1, "attention_resolutions": [2], "num_head_channels": 8, "num_groups": 8,
                            "context_dims": {"prompt": ctx_dim}, "ref_context_dim": ctx_dim, **overrides}
    return {"class_path": "mrc_unet", "init_args": args}


def tiny_dreamaudio_config(t5: Path, ctx_dim: int, num_references: int = 3, reference_seconds: float = 1.0,
                           **overrides: Any) -> dict[str, Any]:
    """A ``dreamaudio`` model config: tiny MRC UNet and VAE (4 latent channels, factor 4, demo mel), the T5
    folder ``t5`` (width ``ctx_dim``) for the prompt and, shared, the reference captions."""
    vae = tiny_vae_config()
    vae["init_args"]["ch_mult"] = [1, 2, 2]  # latents 4 x frames/4 x 20: cheap attention over R
    init: dict[str, Any] = {
        "unet": tiny_mrc_config(ctx_dim), "vae": vae, "scale_factor": 1.0, "mel": "demo",
        "conditioners": {
            "prompt": {"class_path": "text_token_context",
                       "init_args": {"encoder": {"class_path": "t5_text",
                                                 "init_args": {"path": str(t5), "max_length": 8}}}},
            "refcap": {"class_path": "reference_captions", "init_args": {"dropout": 0.0}},
            "references": {"class_path": "reference_latents", "init_args": {"channels": 4, "dropout": 0.0}}},
        "cfg_dropout": {"prompt": 0.1}, "num_references": num_references, "reference_seconds": reference_seconds,
        "lr": 2e-3, **overrides}
    return {"class_path": "dreamaudio", "init_args": init}


def customized_manifest(base: Path, out: Path, refs: int = 3, n: int = 6, seconds: float = 2.0) -> Path:
    """A Customized-Concatenation set (``n`` items per split, ``refs`` references) of a 1-s-clip base manifest."""
    from tta.data.customize import CustomizeConfig, build_customized

    return build_customized(base, out, CustomizeConfig("concat", n=n, refs=refs, seconds=seconds, max_short=1.5,
                                                       sample_rate=22050))


def dreamaudio_overrides(path: Path, tmp_path: Path) -> list[str]:
    """CLI overrides pointing a DreamAudio config at a tiny VAE checkpoint (on its mel, its latent
    channels) and, for a Flan-T5 prompt encoder, a tiny T5 folder of the config's width (no width
    is overridden); the conditioners are given whole (a dict entry cannot be set by a dotted flag)."""
    import json

    import yaml

    from tests.hf_fixtures import make_t5_folder

    model = yaml.safe_load(path.read_text())["model"]["init_args"]
    vae, _ = component_checkpoints(tmp_path, mel=model["mel"])
    conditioners = model["conditioners"]
    encoder = conditioners["prompt"]["init_args"]["encoder"]
    if encoder["class_path"] == "t5_text":
        width = model["unet"]["init_args"]["context_dims"]["prompt"]
        encoder["init_args"]["path"] = str(make_t5_folder(tmp_path / "t5", d_model=width))
    return [f"--model.init_args.vae_checkpoint={vae}", "--model.init_args.conditioners=" + json.dumps(conditioners)]
