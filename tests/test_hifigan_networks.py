"""HiFi-GAN generator, discriminators and losses (tiny sizes, CPU)."""

from __future__ import annotations

import pytest
import torch

from tta.data.mel import MelConfig, MelFrontend
from tta.nn.gan_losses import feature_matching_loss, lsgan_d_loss, lsgan_g_loss
from tta.vocoders.base import Vocoder
from tta.vocoders.gan import FEATURE_MATCHING_WEIGHT, MEL_L1_WEIGHT
from tta.vocoders.hifigan.discriminators import (
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
)
from tta.vocoders.hifigan.generator import HiFiGANGenerator

pytestmark = pytest.mark.usefixtures("single_thread")


TINY = {"upsample_initial_channel": 16, "resblock_kernel_sizes": (3, 5), "resblock_dilation_sizes": ((1, 3), (1, 3))}


def tiny_generator(**overrides) -> HiFiGANGenerator:
    args = dict(n_mels=8, upsample_rates=(4, 4), upsample_kernel_sizes=(8, 8), **TINY)
    args.update(overrides)
    return HiFiGANGenerator(**args)


@pytest.mark.parametrize(
    "rates,kernels,resblock",
    [
        ((8, 8, 2, 2), (16, 16, 4, 4), "1"),  # universal V1 hop 256
        ((5, 4, 2, 2, 2), (16, 16, 8, 4, 4), "1"),  # AudioLDM 16 kHz hop 160 (odd kernel - rate)
        ((4, 4), (8, 8), "2"),
    ],
)
def test_generator_output_length_is_frames_times_hop(rates, kernels, resblock) -> None:
    dil = ((1, 3), (1, 3)) if resblock == "2" else ((1, 3, 5), (1, 3, 5))
    gen = HiFiGANGenerator(
        n_mels=8, upsample_rates=rates, upsample_kernel_sizes=kernels, upsample_initial_channel=64,
        resblock=resblock, resblock_kernel_sizes=(3, 5), resblock_dilation_sizes=dil,
    )
    hop = 1
    for r in rates:
        hop *= r
    assert isinstance(gen, Vocoder) and gen.hop_length == hop
    wav = gen(torch.randn(2, 8, 7))
    assert wav.shape == (2, 7 * hop)
    assert wav.abs().max() <= 1.0  # tanh output
    if resblock == "2":
        assert "resblocks.0.convs.1.parametrizations.weight.original0" in gen.state_dict()


def test_weight_norm_keys_and_removal_preserve_output() -> None:
    gen = tiny_generator().eval()
    keys = gen.state_dict().keys()
    assert "conv_pre.parametrizations.weight.original0" in keys
    assert "ups.1.parametrizations.weight.original1" in keys
    assert "resblocks.3.convs2.1.parametrizations.weight.original0" in keys
    mel = torch.randn(1, 8, 5)
    with torch.no_grad():
        before = gen(mel)
        gen.remove_weight_norm()
        after = gen(mel)
    assert not gen.has_weight_norm
    assert "conv_pre.weight" in gen.state_dict()
    torch.testing.assert_close(before, after, atol=1e-6, rtol=0)
    gen.apply_weight_norm()
    assert gen.has_weight_norm


def test_normalize_input_uses_mean_and_scale() -> None:
    gen = tiny_generator(normalize_input=True, use_weight_norm=False).eval()
    gen.mean.fill_(2.0)
    gen.scale.fill_(4.0)
    ref = tiny_generator(use_weight_norm=False).eval()
    ref.load_state_dict({k: v for k, v in gen.state_dict().items() if k not in ("mean", "scale")})
    mel = torch.randn(1, 8, 4)
    with torch.no_grad():
        torch.testing.assert_close(gen(mel), ref((mel - 2.0) / 4.0))


def test_generator_rejects_bad_input_and_config() -> None:
    gen = tiny_generator()
    with pytest.raises(ValueError, match=r"\(B, 8, frames\)"):
        gen(torch.randn(1, 9, 4))
    with pytest.raises(ValueError, match="resblock"):
        tiny_generator(resblock="3")
    with pytest.raises(ValueError, match="kernel 2 must be >= its rate 4"):
        tiny_generator(upsample_kernel_sizes=(2, 8))
    with pytest.raises(ValueError, match="hop_length 256"):
        tiny_generator(mel_config="demo")  # hop 16 != 256


def test_mel_config_must_match_hop_and_mels() -> None:
    cfg = MelConfig(sample_rate=16000, n_fft=64, win_length=64, hop_length=16, n_mels=8, f_max=8000.0)
    gen = tiny_generator(mel_config=cfg)
    assert gen.mel_config == cfg and gen.sample_rate == 16000
    with pytest.raises(ValueError, match="n_mels 64"):
        gen.set_mel_config(MelConfig(hop_length=16, n_mels=64))


def test_from_config_dict_ignores_training_keys_and_rejects_unknown_architecture_keys() -> None:
    config = {
        "resblock": "1", "num_gpus": 0, "batch_size": 16, "learning_rate": 0.0002, "adam_b1": 0.8,
        "adam_b2": 0.99, "lr_decay": 0.999, "seed": 1234, "upsample_rates": [4, 4],
        "upsample_kernel_sizes": [8, 8], "upsample_initial_channel": 16, "resblock_kernel_sizes": [3],
        "resblock_dilation_sizes": [[1, 3]], "segment_size": 8192, "num_mels": 8, "num_freq": 1025,
        "n_fft": 1024, "hop_size": 16, "win_size": 1024, "sampling_rate": 22050, "fmin": 0, "fmax": 8000,
        "fmax_for_loss": None, "num_workers": 4, "dist_config": {"dist_backend": "nccl"},
    }
    gen = HiFiGANGenerator.from_config_dict(config)
    assert gen.n_mels == 8 and gen.hop_length == 16 and gen.config["resblock_kernel_sizes"] == [3]
    with pytest.raises(ValueError, match=r"unknown architecture keys \['activation'\]"):
        HiFiGANGenerator.from_config_dict({**config, "activation": "snake"})


def test_registry_names() -> None:
    # the decorator's record (registry.get would import every built-in module, slow here)
    assert HiFiGANGenerator.registry_name == "hifigan_generator"
    assert MultiPeriodDiscriminator.registry_name == "hifigan_mpd"
    assert MultiScaleDiscriminator.registry_name == "hifigan_msd"


def test_discriminator_outputs() -> None:
    wav = torch.randn(2, 1000)
    mpd = MultiPeriodDiscriminator(channel_mult=1 / 16)
    logits, fmaps = mpd(wav)
    assert len(logits) == len(fmaps) == 5
    for period, logit, fmap in zip((2, 3, 5, 7, 11), logits, fmaps):
        assert logit.shape[0] == 2 and logit.dim() == 2
        assert len(fmap) == 6  # 5 convs + conv_post
        assert fmap[0].shape[-1] == period  # (B, C, T/p, p) layout
    msd = MultiScaleDiscriminator(channel_mult=1 / 16)
    logits, fmaps = msd(wav.unsqueeze(1))
    assert len(logits) == len(fmaps) == 3 and all(len(f) == 8 for f in fmaps)
    # each scale halves the time resolution
    assert logits[0].shape[1] > logits[1].shape[1] > logits[2].shape[1]
    first, second = msd.discriminators[0].convs[0], msd.discriminators[1].convs[0]
    assert type(first.parametrizations.weight[0]).__name__ == "_SpectralNorm"
    assert type(second.parametrizations.weight[0]).__name__ == "_WeightNorm"
    with pytest.raises(ValueError, match="waveform"):
        mpd(torch.randn(2, 2, 100))


def test_gan_step_reduces_losses() -> None:
    """A few generator steps on one clip lower the mel L1; D steps lower the D loss."""
    torch.manual_seed(0)
    fe = MelFrontend(None, sample_rate=4000, n_fft=64, win_length=64, hop_length=16, n_mels=8, f_max=2000.0)
    gen = tiny_generator()
    mpd, msd = MultiPeriodDiscriminator(channel_mult=1 / 32), MultiScaleDiscriminator(channel_mult=1 / 32)
    t = torch.arange(16 * 24) / 4000
    wav = 0.5 * torch.sin(2 * torch.pi * 300 * t)[None]
    mel = fe(wav)
    opt_g = torch.optim.Adam(gen.parameters(), 2e-3)
    opt_d = torch.optim.Adam(list(mpd.parameters()) + list(msd.parameters()), 2e-3)

    def d_loss() -> torch.Tensor:
        fake = gen(mel).detach()
        return sum(lsgan_d_loss(d(wav)[0], d(fake)[0]) for d in (mpd, msd))

    d_start = d_loss().item()
    for _ in range(8):
        opt_d.zero_grad()
        d_loss().backward()
        opt_d.step()
    assert d_loss().item() < d_start

    mel_start = (fe(gen(mel)) - mel).abs().mean().item()
    for _ in range(15):
        fake = gen(mel)
        loss = MEL_L1_WEIGHT * (fe(fake) - mel).abs().mean()
        for d in (mpd, msd):
            (_, f_real), (l_fake, f_fake) = d(wav), d(fake)
            loss = loss + lsgan_g_loss(l_fake) + feature_matching_loss(f_real, f_fake, FEATURE_MATCHING_WEIGHT)
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
    assert (fe(gen(mel)) - mel).abs().mean().item() < 0.9 * mel_start
