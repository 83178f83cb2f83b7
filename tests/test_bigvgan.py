"""BigVGAN: Snake activations, anti-aliasing, generator shapes, MRD, training, exact resume and the
importer of NVIDIA's published layout (tiny sizes, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from tests.conftest import CONFIGS
from tests.test_vae_module import Crash, trainer
from tta import registry
from tta.data.datamodule import AudioDataModule
from tta.data.mel import PRESETS, MelConfig, MelMismatchError
from tta.utils.weights import WeightMismatchError
from tta.vocoders.bigvgan.activations import AntiAliasActivation, Snake, SnakeBeta, kaiser_sinc_filter
from tta.vocoders.bigvgan.discriminators import MultiResolutionDiscriminator
from tta.vocoders.bigvgan.generator import BigVGANGenerator
from tta.vocoders.bigvgan.importers import check_mel_matches, load_bigvgan, mel_config_from_bigvgan
from tta.vocoders.bigvgan.module import BigVGANModule
from tta.vocoders.factory import build_vocoder_from_config, vocoder_config
from tta.vocoders.hifigan.discriminators import MultiPeriodDiscriminator
from tta.vocoders.hifigan.importers import VocoderWeightsNotFoundError, tta_to_original_state_dict

pytestmark = pytest.mark.usefixtures("single_thread")

BIGVGAN_CONFIGS = ["bigvgan.yaml", "bigvgan_22k.yaml", "demo/bigvgan.yaml"]


# ------------------------------------------------------------------------------------ activations
def test_snake_and_snakebeta_exact_values() -> None:
    x = torch.tensor([[[1.0, -0.5, 2.0]], [[0.0, 3.0, -1.0]]]).expand(2, 2, 3).contiguous()  # (B=2, C=2, T=3)
    alpha, beta = [2.0, 0.5], [4.0, 0.25]
    expected_snake = [[x_ + math.sin(a * x_) ** 2 / a for x_ in row] for row, a in zip(x[0].tolist(), alpha)]
    expected_beta = [[x_ + math.sin(a * x_) ** 2 / b for x_ in row] for row, a, b in zip(x[0].tolist(), alpha, beta)]
    for logscale in (False, True):
        snake, snake_beta = Snake(2, logscale=logscale), SnakeBeta(2, logscale=logscale)
        init = 0.0 if logscale else 1.0  # logs of 1, or 1 itself
        assert snake.alpha.tolist() == [init, init] and snake_beta.beta.tolist() == [init, init]
        encode = (lambda v: [math.log(u) for u in v]) if logscale else (lambda v: v)
        with torch.no_grad():
            snake.alpha.copy_(torch.tensor(encode(alpha)))
            snake_beta.alpha.copy_(torch.tensor(encode(alpha)))
            snake_beta.beta.copy_(torch.tensor(encode(beta)))
        torch.testing.assert_close(snake(x)[0], torch.tensor(expected_snake), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(snake_beta(x)[0], torch.tensor(expected_beta), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(snake(x)[1, 0], torch.tensor([0.0, 3.0 + math.sin(6.0) ** 2 / 2, -1.0 +
                                                                 math.sin(-2.0) ** 2 / 2]), rtol=1e-6, atol=1e-6)
    assert SnakeBeta(3).alpha.requires_grad and SnakeBeta(3).beta.shape == (3,)


def test_kaiser_sinc_filter_design() -> None:
    taps = kaiser_sinc_filter(0.25, 0.3, 12)
    assert taps.shape == (1, 1, 12)
    assert float(taps.sum()) == pytest.approx(1.0, abs=1e-6)  # unit DC gain
    torch.testing.assert_close(taps.flip(-1), taps)  # symmetric: linear phase, centred between taps 5 and 6
    response = torch.fft.rfft(taps[0, 0], 1024).abs()
    assert float(response[int(0.25 * 1024)]) == pytest.approx(0.5, abs=0.01)  # -6 dB at the cutoff
    assert float(response[int(0.4 * 1024):].max()) < 3e-3  # stop band from 0.4 cycles/sample: < -50 dB
    with pytest.raises(ValueError, match="cutoff must be in"):
        kaiser_sinc_filter(0.6, 0.3, 12)


def _folded_harmonic_energy(y: torch.Tensor, freqs: list[float]) -> float:
    """Energy of ``y`` within 3 bins of each frequency (cycles/sample), edges trimmed, Hann window."""
    y = y[512:-512]
    spec = torch.fft.rfft((y - y.mean()) * torch.hann_window(len(y), periodic=False)).abs() ** 2
    f = torch.fft.rfftfreq(len(y))
    mask = torch.zeros_like(f, dtype=torch.bool)
    for freq in freqs:
        mask |= (f - freq).abs() <= 3 / len(y)
    return float(spec[mask].sum())


def test_anti_aliased_snake_suppresses_folded_harmonics() -> None:
    """Snake's ``sin^2`` adds even harmonics of a tone; those above Nyquist fold back (aliases).
    A tone at 0.23 of the sample rate has 2 f0 = 0.46 in band and 4 f0, 6 f0, ... folded to 0.08,
    0.38, 0.16, ...: measured on the output spectrum, the anti-aliased Snake leaves ~2900x less
    energy there than the plain one, and passes the tone itself unchanged (within 10 %)."""
    n, f0 = 8192, 0.23
    x = torch.sin(2 * math.pi * f0 * torch.arange(n, dtype=torch.float32))[None, None]
    folded = [abs(k * f0 - round(k * f0)) for k in range(4, 13, 2)]  # 4 f0 .. 12 f0, all above 0.5
    snake = Snake(1)
    with torch.no_grad():
        plain, anti_aliased = snake(x)[0, 0], AntiAliasActivation(snake)(x)[0, 0]
    alias_plain = _folded_harmonic_energy(plain, folded)
    alias_aa = _folded_harmonic_energy(anti_aliased, folded)
    tone_plain, tone_aa = _folded_harmonic_energy(plain, [f0]), _folded_harmonic_energy(anti_aliased, [f0])
    assert alias_plain > 1e-3 * tone_plain  # the plain activation does alias (~ -23 dB below the tone)
    assert alias_plain / alias_aa > 500
    assert tone_aa / tone_plain == pytest.approx(1.0, abs=0.1)


def test_anti_aliased_activation_keeps_length_and_layout() -> None:
    act = AntiAliasActivation(SnakeBeta(3, logscale=True))
    assert list(act.state_dict()) == ["act.alpha", "act.beta", "upsample.filter", "downsample.lowpass.filter"]
    for t in (1, 7, 64):
        assert act(torch.randn(2, 3, t)).shape == (2, 3, t)
    x = torch.full((1, 3, 40), 0.3)  # a constant passes at unit gain (replicate padding, unit-sum taps)
    torch.testing.assert_close(act(x), act.act(x), rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------------- generator
def _tiny_generator_args(path: str) -> tuple[dict[str, Any], str]:
    """The generator init_args of a BigVGAN config at tiny width, and its mel preset."""
    model = yaml.safe_load((CONFIGS / path).read_text())["model"]
    args = dict(model["init_args"]["generator"]["init_args"])
    args.update(upsample_initial_channel=2 ** len(args["upsample_rates"]), resblock_kernel_sizes=[3],
                resblock_dilation_sizes=[[1, 3]])
    return args, model["init_args"]["mel"]


@pytest.mark.parametrize("path", BIGVGAN_CONFIGS)
def test_every_config_generator_outputs_frames_times_hop(path: str) -> None:
    args, mel = _tiny_generator_args(path)
    preset = PRESETS[mel]
    torch.manual_seed(0)
    gen = BigVGANGenerator(**args, mel_config=mel)
    assert gen.hop_length == math.prod(args["upsample_rates"]) == preset.hop_length and gen.n_mels == preset.n_mels
    for frames in (1, 5):
        wav = gen(torch.randn(2, preset.n_mels, frames))
        assert wav.shape == (2, frames * preset.hop_length)
        assert wav.abs().max() <= 1.0 and torch.isfinite(wav).all()


def test_generator_options_weight_norm_and_errors() -> None:
    torch.manual_seed(0)
    args = {"n_mels": 8, "upsample_rates": [4, 3], "upsample_kernel_sizes": [8, 6], "upsample_initial_channel": 8,
            "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 2]]}
    v2 = BigVGANGenerator(**args, resblock="2", activation="snake", snake_logscale=False, use_tanh_at_final=False,
                          use_bias_at_final=False)
    assert v2.conv_post.bias is None and isinstance(v2.activation_post.act, Snake)
    assert len(v2.resblocks[0].activations) == 2 and not hasattr(v2.resblocks[0], "convs2")
    with torch.no_grad():
        v2.conv_post.parametrizations.weight.original0.fill_(100.0)  # a large output: clamped, not tanh'ed
    mel = torch.randn(1, 8, 4)
    wav = v2(mel)
    assert wav.shape == (1, 48) and wav.abs().max() == 1.0 and (wav.abs() == 1.0).any()
    before = v2(mel)
    v2.remove_weight_norm()
    assert not v2.has_weight_norm and "conv_pre.weight" in v2.state_dict()
    torch.testing.assert_close(v2(mel), before, rtol=1e-5, atol=1e-6)
    rebuilt = build_vocoder_from_config(vocoder_config(v2))
    rebuilt.load_state_dict(v2.state_dict())
    torch.testing.assert_close(rebuilt(mel), v2(mel))
    with pytest.raises(ValueError, match="activation must be one of \\['snake', 'snakebeta'\\], got 'relu'"):
        BigVGANGenerator(**args, activation="relu")
    with pytest.raises(ValueError, match="upsample kernel 2 must be >= its rate 3"):
        BigVGANGenerator(**{**args, "upsample_kernel_sizes": [8, 2]})
    with pytest.raises(ValueError, match="divisible by 2\\*\\*2"):
        BigVGANGenerator(**{**args, "upsample_initial_channel": 6})
    with pytest.raises(ValueError, match="expects a log-mel of shape \\(B, 8, frames\\)"):
        v2(torch.randn(1, 9, 4))
    assert registry.get("bigvgan_generator", "vocoder") is BigVGANGenerator


# ---------------------------------------------------------------------------------- discriminator
def test_multi_resolution_discriminator_interface() -> None:
    mrd = MultiResolutionDiscriminator(channel_mult=0.125)
    assert mrd.resolutions == [[1024, 120, 600], [2048, 240, 1200], [512, 50, 240]]
    assert mrd.discriminators[0].convs[0].out_channels == 4
    logits, fmaps = mrd(torch.randn(2, 4800))
    assert len(logits) == len(fmaps) == 3 and all(len(f) == 6 for f in fmaps)
    for (n_fft, hop, _), logit, fmap in zip(mrd.resolutions, logits, fmaps):
        frames, bins = 4800 // hop, n_fft // 2 + 1
        assert fmap[0].shape == (2, 4, bins, frames)  # (B, C, freq, time): time strided by 2 three times
        assert fmap[-1].shape[2:] == (bins, math.ceil(math.ceil(math.ceil(frames / 2) / 2) / 2))
        assert logit.shape == (2, fmap[-1][0].numel())
    with pytest.raises(ValueError, match="has 800 samples, it needs more than 904"):
        mrd(torch.randn(2, 800))
    assert registry.get("bigvgan_mrd", "discriminator") is MultiResolutionDiscriminator


# ------------------------------------------------------------------------------------ the module
def _tiny_module(**kwargs: Any) -> BigVGANModule:
    torch.manual_seed(0)
    gen = BigVGANGenerator(n_mels=80, upsample_rates=[8, 8, 4], upsample_kernel_sizes=[16, 16, 8],
                           upsample_initial_channel=16, resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]])
    return BigVGANModule(gen, MultiPeriodDiscriminator(periods=(2, 3), channel_mult=0.0625),
                         MultiResolutionDiscriminator(resolutions=[[512, 50, 240], [1024, 120, 600]],
                                                      channel_mult=0.125), mel="demo", **kwargs)


def test_module_defaults_are_bigvgans() -> None:
    module = _tiny_module()
    assert module.discriminator_names == ("mpd", "mrd") and module.adversarial.name == "lsgan"
    assert (module.mel_weight, module.fm_weight, module.lr, module.betas) == (45.0, 2.0, 1e-4, (0.8, 0.99))
    assert {k.split(".")[0] for k in module.state_dict()} == {"generator", "mpd", "mrd"}
    assert registry.get("bigvgan", "module") is BigVGANModule


def test_tiny_overfit_lowers_mel_l1(tmp_path: Path) -> None:
    """16 full BigVGAN steps (both discriminators on from the start) on one fixed batch more than
    halve the mel L1 (measured: 1.98 -> 0.91)."""
    module = _tiny_module(lr=2e-3)
    g = torch.Generator().manual_seed(7)
    t = torch.arange(16 * 256) / 22050
    wav = 0.3 * torch.sin(2 * torch.pi * (200 + 800 * torch.rand(2, 1, generator=g)) * t)
    batch = {"id": ["a", "b"], "wav": wav, "mel": module.frontend(wav).detach()}

    def mel_l1() -> float:
        with torch.no_grad():
            return float(module._mel_l1(batch["wav"], module.generator(batch["mel"])))

    before = mel_l1()
    discs = [p.detach().clone() for p in module._discriminator_parameters()]
    trainer(tmp_path, max_steps=32).fit(module, train_dataloaders=DataLoader([batch] * 16, batch_size=None))
    assert module.batches_trained == 16
    assert all(not torch.equal(a, b) for a, b in zip(discs, module._discriminator_parameters()) if a.dim() > 1)
    after = mel_l1()
    assert after < 0.6 * before, (before, after)


class _LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[tuple[float, float, float]] = []
        self.ids: list[list[str]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        m = trainer.callback_metrics
        self.losses.append((float(m["train/gen"]), float(m["train/disc"]), float(m["train/mel_l1"])))
        self.ids.append(list(batch["id"]))


def test_exact_resume_of_both_optimizers(tiny_synth: Path, tmp_path: Path) -> None:
    """Crash at batch 5 (checkpoint after batch 3), resume: batches 4..6 equal an uninterrupted run."""
    def dm() -> AudioDataModule:
        return AudioDataModule(manifest=str(tiny_synth), mel="demo", segment_seconds=0.25, batch_size=2, seed=0)

    steps = 12  # Lightning counts the discriminator and the generator step: 6 batches
    ref = _LossRecorder()
    module = _tiny_module(lr=1e-3)
    trainer(tmp_path / "ref", max_steps=steps, callbacks=[ref]).fit(module, datamodule=dm())
    assert len(ref.losses) == 6 and module.batches_trained == 6

    ckpt_dir = tmp_path / "ckpt"
    first = _LossRecorder()
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=6, save_top_k=-1, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path / "a", max_steps=steps, callbacks=[first, ckpt, Crash(at=5)],
                enable_checkpointing=True).fit(_tiny_module(lr=1e-3), datamodule=dm())
    assert first.losses == ref.losses[:4]
    stored = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert stored["tta"]["counters"]["batches_trained"] == 3 and len(stored["optimizer_states"]) == 2

    second = _LossRecorder()
    resumed = _tiny_module(lr=1e-3)
    trainer(tmp_path / "b", max_steps=steps, callbacks=[second]).fit(resumed, datamodule=dm(),
                                                                     ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert second.ids == ref.ids[3:]
    assert sum(second.losses, ()) == pytest.approx(sum(ref.losses[3:], ()), rel=1e-6, abs=1e-6)
    for a, b in zip(resumed.parameters(), module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------- importer
TINY_NVIDIA_CONFIG = {
    "resblock": "1", "num_gpus": 0, "batch_size": 4, "learning_rate": 0.0001, "adam_b1": 0.8, "adam_b2": 0.99,
    "lr_decay": 0.9999996, "seed": 1234,
    "upsample_rates": [4, 4], "upsample_kernel_sizes": [8, 8], "upsample_initial_channel": 16,
    "resblock_kernel_sizes": [3, 5], "resblock_dilation_sizes": [[1, 3], [1, 3]],
    "use_tanh_at_final": False, "use_bias_at_final": False, "activation": "snakebeta", "snake_logscale": True,
    "use_cqtd_instead_of_mrd": True, "cqtd_filters": 128, "cqtd_max_filters": 1024, "cqtd_filters_scale": 1,
    "cqtd_dilations": [1, 2, 4], "cqtd_hop_lengths": [512, 256, 256], "cqtd_n_octaves": [9, 9, 9],
    "cqtd_bins_per_octaves": [24, 36, 48], "mpd_reshapes": [2, 3, 5, 7, 11], "use_spectral_norm": False,
    "discriminator_channel_mult": 1, "use_multiscale_melloss": True, "lambda_melloss": 15, "clip_grad_norm": 500,
    "segment_size": 65536, "num_mels": 8, "num_freq": 33, "n_fft": 64, "hop_size": 16, "win_size": 64,
    "sampling_rate": 8000, "fmin": 0, "fmax": None, "fmax_for_loss": None, "num_workers": 4,
    "dist_config": {"dist_backend": "nccl", "dist_url": "tcp://localhost:54321", "world_size": 1},
    "use_cuda_kernel": False,
}


def _nvidia_keys(config: dict[str, Any]) -> set[str]:
    """The state-dict keys of NVIDIA's ``BigVGAN(h)`` (old-style weight norm), written out by hand."""
    wn = ("weight_g", "weight_v", "bias")

    def act(prefix: str) -> list[str]:
        params = ["alpha", "beta"] if config["activation"] == "snakebeta" else ["alpha"]
        return [f"{prefix}.act.{p}" for p in params] + [f"{prefix}.upsample.filter",
                                                        f"{prefix}.downsample.lowpass.filter"]

    keys = [f"conv_pre.{w}" for w in wn]
    n_dil = len(config["resblock_dilation_sizes"][0])
    for i in range(len(config["upsample_rates"])):
        keys += [f"ups.{i}.0.{w}" for w in wn]
    for b in range(len(config["upsample_rates"]) * len(config["resblock_kernel_sizes"])):
        for j in range(n_dil):
            keys += [f"resblocks.{b}.convs1.{j}.{w}" for w in wn] + [f"resblocks.{b}.convs2.{j}.{w}" for w in wn]
        for j in range(2 * n_dil):
            keys += act(f"resblocks.{b}.activations.{j}")
    keys += act("activation_post")
    keys += ["conv_post.weight_g", "conv_post.weight_v"] + (["conv_post.bias"] if config["use_bias_at_final"] else [])
    return set(keys)


def _reference() -> BigVGANGenerator:
    torch.manual_seed(0)
    gen = BigVGANGenerator.from_config_dict(TINY_NVIDIA_CONFIG).eval()
    with torch.no_grad():
        for p in gen.parameters():  # larger than the init (and non-zero Snake logs), so outputs are not trivial
            p.normal_(0.0, 0.3)
    return gen


def _write(folder: Path, state: dict[str, torch.Tensor], config: dict[str, Any] = TINY_NVIDIA_CONFIG) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({"generator": state}, folder / "bigvgan_generator.pt")
    return folder


def test_importer_round_trip_in_nvidia_layout(tmp_path: Path) -> None:
    ref = _reference()
    state = tta_to_original_state_dict(ref.state_dict())
    assert set(state) == _nvidia_keys(TINY_NVIDIA_CONFIG)
    assert state["ups.0.0.weight_g"].shape == (16, 1, 1) and state["conv_pre.weight_g"].shape == (16, 1, 1)
    assert state["resblocks.0.activations.0.upsample.filter"].shape == (1, 1, 12)
    folder = _write(tmp_path / "v2", state)
    mel = torch.randn(2, 8, 6)
    with torch.no_grad():
        expected = ref(mel)
        trainable = load_bigvgan(folder, inference=False)
        assert trainable.has_weight_norm and not trainable.training
        assert torch.equal(trainable(mel), expected)  # the same parametrisation: bit-identical
        gen = load_bigvgan(folder)
        assert not gen.has_weight_norm and not gen.training
        torch.testing.assert_close(gen(mel), expected, rtol=0, atol=1e-5)
    assert expected.abs().max() > 0.05 and gen.conv_post.bias is None
    cfg = gen.mel_config
    assert (cfg.sample_rate, cfg.n_fft, cfg.win_length, cfg.hop_length, cfg.n_mels, cfg.f_min, cfg.f_max) == (
        8000, 64, 64, 16, 8, 0.0, 4000.0)  # fmax null = Nyquist
    wanted = MelConfig(sample_rate=8000, n_fft=64, win_length=64, hop_length=16, n_mels=8, f_max=4000.0, name="tiny")
    assert load_bigvgan(folder, mel_config=wanted).mel_config is wanted


def test_importer_refuses_missing_extra_and_tampered_keys(tmp_path: Path) -> None:
    state = tta_to_original_state_dict(_reference().state_dict())
    missing = {k: v for k, v in state.items() if k != "resblocks.1.activations.2.act.beta"}
    with pytest.raises(WeightMismatchError, match=r"missing keys \(1\): resblocks\.1\.activations\.2\.act\.beta"):
        load_bigvgan(_write(tmp_path / "missing", missing))
    extra = {**state, "resblocks.0.activations.0.act.gamma": torch.zeros(8)}
    with pytest.raises(WeightMismatchError, match=r"unexpected keys \(1\): resblocks\.0\.activations\.0\.act\.gamma"):
        load_bigvgan(_write(tmp_path / "extra", extra))
    tampered = {**state, "activation_post.downsample.lowpass.filter": torch.full((1, 1, 12), 1 / 12)}
    with pytest.raises(ValueError, match="resampling filter 'activation_post.downsample.lowpass.filter' differs"):
        load_bigvgan(_write(tmp_path / "tampered", tampered))
    with pytest.raises(ValueError, match=r"config\.json: .*unknown architecture keys \['snake_alpha_init'\]"):
        load_bigvgan(_write(tmp_path / "arch", state, {**TINY_NVIDIA_CONFIG, "snake_alpha_init": 2.0}))
    with pytest.raises(ValueError, match=r"hop_size 32 != product of upsample_rates \[4, 4\] = 16"):
        load_bigvgan(_write(tmp_path / "hop", state, {**TINY_NVIDIA_CONFIG, "hop_size": 32}))
    with pytest.raises(ValueError, match=r"expected \{'generator': state_dict\}"):
        torch.save(state, _write(tmp_path / "flat", state) / "bigvgan_generator.pt")
        load_bigvgan(tmp_path / "flat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VocoderWeightsNotFoundError, match="no bigvgan_generator.pt in"):
        load_bigvgan(tmp_path / "empty")


def test_importer_refuses_other_mels_by_name(tmp_path: Path) -> None:
    folder = _write(tmp_path / "v2", tta_to_original_state_dict(_reference().state_dict()))
    other = MelConfig(sample_rate=8000, n_fft=64, win_length=64, hop_length=16, n_mels=8, f_max=3000.0, name="tiny")
    with pytest.raises(MelMismatchError, match=r"config\.json: .*other mels than 'tiny': fmax 4000\.0 != 3000\.0"):
        load_bigvgan(folder, mel_config=other)
    with pytest.raises(MelMismatchError, match="sampling_rate 8000 != 22050 .*; n_fft 64 != 1024 .*hop_size 16 != 256"):
        load_bigvgan(folder, mel_config="demo")
    missing = {k: v for k, v in TINY_NVIDIA_CONFIG.items() if k != "win_size"}
    with pytest.raises(ValueError, match=r"missing mel keys \['win_size'\]"):
        load_bigvgan(_write(tmp_path / "nowin", {}, missing))


def test_published_22khz_mels_map_onto_presets() -> None:
    """bigvgan_base_22khz_80band (fmax 8000) uses the demo mels; the v2 22 kHz release (fmax null) does not."""
    base = {"sampling_rate": 22050, "n_fft": 1024, "hop_size": 256, "win_size": 1024, "num_mels": 80, "fmin": 0,
            "fmax": 8000}
    assert mel_config_from_bigvgan(base, "base") == PRESETS["demo"]
    with pytest.raises(MelMismatchError, match="fmax 11025.0 != 8000.0"):
        check_mel_matches(mel_config_from_bigvgan({**base, "fmax": None}, "v2"), PRESETS["demo"], "v2")
