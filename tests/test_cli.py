"""The `tta` command: list, argument resolution, configs, config stored in checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import CONFIGS
from tta.cli import build_cli, main, preprocess_args

ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))


def test_list_prints_components(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("vae", "hifigan", "mel_vae", "audio", "griffinlim", "demo_audio"):
        assert name in out


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_preprocess_resolves_names(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"class_path": "vae"}}))
    args = preprocess_args(["fit", "--config", str(cfg), "--model=vae", "--data", "audio"])
    assert yaml.safe_load(args[2])["model"]["class_path"] == "tta.generators.vae.module.VAEModule"
    assert args[3:] == ["--model", "tta.generators.vae.module.VAEModule", "--data",
                        "tta.data.datamodule.AudioDataModule"]
    with pytest.raises(FileNotFoundError, match="config file not found"):
        preprocess_args(["fit", "--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(KeyError, match="registered names"):
        preprocess_args(["fit", "--model", "nope"])


# Paper configs name local pretrained folders; the test points them at tiny random ones.
LOCAL_WEIGHTS = {"clap.yaml": ("--model.init_args.clap.init_args.text_encoder.init_args.path", "gpt2")}


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=[str(p.relative_to(CONFIGS)) for p in ALL_CONFIGS])
def test_every_config_instantiates(path: Path, tmp_path: Path) -> None:
    overrides = []
    if str(path.relative_to(CONFIGS)) in LOCAL_WEIGHTS:
        from tests.hf_fixtures import make_gpt2_folder

        flag, kind = LOCAL_WEIGHTS[str(path.relative_to(CONFIGS))]
        assert kind == "gpt2"
        overrides.append(f"{flag}={make_gpt2_folder(tmp_path / kind)}")
        overrides.append(flag.replace(".path", ".max_length") + "=32")  # the tiny model has 64 positions
    cli = build_cli(["--config", str(path), f"--trainer.default_root_dir={tmp_path}", *overrides], run=False)
    assert cli.model.mel_config == cli.datamodule.mel_config
    assert cli.trainer is not None


def test_config_stored_in_checkpoint(tiny_synth: Path, tmp_path: Path) -> None:
    args = ["fit", "--config", str(CONFIGS / "demo" / "vae.yaml"), f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=1", "--trainer.limit_val_batches=1", 
            '--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
            '"init_args": {"every_n_train_steps": 1}}]',
            "--trainer.enable_progress_bar=false", f"--data.init_args.manifest={tiny_synth}",
            "--data.init_args.batch_size=2", "--data.init_args.segment_seconds=0.5",
            "--model.init_args.autoencoder.init_args.ch=8"]
    assert main(args) == 0
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts, "no checkpoint written"
    ck = torch.load(ckpts[0], weights_only=True)
    stored = yaml.safe_load(ck["tta"]["config"])
    assert stored["model"]["class_path"] == "tta.generators.vae.module.VAEModule"
    assert stored["model"]["init_args"]["autoencoder"]["init_args"]["ch"] == 8
    assert stored["data"]["init_args"]["manifest"] == str(tiny_synth)


def test_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(CONFIGS / "demo" / "vae.yaml"), "--print_config"])
    assert exc.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["mel"] == "demo"


def test_load_trained_rebuilds_module_from_checkpoint(tiny_synth: Path, tmp_path: Path) -> None:
    from tta.training.loading import CheckpointConfigError, load_trained

    args = ["fit", "--config", str(CONFIGS / "demo" / "vae.yaml"), f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            '--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
            '"init_args": {"every_n_train_steps": 2, "dirpath": "' + str(tmp_path / "ck") + '"}}]',
            f"--data.init_args.manifest={tiny_synth}", "--data.init_args.batch_size=2",
            "--data.init_args.segment_seconds=0.5", "--model.init_args.autoencoder.init_args.ch=8"]
    assert main(args) == 0
    path = next((tmp_path / "ck").glob("*.ckpt"))
    model = load_trained(path)
    ck = torch.load(path, weights_only=True)
    assert not model.training and model.batches_trained == 2
    for k, v in ck["state_dict"].items():
        assert torch.equal(model.state_dict()[k], v), k
    ema_model = load_trained(path, use_ema=True)
    assert ema_model.ema.num_updates == 2
    del ck["tta"]["config"]
    torch.save(ck, tmp_path / "noconfig.ckpt")
    with pytest.raises(CheckpointConfigError, match="not written by `tta fit`"):
        load_trained(tmp_path / "noconfig.ckpt")
