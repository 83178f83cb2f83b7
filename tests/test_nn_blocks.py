"""Tests of the shared conv blocks (tta.nn.blocks) and the PatchGAN discriminator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tta.nn.blocks import (
    Downsample2D,
    ResnetBlock2D,
    SpatialSelfAttention,
    Upsample2D,
    normalization,
    num_groups_for,
    zero_module,
)
from tta.nn.discriminators import ActNorm, NLayerDiscriminator, weights_init
from tta.registry import _REGISTRY


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(
    ("channels", "groups"), [(128, 32), (512, 32), (64, 32), (16, 16), (24, 24), (48, 24), (40, 20), (7, 7), (1, 1)]
)
def test_normalization_group_fallback(channels: int, groups: int) -> None:
    norm = normalization(channels)
    assert isinstance(norm, nn.GroupNorm)
    assert norm.num_groups == groups
    assert norm.eps == pytest.approx(1e-6)
    assert num_groups_for(channels) == groups
    assert norm(torch.randn(2, channels, 3, 3)).shape == (2, channels, 3, 3)


def test_normalization_rejects_bad_channels() -> None:
    with pytest.raises(ValueError, match="positive channel count"):
        normalization(0)


def test_resnet_block_shapes_and_shortcuts() -> None:
    x = torch.randn(2, 16, 8, 12)
    same = ResnetBlock2D(16, 16)
    assert same(x).shape == (2, 16, 8, 12)
    assert not hasattr(same, "nin_shortcut") and not hasattr(same, "temb_proj")

    nin = ResnetBlock2D(16, 32)
    assert nin(x).shape == (2, 32, 8, 12)
    assert nin.nin_shortcut.kernel_size == (1, 1)

    conv = ResnetBlock2D(16, 32, conv_shortcut=True)
    assert conv(x).shape == (2, 32, 8, 12)
    assert conv.conv_shortcut.kernel_size == (3, 3)
    assert not hasattr(conv, "nin_shortcut")


def test_resnet_block_is_residual() -> None:
    block = ResnetBlock2D(16, 16)
    zero_module(block.conv2)
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(block(x), x)


def test_resnet_block_timestep_embedding() -> None:
    x = torch.randn(2, 16, 6, 6)
    temb = torch.randn(2, 10)
    block = ResnetBlock2D(16, 24, temb_channels=10, dropout=0.1).eval()
    out = block(x, temb)
    assert out.shape == (2, 24, 6, 6)
    # the embedding changes the output
    assert not torch.allclose(out, block(x, torch.zeros_like(temb) + 3.0))
    with pytest.raises(ValueError, match="got no embedding"):
        block(x)
    with pytest.raises(ValueError, match="temb_channels=0"):
        ResnetBlock2D(16, 16)(x, temb)

    film = ResnetBlock2D(16, 16, temb_channels=10, scale_shift=True)
    assert film.temb_proj.out_features == 32
    # zero FiLM projection == plain block with the same weights
    zero_module(film.temb_proj)
    plain = ResnetBlock2D(16, 16)
    plain.load_state_dict({k: v for k, v in film.state_dict().items() if not k.startswith("temb_proj")})
    torch.testing.assert_close(film(x, temb), plain(x))
    with pytest.raises(ValueError, match="scale_shift"):
        ResnetBlock2D(16, 16, scale_shift=True)


def test_down_and_upsample() -> None:
    x = torch.randn(2, 8, 16, 10)
    down = Downsample2D(8)
    assert down(x).shape == (2, 8, 8, 5)
    assert down.conv.stride == (2, 2) and down.conv.padding == (0, 0)
    # asymmetric pad: the output's first pixel only sees x[..., :2, :2] (top-left, no left/top pad)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.bias.zero_()
        down.conv.weight[:, :, 0, 0] = torch.eye(8)
    torch.testing.assert_close(down(x), x[:, :, ::2, ::2])
    assert Downsample2D(8, with_conv=False)(x).shape == (2, 8, 8, 5)
    assert Downsample2D(8, out_channels=4)(x).shape == (2, 4, 8, 5)

    up = Upsample2D(8)
    assert up(x).shape == (2, 8, 32, 20)
    plain = Upsample2D(8, with_conv=False)(x)
    torch.testing.assert_close(plain[:, :, 0::2, 0::2], x)
    torch.testing.assert_close(plain[:, :, 1::2, 1::2], x)


def test_spatial_self_attention_matches_manual() -> None:
    attn = SpatialSelfAttention(16)
    x = torch.randn(2, 16, 4, 6)
    out = attn(x)
    assert out.shape == x.shape
    h = attn.norm(x)
    q = attn.q(h).flatten(2).transpose(1, 2)  # (B, HW, C)
    k = attn.k(h).flatten(2)  # (B, C, HW)
    v = attn.v(h).flatten(2).transpose(1, 2)
    w = torch.softmax(q @ k / math.sqrt(16), dim=-1)
    ref = x + attn.proj_out((w @ v).transpose(1, 2).reshape(2, 16, 4, 6))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sorted(n for n, _ in attn.named_children()) == ["k", "norm", "proj_out", "q", "v"]


def test_discriminator_shapes_and_registration() -> None:
    assert _REGISTRY["network"]["patchgan"] is NLayerDiscriminator
    disc = NLayerDiscriminator(input_nc=1, ndf=8, n_layers=3)
    disc.apply(weights_init)
    assert disc(torch.randn(2, 1, 64, 64)).shape == (2, 1, 6, 6)
    assert disc(torch.randn(2, 1, 64, 80)).shape == (2, 1, 6, 8)
    assert NLayerDiscriminator(ndf=8, n_layers=2)(torch.randn(1, 1, 64, 64)).shape == (1, 1, 14, 14)
    # taming layout: conv, lrelu, [conv, norm, lrelu] * n_layers, conv
    assert isinstance(disc.main[2], nn.Conv2d) and disc.main[2].bias is None
    assert isinstance(disc.main[3], nn.BatchNorm2d)
    assert len(disc.main) == 2 + 3 * 3 + 1
    # default taming size (ndf 64, 3 layers) has 2,763,585 parameters
    with torch.device("meta"):
        full = NLayerDiscriminator()
    assert sum(p.numel() for p in full.parameters()) == 2_763_585


def test_discriminator_norm_options() -> None:
    none = NLayerDiscriminator(ndf=8, norm="none")
    assert not any(isinstance(m, (nn.BatchNorm2d, ActNorm)) for m in none.modules())
    assert none.main[2].bias is not None
    act = NLayerDiscriminator(ndf=8, use_actnorm=True)
    norms = [m for m in act.modules() if isinstance(m, ActNorm)]
    assert len(norms) == 3
    act.train()
    x = torch.randn(4, 1, 32, 32) * 3 + 1
    act(x)
    assert all(int(n.initialized) == 1 for n in norms)
    # the first ActNorm (main[3]) output is standardised per channel on the init batch
    first = act.main[:4](x)
    per_channel = first.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 1e-4
    torch.testing.assert_close(per_channel.std(1), torch.ones(16), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="unknown discriminator norm"):
        NLayerDiscriminator(norm="layer")  # type: ignore[arg-type]


@pytest.mark.parametrize("explicit", [False, True])
def test_weights_init_statistics(explicit: bool) -> None:
    disc = NLayerDiscriminator(ndf=32, init_weights=not explicit)
    if explicit:
        # PyTorch's default init of the first conv (fan-in 16) has std 1/sqrt(3 * 16) ~ 0.144
        assert disc.main[0].weight.std().item() > 0.1
        disc.apply(weights_init)
    w = disc.main[2].weight
    assert abs(w.mean().item()) < 2e-3 and abs(w.std().item() - 0.02) < 2e-3
    assert abs(disc.main[0].weight.std().item() - 0.02) < 0.01
    bn = disc.main[3]
    assert abs(bn.weight.mean().item() - 1.0) < 0.01 and torch.all(bn.bias == 0)
