"""Tests of the mel VAE network (AutoencoderKL) and its diagonal Gaussian posterior."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tta.generators.vae.distribution import DiagonalGaussian
from tta.generators.vae.network import AutoencoderKL, Decoder, Encoder
from tta.registry import _REGISTRY

TINY = {"ch": 8, "ch_mult": (1, 2, 4), "num_res_blocks": 1, "z_channels": 4, "embed_dim": 4}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- distribution


def test_kl_matches_hand_computed_value() -> None:
    mean = torch.tensor([[[[1.0]], [[-2.0]]]])  # (1, 2, 1, 1)
    logvar = torch.tensor([[[[0.0]], [[math.log(4.0)]]]])
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    # 0.5 * sum(mu^2 + var - 1 - logvar) = 0.5 * ((1 + 1 - 1 - 0) + (4 + 4 - 1 - ln 4))
    expected = 0.5 * (1.0 + 7.0 - math.log(4.0))
    kl = post.kl()
    assert kl.shape == (1,)
    assert kl.item() == pytest.approx(expected, rel=1e-6)
    # standard normal -> zero KL, per sample
    std = DiagonalGaussian(torch.zeros(3, 8, 4, 5))
    torch.testing.assert_close(std.kl(), torch.zeros(3))
    # KL against itself is zero, against N(0, I) given explicitly equals the default
    assert post.kl(post).item() == pytest.approx(0.0, abs=1e-6)
    assert post.kl(DiagonalGaussian(torch.zeros(1, 4, 1, 1))).item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_per_sample_sum() -> None:
    params = torch.randn(4, 6, 5, 7)
    post = DiagonalGaussian(params)
    mean, logvar = params[:, :3], params[:, 3:]
    ref = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), ref)
    # half-precision parameters (autocast) are reduced in float32
    half = DiagonalGaussian(params.bfloat16())
    assert half.mean.dtype == torch.bfloat16 and half.sample().dtype == torch.bfloat16
    assert half.kl().dtype == torch.float32
    torch.testing.assert_close(half.kl(), DiagonalGaussian(params.bfloat16().float()).kl())
    assert half.nll(half.mean).dtype == torch.float32


def test_logvar_clamped_and_nll() -> None:
    params = torch.cat([torch.zeros(1, 1, 1, 2), torch.tensor([[[[-100.0, 100.0]]]])], dim=1)
    post = DiagonalGaussian(params)
    assert post.logvar.flatten().tolist() == [-30.0, 20.0]
    unit = DiagonalGaussian(torch.zeros(2, 2, 3, 3))
    # nll of the mean under N(0, 1): 0.5 * log(2 pi) per element, 9 elements
    torch.testing.assert_close(unit.nll(torch.zeros(2, 1, 3, 3)), torch.full((2,), 4.5 * math.log(2 * math.pi)))
    with pytest.raises(ValueError, match="even channel"):
        DiagonalGaussian(torch.zeros(1, 3, 2, 2))


def test_sample_vs_mode() -> None:
    mean = torch.randn(2, 4, 3, 5)
    logvar = torch.full_like(mean, math.log(0.25))  # std 0.5
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert post.mode() is post.mean
    s1 = post.sample(torch.Generator().manual_seed(1))
    s2 = post.sample(torch.Generator().manual_seed(1))
    s3 = post.sample(torch.Generator().manual_seed(2))
    torch.testing.assert_close(s1, s2)
    assert not torch.allclose(s1, s3)
    assert s1.shape == mean.shape
    big = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 200, 200), torch.full((1, 1, 200, 200), math.log(0.25))], 1))
    assert big.sample().std().item() == pytest.approx(0.5, rel=0.02)
    # near-zero variance -> sample == mode
    tight = DiagonalGaussian(torch.cat([mean, torch.full_like(mean, -30.0)], dim=1))
    torch.testing.assert_close(tight.sample(), mean, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- network shapes


@pytest.mark.parametrize(("ch_mult", "factor"), [((1, 2, 4), 4), ((1, 2), 2)])
@pytest.mark.parametrize("n_mels", [64, 80])
def test_encode_decode_shapes(ch_mult: tuple[int, ...], factor: int, n_mels: int) -> None:
    vae = AutoencoderKL(ch=8, ch_mult=ch_mult, num_res_blocks=1, z_channels=4, embed_dim=3)
    assert vae.downsample_factor == factor
    mel = torch.randn(2, 1, 64, n_mels)
    post = vae.encode(mel)
    assert isinstance(post, DiagonalGaussian)
    assert post.shape == (2, 3, 64 // factor, n_mels // factor)
    assert vae.latent_shape(64, n_mels) == (3, 64 // factor, n_mels // factor)
    assert vae.encoder(mel).shape == (2, 8, 64 // factor, n_mels // factor)  # double_z
    recon, post2 = vae(mel, sample_posterior=False)
    assert recon.shape == mel.shape
    torch.testing.assert_close(recon, vae.decode(post2.mode()))
    assert vae.decode(torch.randn(1, 3, 5, 7)).shape == (1, 1, 5 * factor, 7 * factor)


def test_forward_sampling_uses_generator() -> None:
    vae = AutoencoderKL(**TINY).eval()
    mel = torch.randn(1, 1, 32, 32)
    a, _ = vae(mel, generator=torch.Generator().manual_seed(0))
    b, _ = vae(mel, generator=torch.Generator().manual_seed(0))
    c, _ = vae(mel, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_attention_resolutions_and_no_mid_attention() -> None:
    vae = AutoencoderKL(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32)
    keys = set(vae.state_dict())
    assert "encoder.down.1.attn.0.q.weight" in keys and "encoder.down.0.attn.0.q.weight" not in keys
    assert "decoder.up.1.attn.1.proj_out.weight" in keys and "decoder.up.0.attn.0.q.weight" not in keys
    assert vae(torch.randn(1, 1, 32, 16))[0].shape == (1, 1, 32, 16)
    plain = AutoencoderKL(**TINY, mid_attention=False)
    assert not any(".attn" in k for k in plain.state_dict())
    assert plain(torch.randn(1, 1, 16, 16))[0].shape == (1, 1, 16, 16)


def test_bad_input_shapes_raise() -> None:
    vae = AutoencoderKL(**TINY)
    with pytest.raises(ValueError, match=r"frames=62, n_mels=64.*divisible by the downsample factor 4"):
        vae.encode(torch.randn(1, 1, 62, 64))
    with pytest.raises(ValueError, match="n_mels=66"):
        vae(torch.randn(1, 1, 64, 66))
    with pytest.raises(ValueError, match=r"\(B, 1, frames, n_mels\)"):
        vae.encode(torch.randn(1, 64, 64))  # (B, n_mels, frames) layout, missing channel
    with pytest.raises(ValueError, match=r"\(B, 1, frames, n_mels\)"):
        vae.encode(torch.randn(1, 2, 64, 64))
    with pytest.raises(ValueError, match="latent of shape"):
        vae.decode(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="divisible"):
        vae.latent_shape(1001, 64)
    with pytest.raises(ValueError, match="ch_mult"):
        AutoencoderKL(ch_mult=())


# ---------------------------------------------------------------- paper config / naming


def test_paper_config_size_and_checkpoint_key_layout() -> None:
    assert _REGISTRY["autoencoder"]["mel_vae"] is AutoencoderKL
    with torch.device("meta"):  # no allocation, no forward pass
        vae = AutoencoderKL(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=8, embed_dim=8)
    n_params = sum(p.numel() for p in vae.parameters())
    assert n_params == 55_376_873  # AudioLDM's first stage (diffusers counts the same)
    assert 20_000_000 < sum(p.numel() for p in vae.encoder.parameters()) < sum(p.numel() for p in vae.decoder.parameters())
    assert vae.latent_shape(1024, 64) == (8, 256, 16)
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    # LDM / AudioLDM names: up[i] is the level of resolution i
    assert shapes["encoder.conv_in.weight"] == (128, 1, 3, 3)
    assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["encoder.down.1.downsample.conv.weight"] == (256, 256, 3, 3)
    assert "encoder.down.2.downsample.conv.weight" not in shapes
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["encoder.conv_out.weight"] == (16, 512, 3, 3)
    assert shapes["quant_conv.weight"] == (16, 16, 1, 1)
    assert shapes["post_quant_conv.weight"] == (8, 8, 1, 1)
    assert shapes["decoder.conv_in.weight"] == (512, 8, 3, 3)
    assert shapes["decoder.up.2.block.2.conv2.weight"] == (512, 512, 3, 3)
    assert shapes["decoder.up.2.upsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert shapes["decoder.norm_out.weight"] == (128,)
    assert shapes["decoder.conv_out.weight"] == (1, 128, 3, 3)
    assert vae.last_layer_weight().shape == (1, 128, 3, 3)
    assert vae.config["ch_mult"] == [1, 2, 4]


def test_encoder_decoder_standalone() -> None:
    enc = Encoder(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=2, double_z=False)
    dec = Decoder(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=2, out_channels=3)
    z = enc(torch.randn(1, 1, 16, 24))
    assert z.shape == (1, 2, 8, 12)
    assert dec(z).shape == (1, 3, 16, 24)
    assert len(dec.up[0].block) == 2  # num_res_blocks + 1


# ---------------------------------------------------------------- training


def _smooth_mels(n: int, size: int) -> torch.Tensor:
    coarse = torch.randn(n, 1, size // 8, size // 8, generator=torch.Generator().manual_seed(3))
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def test_tiny_vae_overfits() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(ch=8, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=4, embed_dim=4)
    mels = _smooth_mels(4, 64)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def recon_l1() -> float:
        with torch.no_grad():
            return F.l1_loss(vae(mels, sample_posterior=False)[0], mels).item()

    start = recon_l1()
    for _ in range(60):
        recon, post = vae(mels, generator=gen)
        loss = F.l1_loss(recon, mels) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = recon_l1()
    assert math.isfinite(end)
    assert end < 0.5 * start, f"reconstruction L1 only went from {start:.4f} to {end:.4f}"


# ---------------------------------------------------------------- weight import


def test_ldm_first_stage_prefix_stripping() -> None:
    from tta.generators.vae.convert import ldm_first_stage_to_tta
    from tta.utils.weights import WeightMismatchError, load_state_dict_strict

    src = AutoencoderKL(**TINY)
    ckpt = {f"first_stage_model.{k}": v.clone() for k, v in src.state_dict().items()}
    ckpt["first_stage_model.vocoder.conv_pre.weight"] = torch.zeros(1)
    ckpt["first_stage_model.loss.logvar"] = torch.zeros(())
    ckpt["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)
    dst = AutoencoderKL(**TINY)
    load_state_dict_strict(dst, ldm_first_stage_to_tta(ckpt), source="ldm")
    mel = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(dst(mel, sample_posterior=False)[0], src(mel, sample_posterior=False)[0])
    with pytest.raises(WeightMismatchError, match="unexpected keys"):
        load_state_dict_strict(dst, ldm_first_stage_to_tta(ckpt, ignore=("loss.",)))
    with pytest.raises(ValueError, match="no keys start with"):
        ldm_first_stage_to_tta({"model.x": torch.zeros(1)})


@pytest.mark.parametrize("attn_levels", [(), (1,)])
def test_diffusers_conversion_matches(tmp_path: Path, attn_levels: tuple[int, ...]) -> None:
    diffusers = pytest.importorskip("diffusers")
    from tta.generators.vae.convert import (
        diffusers_config_to_tta,
        diffusers_vae_to_tta,
        load_diffusers_vae,
    )
    from tta.utils.weights import load_state_dict_strict

    n = 2
    down = ["AttnDownEncoderBlock2D" if i in attn_levels else "DownEncoderBlock2D" for i in range(n)]
    up = ["AttnUpDecoderBlock2D" if n - 1 - i in attn_levels else "UpDecoderBlock2D" for i in range(n)]
    ref = diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=down, up_block_types=up,
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
    ).eval()
    with torch.no_grad():  # random norms/biases so that a mis-mapped tensor shows up
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kwargs = diffusers_config_to_tta(dict(ref.config))
    assert kwargs["ch"] == 32 and kwargs["ch_mult"] == (1, 2) and kwargs["num_res_blocks"] == 1
    ours = AutoencoderKL(**kwargs).eval()
    load_state_dict_strict(ours, diffusers_vae_to_tta(ref.state_dict()), source="diffusers")

    mel = torch.randn(2, 1, 16, 24)
    z = torch.randn(2, 4, 8, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(mel).mean, ref.encode(mel).latent_dist.mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, rtol=1e-4, atol=1e-4)

    # the same through a saved folder (pipeline layout with vae/)
    ref.save_pretrained(tmp_path / "vae")
    loaded = load_diffusers_vae(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z), ours.decode(z))

    # pre-0.14 attention names map too; an unknown key is an error
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in ref.state_dict().items():
        for new_name, old_name in renames.items():
            k = k.replace(f".{new_name}.", f".{old_name}.")
        old[k] = v
    torch.testing.assert_close(diffusers_vae_to_tta(old), diffusers_vae_to_tta(ref.state_dict()))
    with pytest.raises(ValueError, match="encoder.extra.weight"):
        diffusers_vae_to_tta({**ref.state_dict(), "encoder.extra.weight": torch.zeros(1)})


def test_diffusers_audioldm_sized_keys_map_exactly() -> None:
    diffusers = pytest.importorskip("diffusers")
    from tta.generators.vae.convert import diffusers_config_to_tta, diffusers_vae_to_tta

    with torch.device("meta"):  # AudioLDM's diffusers VAE config, no allocation
        ref = diffusers.AutoencoderKL(
            in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[128, 256, 512],
            layers_per_block=2, latent_channels=8, norm_num_groups=32,
        )
        kwargs = diffusers_config_to_tta(dict(ref.config))
        ours = AutoencoderKL(**kwargs)
    assert kwargs["ch_mult"] == (1, 2, 4) and kwargs["z_channels"] == kwargs["embed_dim"] == 8
    converted = {k: tuple(v.shape) for k, v in diffusers_vae_to_tta(ref.state_dict()).items()}
    assert converted == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
