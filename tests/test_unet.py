"""Tests of the shared attention / transformer blocks and the AudioLDM / Re-AudioLDM UNet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tta.nn.attention import Attention, KeyMask
from tta.nn.transformer import SpatialTransformer, TransformerBlock
from tta.nn.unet import UNetModel, timestep_embedding
from tta.registry import get

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 16,
    "channel_mult": (1, 2),
    "num_res_blocks": 1,
    "attention_resolutions": (2,),
    "num_head_channels": 8,
    "film_dim": 8,
    "num_groups": 8,
}
RETRIEVAL = {**TINY, "context_dims": {"retrieval": 12}}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _inputs(
    batch: int = 2, hgt: int = 8, wid: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.randn(batch, 4, hgt, wid),
        torch.tensor([5, 900])[:batch],
        torch.randn(batch, 8),
    )


def _perturb_cross(model: torch.nn.Module, name: str = "retrieval") -> None:
    with torch.no_grad():
        for key, p in model.named_parameters():
            if f"cross_attns.{name}.to_out.0" in key:
                p.normal_(0.0, 0.2)


def _plain_with_shared_weights(re_model: UNetModel) -> UNetModel:
    plain = UNetModel(**TINY)
    state = {k: v for k, v in re_model.state_dict().items() if ".retrieval." not in k}
    plain.load_state_dict(state, strict=True)
    return plain


# ---------------------------------------------------------------- attention


def test_attention_mask_ignores_padded_keys_and_zeroes_empty_rows() -> None:
    attn = Attention(16, context_dim=6, heads=2, dim_head=4)
    x, ctx = torch.randn(3, 5, 16), torch.randn(3, 4, 6)
    mask = torch.tensor(
        [
            [True, True, False, False],
            [True, True, True, True],
            [False, False, False, False],
        ]
    )
    out = attn(x, ctx, mask)
    assert out.shape == (3, 5, 16) and torch.isfinite(out).all()
    torch.testing.assert_close(
        out[0], attn(x[:1], ctx[:1, :2])[0]
    )  # padded keys change nothing
    torch.testing.assert_close(out[1], attn(x[1:2], ctx[1:2])[0])
    assert torch.equal(out[2], torch.zeros(5, 16))  # exact zero (bias included), no NaN
    assert torch.equal(attn(x, ctx[:, :0]), torch.zeros(3, 5, 16))  # no keys at all
    prepared = KeyMask.from_bool(mask, 3, 4)
    torch.testing.assert_close(attn(x, ctx, prepared), out)
    assert KeyMask.from_bool(torch.ones(3, 4, dtype=torch.bool), 3, 4) == KeyMask()
    with pytest.raises(ValueError, match="bool"):
        attn(x, ctx, mask.float())
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        attn(x, ctx, mask[:, :3])


def test_attention_matches_manual_softmax() -> None:
    attn = Attention(8, heads=2, dim_head=4)
    x = torch.randn(2, 5, 8)
    q = attn.to_q(x).view(2, 5, 2, 4).transpose(1, 2)
    k = attn.to_k(x).view(2, 5, 2, 4).transpose(1, 2)
    v = attn.to_v(x).view(2, 5, 2, 4).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    expected = attn.to_out((w @ v).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(attn(x), expected)


def test_transformer_block_names_and_zero_init_cross_attention() -> None:
    block = TransformerBlock(
        16, 2, 8, self_attn2=True, context_dims={"prompt": 6, "refs": 10}
    )
    keys = set(block.state_dict())
    for key in ("attn1.to_q.weight", "attn2.to_k.weight", "norm2.weight", "ff.net.0.proj.weight", "ff.net.2.bias",
                "cross_norms.prompt.weight", "cross_attns.refs.to_v.weight", "attn1.to_out.0.bias"):  # fmt: skip
        assert key in keys
    assert (
        block.cross_attns["prompt"].to_k.in_features == 6
        and block.cross_attns["refs"].to_k.in_features == 10
    )
    for attn in block.cross_attns.values():
        assert not attn.to_out[0].weight.any() and not attn.to_out[0].bias.any()
    x = torch.randn(2, 7, 16)
    ctx = {
        "prompt": (torch.randn(2, 3, 6), None),
        "refs": (torch.randn(2, 4, 10), torch.ones(2, 4, dtype=torch.bool)),
    }
    torch.testing.assert_close(
        block(x, ctx), block(x)
    )  # zero-init: starts exactly without the contexts
    with pytest.raises(ValueError, match="unknown context name"):
        block(x, {"nope": (torch.randn(2, 3, 6), None)})
    with pytest.raises(ValueError, match="identifier"):
        TransformerBlock(16, 2, 8, context_dims={"a.b": 4})


def test_spatial_transformer_conv_and_linear_projection() -> None:
    for linear in (False, True):
        st = SpatialTransformer(
            16, heads=2, dim_head=8, num_groups=4, use_linear_projection=linear
        )
        assert isinstance(st.proj_in, torch.nn.Linear if linear else torch.nn.Conv2d)
        x = torch.randn(2, 16, 4, 3)
        assert st(x).shape == x.shape
        with torch.no_grad():
            st.proj_out.weight.zero_()
            st.proj_out.bias.zero_()
        torch.testing.assert_close(st(x), x)  # residual around the transformer


# ---------------------------------------------------------------- timestep embedding


@pytest.mark.parametrize("dim", [16, 128, 9])
def test_timestep_embedding_equals_diffusers(dim: int) -> None:
    from diffusers.models.embeddings import Timesteps

    t = torch.tensor([0, 1, 17, 500, 999])
    ref = Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    assert torch.equal(timestep_embedding(t, dim), ref)
    tf = torch.tensor([0.5, 999.25])
    assert torch.equal(timestep_embedding(tf, dim), Timesteps(dim, True, 0)(tf))
    assert torch.equal(
        timestep_embedding(torch.tensor([0]), 4), torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    )


# ---------------------------------------------------------------- UNet


def test_unet_shapes_plain_and_retrieval() -> None:
    assert get("unet") is UNetModel
    x, t, film = _inputs()
    plain = UNetModel(**TINY)
    assert plain.downsample_factor == 2
    assert plain(x, t, film).shape == (2, 4, 8, 4)
    assert plain(x, torch.tensor(3), film).shape == (
        2,
        4,
        8,
        4,
    )  # scalar timestep broadcast
    assert plain(x, t.float(), film).shape == (2, 4, 8, 4)
    re_model = UNetModel(**RETRIEVAL)
    ctx = {"retrieval": (torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool))}
    assert re_model(x, t, film, ctx).shape == (2, 4, 8, 4)
    keys = set(re_model.state_dict())
    for key in ("conv_in.weight", "time_embedding.linear_2.bias", "class_embedding.weight",
                "down_blocks.0.resnets.0.temb_proj.weight", "down_blocks.0.downsamplers.0.conv.weight",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q.weight",
                "down_blocks.1.attentions.0.transformer_blocks.0.cross_attns.retrieval.to_k.weight",
                "mid_block.attentions.0.proj_in.weight", "mid_block.resnets.1.conv2.weight",
                "up_blocks.0.resnets.1.nin_shortcut.weight", "up_blocks.0.upsamplers.0.conv.weight",
                "conv_norm_out.weight", "conv_out.bias"):  # fmt: skip
        assert key in keys, key
    assert not any(
        k.startswith("down_blocks.0.attentions") for k in keys
    )  # level 0 has no attention
    assert (
        re_model.down_blocks[1]
        .attentions[0]
        .transformer_blocks[0]
        .cross_attns["retrieval"]
        .to_k.in_features
        == 12
    )
    assert (
        plain.up_blocks[0].resnets[0].temb_proj.in_features == 2 * 4 * 16
    )  # FiLM concatenated


def test_unet_without_film() -> None:
    model = UNetModel(**{**TINY, "film_dim": 0, "self_attn2": False})
    assert model.class_embedding is None
    assert "transformer_blocks.0.attn2" not in str(list(model.state_dict()))
    x, t, film = _inputs()
    assert model(x, t).shape == x.shape
    with pytest.raises(ValueError, match="film_dim=0"):
        model(x, t, film)


def test_unet_input_errors() -> None:
    model = UNetModel(**RETRIEVAL)
    x, t, film = _inputs()
    with pytest.raises(ValueError, match="needs film"):
        model(x, t)
    with pytest.raises(ValueError, match="film must have shape"):
        model(x, t, torch.randn(2, 7))
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(2, 4, 8, 5), t, film)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.tensor([1, 2, 3]), film)
    with pytest.raises(ValueError, match=r"unknown context name\(s\) \['prompt'\]"):
        model(
            x,
            t,
            film,
            {"prompt": (torch.randn(2, 3, 12), torch.ones(2, 3, dtype=torch.bool))},
        )
    with pytest.raises(ValueError, match="sequence must have shape"):
        model(
            x,
            t,
            film,
            {"retrieval": (torch.randn(2, 3, 11), torch.ones(2, 3, dtype=torch.bool))},
        )
    with pytest.raises(ValueError, match="cannot be split into attention heads"):
        UNetModel(**{**TINY, "num_head_channels": 12})


def test_retrieval_changes_output_once_out_projection_is_perturbed() -> None:
    model = UNetModel(**RETRIEVAL).eval()
    x, t, film = _inputs()
    ctx = {"retrieval": (torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool))}
    with torch.no_grad():
        base = model(x, t, film)
        torch.testing.assert_close(
            model(x, t, film, ctx), base
        )  # zero-init: exactly AudioLDM
        _perturb_cross(model)
        out = model(x, t, film, ctx)
    assert (out - base).abs().amax(dim=(1, 2, 3)).min() > 1e-4


def test_empty_or_masked_retrieval_equals_plain_unet() -> None:
    model = UNetModel(**RETRIEVAL).eval()
    _perturb_cross(model)
    plain = _plain_with_shared_weights(model).eval()
    x, t, film = _inputs()
    with torch.no_grad():
        ref = plain(x, t, film)
        assert torch.equal(model(x, t, film), ref)
        assert torch.equal(
            model(
                x,
                t,
                film,
                {
                    "retrieval": (
                        torch.randn(2, 0, 12),
                        torch.ones(2, 0, dtype=torch.bool),
                    )
                },
            ),
            ref,
        )
        mask = torch.zeros(2, 5, dtype=torch.bool)
        mask[1, :2] = True  # sample 0: no neighbour, sample 1: two
        out = model(x, t, film, {"retrieval": (torch.randn(2, 5, 12), mask)})
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-6)
    assert (out[1] - ref[1]).abs().max() > 1e-4


def test_gradient_flows_to_every_parameter() -> None:
    model = UNetModel(**RETRIEVAL)
    _perturb_cross(model)
    x, t, film = _inputs()
    ctx = {
        "retrieval": (
            torch.randn(2, 5, 12, requires_grad=True),
            torch.ones(2, 5, dtype=torch.bool),
        )
    }
    film.requires_grad_(True)
    F.mse_loss(model(x, t, film, ctx), torch.randn_like(x)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert film.grad.abs().sum() > 0 and ctx["retrieval"][0].grad.abs().sum() > 0


def test_gradient_checkpointing_gives_same_output_and_grads() -> None:
    model = UNetModel(**{**RETRIEVAL, "dropout": 0.0})
    _perturb_cross(model)
    x, t, film = _inputs()
    ctx = {
        "retrieval": (
            torch.randn(2, 5, 12),
            torch.tensor([[True] * 5, [True, False, True, False, False]]),
        )
    }

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = model(x, t, film, ctx)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out_a, grads_a = run()
    model.gradient_checkpointing = True
    assert all(stage.gradient_checkpointing for stage in model.down_blocks)
    out_b, grads_b = run()
    torch.testing.assert_close(out_b, out_a)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(gb, ga)
