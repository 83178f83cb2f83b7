"""Shared fixtures: an isolated cache directory and tiny data/model builders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tta" / "configs"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never write synthetic data or caches into the user's home during tests."""
    monkeypatch.setenv("TTA_CACHE", str(tmp_path_factory.getbasetemp() / "tta_cache"))


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One intra-op thread: faster for tiny networks and immune to a loaded machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset at the demo preset's 22.05 kHz (manifest path)."""
    from tta.data.synth import ensure_synth

    return ensure_synth(tmp_path_factory.mktemp("synth"), n=40, seed=0, sample_rate=22050, duration=1.0)


@pytest.fixture(scope="session")
def trained_ckpt(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step `tta fit` of a tiny AudioLDM on `tiny_synth` (demo mel): its last checkpoint."""
    import yaml

    from tests.hf_fixtures import make_bert_folder
    from tests.ldm_fixtures import tiny_clap_config, tiny_unet_config, tiny_vae_config
    from tta.cli import main

    root = tmp_path_factory.mktemp("ldm")
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "limit_val_batches": 1,
                    "val_check_interval": 2, "check_val_every_n_epoch": None, "logger": False,
                    "enable_progress_bar": False, "default_root_dir": str(root),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(root / "ckpt"), "save_last": True}}]},
        "model": {"class_path": "latent_diffusion",
                  "init_args": {"unet": tiny_unet_config(), "vae": tiny_vae_config(), "scale_factor": 1.0,
                                "clap": tiny_clap_config(make_bert_folder(root / "bert")), "mel": "demo",
                                "ema_decay": 0.99}},
        "data": {"class_path": "audio", "init_args": {"manifest": str(tiny_synth), "mel": "demo",
                                                       "segment_seconds": 0.75, "batch_size": 4}},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0
    return root / "ckpt" / "last.ckpt"
