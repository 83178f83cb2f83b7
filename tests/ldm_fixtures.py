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
                         text_dim: int = 10) -> tuple[Path, Path]:
    """A feature store with random audio (3 x ``audio_dim``) and text (5 x ``text_dim``) features per
    clip, and a neighbour table whose neighbours of clip i are the next k clips (never i itself)."""
    from tta.retrieval.features import FeatureStore
    from tta.retrieval.neighbours import NeighbourTable

    g = torch.Generator().manual_seed(seed)
    n = len(ids)
    text_mask = torch.ones(n, 5, dtype=torch.bool)
    text_mask[:, 3:] = False
    FeatureStore.write(out / "features", ids, audio=torch.randn(n, 3, audio_dim, generator=g),
                       audio_mask=torch.ones(n, 3, dtype=torch.bool), text=torch.randn(n, 5, text_dim, generator=g),
                       text_mask=text_mask)
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
