"""MelGAN (tta.vocoders.melgan): generator lengths for any hop, the multi-scale discriminator, the
training module's losses and a tiny overfit, the upstream-checkpoint importer, and resolution of a
trained checkpoint as a vocoder (tiny sizes, CPU)."""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from tests.conftest import CONFIGS
from tta import registry
from tta.data.mel import MelConfig, MelMismatchError
from tta.nn.gan_losses import feature_matching_loss
from tta.training.loading import build_model
from tta.utils.weights import WeightMismatchError
from tta.vocoders.factory import build_vocoder_from_config, vocoder_spec
from tta.vocoders.hifigan.importers import VocoderWeightsNotFoundError
from tta.vocoders.melgan.discriminators import MelGANMultiScaleDiscriminator
from tta.vocoders.melgan.generator import MelGANGenerator
from tta.vocoders.melgan.importers import OFFICIAL_MEL, load_melgan, read_official_args
from tta.vocoders.melgan.module import MelGANModule

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_GEN = {"n_mels": 80, "ratios": [8, 8, 2, 2], "ngf": 1, "n_residual_layers": 2}
TINY_MSD = {"num_scales": 3, "n_layers": 2, "channel_mult": 0.125}


# ---------------------------------------------------------------- generator


@pytest.mark.parametrize("ratios", [[8, 8, 2, 2], [5, 5, 4, 4], [3, 5, 2]], ids=["hop256", "hop400", "hop30_odd"])
def test_generator_output_is_frames_times_hop(ratios: list[int]) -> None:
    torch.manual_seed(0)
    gen = MelGANGenerator(n_mels=8, ratios=ratios, ngf=1, n_residual_layers=3)
    assert gen.hop_length == math.prod(ratios)
    frames = gen.min_frames + 1
    wav = gen(torch.randn(2, 8, frames))
    assert wav.shape == (2, frames * gen.hop_length) and wav.abs().max() <= 1.0
    # upstream widths: ngf * 2**len(ratios) after the first conv, halved per stage, 1x1 shortcuts
    assert gen.conv_pre.out_channels == 2 ** len(ratios) and gen.conv_post.in_channels == 1
    assert [u.dilation for u in gen.res_stacks[0]] == [1, 3, 9]
    assert gen.res_stacks[0][0].shortcut.kernel_size == (1,)


def _melgan_configs() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
        generator = (model.get("init_args") or {}).get("generator") or {}
        if generator.get("class_path") == "melgan_generator":
            found.append((path, model["init_args"]))
    return found


def test_every_config_generator_matches_its_mels() -> None:
    configs = _melgan_configs()
    assert {p.relative_to(CONFIGS).as_posix() for p, _ in configs} >= {"melgan.yaml", "demo/melgan.yaml"}
    for path, init_args in configs:
        mel = MelConfig.preset(init_args["mel"])
        gen = MelGANGenerator(**{**init_args["generator"]["init_args"], "ngf": 1}, mel_config=mel)
        wav = gen(torch.randn(1, mel.n_mels, 5))
        assert wav.shape == (1, 5 * mel.hop_length), path


def test_generator_weight_norm_init_args_and_errors() -> None:
    torch.manual_seed(0)
    gen = MelGANGenerator(**TINY_GEN, mel_config="demo").eval()
    assert gen.has_weight_norm and "conv_pre.parametrizations.weight.original0" in gen.state_dict()
    mel = torch.randn(1, 80, 4)
    before = gen(mel)
    gen.remove_weight_norm()
    assert not gen.has_weight_norm and "conv_pre.weight" in gen.state_dict()
    torch.testing.assert_close(gen(mel), before)
    args = gen.init_args()
    assert args == {**TINY_GEN, "log10_input": False, "use_weight_norm": False,
                    "mel_config": MelConfig.preset("demo").to_dict()}
    rebuilt = MelGANGenerator(**args)
    rebuilt.load_state_dict(gen.state_dict())
    torch.testing.assert_close(rebuilt.eval()(mel), before)
    with pytest.raises(ValueError, match="ratios must be a non-empty list of integers >= 2, got \\[8, 1\\]"):
        MelGANGenerator(ratios=[8, 1])
    with pytest.raises(ValueError, match="mel config 'vqgan' has hop_length 400, but the vocoder produces 256"):
        MelGANGenerator(**TINY_GEN, mel_config="vqgan")
    with pytest.raises(ValueError, match="needs at least 4 mel frames"):
        gen(torch.randn(1, 80, 3))
    with pytest.raises(ValueError, match="expects a log-mel of shape \\(B, 80, frames\\), got \\(1, 64, 8\\)"):
        gen(torch.randn(1, 64, 8))


# ---------------------------------------------------------------- discriminator


def test_multi_scale_discriminator_outputs() -> None:
    torch.manual_seed(0)
    msd = MelGANMultiScaleDiscriminator(**TINY_MSD)
    logits, fmaps = msd(torch.randn(2, 2048))
    # stride-4 layers: ceil(T / 4**n_layers) logits per scale; scales pool the waveform by 2
    assert [tuple(x.shape) for x in logits] == [(2, 128), (2, 64), (2, 32)]
    assert [len(f) for f in fmaps] == [4, 4, 4]  # conv k15, 2 strided convs, conv k5 (not the logits)
    assert fmaps[0][1].shape == (2, 8, 512) and fmaps[2][-1].shape == (2, 64, 32)  # ndf 2 -> 8 -> 32 -> x2
    assert registry.get("melgan_msd", "discriminator") is MelGANMultiScaleDiscriminator
    with pytest.raises(ValueError, match="num_scales must be >= 1"):
        MelGANMultiScaleDiscriminator(num_scales=0)


def test_paper_discriminator_widths() -> None:
    msd = MelGANMultiScaleDiscriminator()
    scale = msd.discriminators[0]
    convs = [*scale.convs, scale.conv_post]
    assert [c.out_channels for c in convs] == [16, 64, 256, 1024, 1024, 1024, 1]
    assert [c.groups for c in convs] == [1, 4, 16, 64, 256, 1, 1]
    assert [c.kernel_size[0] for c in convs] == [15, 41, 41, 41, 41, 5, 3]
    assert len(msd.discriminators) == 3 and msd.feature_matching_scale == pytest.approx(4 / 5 / 3)


# ---------------------------------------------------------------- module


def _module(**kwargs: Any) -> MelGANModule:
    torch.manual_seed(0)
    return MelGANModule(MelGANGenerator(**TINY_GEN), MelGANMultiScaleDiscriminator(**TINY_MSD), mel="demo", **kwargs)


def _batch(module: MelGANModule, frames: int = 16) -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    t = torch.arange(frames * 256) / 22050
    freqs = 200 + 800 * torch.rand(2, 1, generator=g)
    wav = 0.3 * torch.sin(2 * torch.pi * freqs * t) + 0.05 * torch.randn(2, frames * 256, generator=g)
    return {"id": ["a", "b"], "wav": wav, "mel": module.frontend(wav).detach()}


def _fit(module: L.LightningModule, batch: dict[str, Any], iterations: int, root: Path) -> list[dict[str, float]]:
    """Train ``iterations`` (discriminator + generator) steps on ``batch``; the metrics of each."""
    logged: list[dict[str, float]] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
            logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    L.Trainer(max_steps=2 * iterations, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
              callbacks=[Record()]).fit(module, train_dataloaders=DataLoader([batch] * iterations, batch_size=None))
    return logged


def test_paper_losses_and_optimiser(tmp_path: Path) -> None:
    module = _module()
    assert module.adversarial.name == "hinge" and module.mel_weight == 0.0 and module.grad_clip is None
    # official feature matching: lambda_feat 10 x 4 / (n_layers + 1) per layer x 1 / num_D
    assert module.fm_weight == pytest.approx(10 * 4 / 3 / 3)
    (opt_g, opt_d), _ = module.configure_optimizers()
    for opt in (opt_g, opt_d):
        group = opt.param_groups[0]
        assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-4, (0.5, 0.9), 0.0)
    assert {k.split(".")[0] for k in module.state_dict()} == {"generator", "msd"}
    assert registry.get("melgan", "module") is MelGANModule
    assert registry.get("melgan_generator", "vocoder") is MelGANGenerator
    with pytest.raises(TypeError, match="msd must be a MelGANMultiScaleDiscriminator, got Identity"):
        MelGANModule(MelGANGenerator(**TINY_GEN), nn.Identity(), mel="demo")
    logged = _fit(module, _batch(module), 1, tmp_path)[-1]
    assert logged["train/mel_l1"] > 0  # logged for monitoring, not optimised
    assert logged["train/gen"] == pytest.approx(logged["train/adv_msd"] + logged["train/fm_msd"], rel=1e-6)


def test_feature_matching_equals_the_official_weighting() -> None:
    module = _module()
    real, fake = module.msd(torch.randn(2, 1024))[1], module.msd(torch.randn(2, 1024))[1]
    n_layers, num_d = TINY_MSD["n_layers"], TINY_MSD["num_scales"]
    official = sum(1.0 / num_d * 4.0 / (n_layers + 1) * nn.functional.l1_loss(f, r)
                   for fs, rs in zip(fake, real) for f, r in zip(fs, rs))
    got = feature_matching_loss(real, fake, module.fm_weight)
    torch.testing.assert_close(got, 10.0 * official)


@pytest.mark.parametrize(("kwargs", "ratio"), [({}, 0.85), ({"mel_weight": 45.0, "lr": 2e-3}, 0.2)],
                         ids=["paper_losses", "with_mel_loss"])
def test_tiny_overfit_lowers_mel_l1(kwargs: dict[str, Any], ratio: float, tmp_path: Path) -> None:
    """30 iterations on one batch: hinge + feature matching alone pull the mel L1 down; the optional
    mel term much further (measured: 6.30 -> 4.7 and -> 0.64)."""
    module = _module(**kwargs)
    logged = _fit(module, _batch(module), 30, tmp_path)
    mel_l1 = [step["train/mel_l1"] for step in logged]
    assert len(mel_l1) == 30 and all(math.isfinite(v) for v in mel_l1)
    assert sum(mel_l1[-5:]) / 5 < ratio * mel_l1[0], mel_l1


def _checkpoint(tmp_path: Path) -> tuple[Path, MelGANModule]:
    config = {"class_path": "melgan", "init_args": {
        "generator": {"class_path": "melgan_generator", "init_args": TINY_GEN},
        "msd": {"class_path": "melgan_msd", "init_args": TINY_MSD}, "mel": "demo"}}
    torch.manual_seed(0)
    module = build_model(config)
    assert type(module) is MelGANModule
    ckpt: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    ckpt["tta"]["config"] = yaml.safe_dump({"model": config})
    torch.save(ckpt, tmp_path / "melgan.ckpt")
    return tmp_path / "melgan.ckpt", module


def test_checkpoint_resolves_as_vocoder_and_refuses_other_mels(tmp_path: Path) -> None:
    path, module = _checkpoint(tmp_path)
    voc, config = vocoder_spec(str(path), MelConfig.preset("demo"))
    assert isinstance(voc, MelGANGenerator) and not voc.training and not voc.has_weight_norm
    assert config["class_path"] == "tta.vocoders.melgan.generator.MelGANGenerator"
    rebuilt = build_vocoder_from_config(config)
    rebuilt.load_state_dict(voc.state_dict())
    mel = torch.randn(1, 80, 5)
    torch.testing.assert_close(rebuilt(mel), module.generator.eval()(mel))
    with pytest.raises(MelMismatchError, match="f_max: None != 8000.0"):
        vocoder_spec(str(path), MelConfig.preset("demo", f_max=None))


# ---------------------------------------------------------------- importer


class _OfficialUnit(nn.Module):
    """Upstream ``ResnetBlock`` layout: ``block`` (LeakyReLU, pad, conv k3, LeakyReLU, conv k1), ``shortcut``."""

    def __init__(self, ch: int, dilation: int) -> None:
        super().__init__()
        wn = nn.utils.weight_norm
        self.block = nn.Sequential(nn.LeakyReLU(0.2), nn.ReflectionPad1d(dilation),
                                   wn(nn.Conv1d(ch, ch, 3, dilation=dilation)), nn.LeakyReLU(0.2),
                                   wn(nn.Conv1d(ch, ch, 1)))
        self.shortcut = wn(nn.Conv1d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.block(x)


class _OfficialGenerator(nn.Module):
    """Upstream ``Generator(input_size, ngf, n_residual_layers)`` layout: one Sequential ``model``,
    old-style weight norm (``weight_g`` / ``weight_v``), ratios 8, 8, 2, 2; expects log10 mels."""

    def __init__(self, n_mels: int, ngf: int, n_res: int) -> None:
        super().__init__()
        wn = nn.utils.weight_norm
        ch = ngf * 16
        layers: list[nn.Module] = [nn.ReflectionPad1d(3), wn(nn.Conv1d(n_mels, ch, 7))]
        for r in (8, 8, 2, 2):
            layers += [nn.LeakyReLU(0.2), wn(nn.ConvTranspose1d(ch, ch // 2, 2 * r, r, padding=r // 2 + r % 2,
                                                                output_padding=r % 2))]
            ch //= 2
            layers += [_OfficialUnit(ch, 3**j) for j in range(n_res)]
        layers += [nn.LeakyReLU(0.2), nn.ReflectionPad1d(3), wn(nn.Conv1d(ch, 1, 7)), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.model(mel)


def _official_run(folder: Path, n_mels: int = 80, ngf: int = 1, n_res: int = 2) -> _OfficialGenerator:
    """A run folder as upstream writes it: ``best_netG.pt`` (state dict) and ``args.yml`` (a dumped Namespace)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        official = _OfficialGenerator(n_mels, ngf, n_res).eval()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(official.state_dict(), folder / "best_netG.pt")
    args = argparse.Namespace(save_path="logs/run", load_path=None, n_mel_channels=n_mels, ngf=ngf,
                              n_residual_layers=n_res, ndf=16, num_D=3, n_layers_D=4, downsamp_factor=4,
                              lambda_feat=10.0, cond_disc=False, data_path=Path("data/ljspeech"), batch_size=16,
                              seq_len=8192, epochs=3000, log_interval=100, save_interval=1000, n_test_samples=8)
    (folder / "args.yml").write_text(yaml.dump(args))
    return official


def test_importer_round_trip_matches_the_official_layout(tmp_path: Path) -> None:
    official = _official_run(tmp_path / "run")
    state = official.state_dict()
    assert {"model.1.weight_g", "model.4.block.2.weight_v", "model.5.shortcut.bias", "model.20.weight_v"} <= set(state)
    text = (tmp_path / "run" / "args.yml").read_text()
    assert text.startswith("!!python/object:argparse.Namespace")
    assert read_official_args(tmp_path / "run" / "args.yml")["ngf"] == 1
    mel_ln = torch.randn(2, 80, 6)
    with torch.no_grad():
        expected = official(mel_ln / math.log(10.0))[:, 0]  # upstream is fed log10 mels
    for inference in (True, False):
        gen = load_melgan(tmp_path / "run", inference=inference)
        assert not gen.training and gen.has_weight_norm is (not inference)
        assert gen.mel_config == OFFICIAL_MEL and gen.config["n_residual_layers"] == 2  # from args.yml
        with torch.no_grad():
            torch.testing.assert_close(gen(mel_ln), expected)
    # a checkpoint file without args.yml: the architecture given by the caller
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "netG.pt").write_bytes((tmp_path / "run" / "best_netG.pt").read_bytes())
    gen = load_melgan(tmp_path / "bare" / "netG.pt", ngf=1, n_residual_layers=2)
    torch.testing.assert_close(gen(mel_ln), expected)


def test_importer_is_strict(tmp_path: Path) -> None:
    official = _official_run(tmp_path / "run")
    state = official.state_dict()
    torch.save({**state, "model.26.weight": torch.zeros(1)}, tmp_path / "run" / "best_netG.pt")
    with pytest.raises(WeightMismatchError, match="unexpected.*model.26.weight"):
        load_melgan(tmp_path / "run")
    torch.save({k: v for k, v in state.items() if k != "model.7.weight_g"}, tmp_path / "run" / "best_netG.pt")
    with pytest.raises(WeightMismatchError, match="best_netG.pt.*missing.*ups.1.parametrizations.weight.original0"):
        load_melgan(tmp_path / "run")
    torch.save(state, tmp_path / "run" / "best_netG.pt")
    with pytest.raises(ValueError, match="args.yml: ngf is 1, but ngf=32 was given"):
        load_melgan(tmp_path / "run", ngf=32)
    with pytest.raises(ValueError, match="mel config 'vqgan' has hop_length 400"):
        load_melgan(tmp_path / "run", mel_config="vqgan")
    bare = tmp_path / "bare"  # no args.yml: upstream's defaults (ngf 32, 3 residual layers) do not fit
    bare.mkdir()
    torch.save(state, bare / "netG.pt")
    with pytest.raises(WeightMismatchError, match="missing.*res_stacks.0.2"):
        load_melgan(bare)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VocoderWeightsNotFoundError, match="no MelGAN generator checkpoint .* in .*empty"):
        load_melgan(tmp_path / "empty")
