"""The `tta` command: list, argument resolution, configs, config stored in checkpoints."""

from __future__ import annotations

import json
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
    inline = preprocess_args(["fit", '--trainer.callbacks=[{"class_path": "eval_metrics", "init_args": {"n_clips": 2}}]',
                              "--model.init_args.unet.class_path=unet", "--model.init_args.vae",
                              "{class_path: mel_vae}", "--trainer.max_steps", "3", "--trainer.devices=[0, 1]"])
    assert json.loads(inline[1].partition("=")[2]) == [
        {"class_path": "tta.training.eval_callback.EvalMetricsCallback", "init_args": {"n_clips": 2}}]
    assert inline[2] == "--model.init_args.unet.class_path=tta.nn.unet.UNetModel"
    assert json.loads(inline[4]) == {"class_path": "tta.generators.vae.network.AutoencoderKL"}
    assert inline[5:] == ["--trainer.max_steps", "3", "--trainer.devices=[0, 1]"]  # untouched
    with pytest.raises(KeyError, match="registered names"):
        preprocess_args(["fit", '--trainer.callbacks=[{"class_path": "nope"}]'])
    with pytest.raises(KeyError, match="registered names"):
        preprocess_args(["fit", "--model", "nope"])


# Paper configs name local pretrained folders; the test points them at tiny random ones.
LOCAL_WEIGHTS = {"clap.yaml": ("--model.init_args.clap.init_args.text_encoder.init_args.path", "gpt2"),
                 "retrieval_features.yaml": ("--model.init_args.text_encoder.init_args.path", "t5")}


def ldm_widths(path: Path) -> dict[str, int]:
    """The interface widths an (Re-)AudioLDM config declares: ``film`` (its CLAP's joint width) and,
    with retrieval, the stored ``audio`` / ``text`` feature widths."""
    model = yaml.safe_load(path.read_text())["model"]["init_args"]
    widths = {"film": model["unet"]["init_args"]["film_dim"]}
    if model.get("retrieval"):
        retrieval = model["retrieval"]["init_args"]
        assert retrieval["audio_dim"] and retrieval["text_dim"], "paper configs give the feature widths"
        widths.update(audio=retrieval["audio_dim"], text=retrieval["text_dim"])
    return widths


def ldm_overrides(path: Path, tmp_path: Path, ids: list[str] | None = None) -> list[str]:
    """CLI overrides pointing an (Re-)AudioLDM config at tiny VAE / CLAP checkpoints and, for
    Re-AudioLDM, a feature store and neighbour table over ``ids`` (default: 12 made-up clips).
    The stand-ins have the widths the config declares (`ldm_widths`); no width is overridden
    (tests/test_recipes.py chains the real producers)."""
    from tests.ldm_fixtures import component_checkpoints, make_store_and_table

    model, widths = yaml.safe_load(path.read_text())["model"]["init_args"], ldm_widths(path)
    vae, clap = component_checkpoints(tmp_path, mel=model["mel"], joint_dim=widths["film"])
    out = [f"--model.init_args.vae_checkpoint={vae}", f"--model.init_args.clap_checkpoint={clap}"]
    if model.get("retrieval"):
        features, index = make_store_and_table(ids or [f"c{i}" for i in range(12)], tmp_path, k=10,
                                               audio_dim=widths["audio"], text_dim=widths["text"])
        out += [f"--model.init_args.retrieval.init_args.features={features}",
                f"--model.init_args.retrieval.init_args.index={index}"]
    if model.get("init_from"):  # the recipe chain: the plain config of the same directory trains the start point
        import torch

        from tta.cli import build_cli

        plain = path.with_name(path.name.replace("re_", "", 1))
        base = build_cli(["--config", str(plain), f"--trainer.default_root_dir={tmp_path}",
                          *ldm_overrides(plain, tmp_path)], run=False)
        torch.save({"state_dict": base.model.state_dict()}, tmp_path / "audioldm.ckpt")
        out.append(f"--model.init_args.init_from={tmp_path / 'audioldm.ckpt'}")
    return out


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=[str(p.relative_to(CONFIGS)) for p in ALL_CONFIGS])
def test_every_config_instantiates(path: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    overrides = []
    if path.name == "shard_cache.yaml":  # a shard folder to read (its models load at predict start)
        from tests.test_shards import _shard

        assert _shard(request.getfixturevalue("tiny_synth"), tmp_path / "shards") == 0
        overrides.append(f"--data.init_args.root={tmp_path / 'shards'}")
    if str(path.relative_to(CONFIGS)) in LOCAL_WEIGHTS:
        from tests.hf_fixtures import make_gpt2_folder, make_t5_folder

        flag, kind = LOCAL_WEIGHTS[str(path.relative_to(CONFIGS))]
        make_folder = {"gpt2": make_gpt2_folder, "t5": make_t5_folder}[kind]
        overrides.append(f"{flag}={make_folder(tmp_path / kind)}")
        overrides.append(flag.replace(".path", ".max_length") + "=32")  # the tiny model has 64 positions
    if "audioldm" in path.name:  # frozen VAE / CLAP checkpoints and the retrieval store, tiny stand-ins
        overrides += ldm_overrides(path, tmp_path)
    if "dreamaudio" in path.name:  # a frozen VAE checkpoint and the Flan-T5 folder, tiny stand-ins
        from tests.ldm_fixtures import dreamaudio_overrides

        overrides += dreamaudio_overrides(path, tmp_path)
    if path == CONFIGS / "clap_caption.yaml":  # a tiny GPT2 folder and CLAP checkpoint
        from tests.test_clap_caption import config_overrides

        overrides += config_overrides(tmp_path)
    if "vqgan_prior" in path.name:  # a VQGAN checkpoint of the paired VQGAN config, a tiny text folder
        from tests.test_vqgan_prior import config_overrides as prior_overrides

        overrides += prior_overrides(path, tmp_path)
    cli = build_cli(["--config", str(path), f"--trainer.default_root_dir={tmp_path}", *overrides], run=False)
    if path.name != "shard_cache.yaml":  # its model takes the datamodule's front-end at predict start
        assert cli.model.mel_config == cli.datamodule.mel_config
    assert cli.trainer is not None


def test_config_stored_in_checkpoint(tiny_synth: Path, tmp_path: Path) -> None:
    args = ["fit", "--config", str(CONFIGS / "demo" / "vae.yaml"), f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=1", "--trainer.limit_val_batches=1",
            ('--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
             '"init_args": {"every_n_train_steps": 1}}]'),
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
