"""UNet path builders, per-stage context names and external (ControlNet-style) residuals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tta.nn.unet import UNetModel, UNetResiduals, ZeroResidualProjections
from tta.nn.unet_paths import build_down_path, build_up_path, stage_context_dims

pytestmark = pytest.mark.usefixtures("single_thread")

KEYS = Path(__file__).resolve().parent / "fixtures" / "unet_keys.txt"
TINY = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 8,
    "channel_mult": (1, 2),
    "num_groups": 4,
    "num_head_channels": 8,
    "film_dim": 16,
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 4, 8, 8), torch.tensor([5, 900])[:batch], torch.randn(batch, 16)


def _context(dim: int, length: int = 3, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, length, dim), torch.ones(batch, length, dtype=torch.bool)


def test_default_state_dict_keys_unchanged() -> None:
    model = UNetModel(**TINY, context_dims={"retrieval": 12})
    expected = KEYS.read_text(encoding="utf-8").split()
    assert sorted(model.state_dict()) == expected


def test_builders_match_model_skips() -> None:
    model = UNetModel(**TINY)
    channels = [8, 16]
    down, skips = build_down_path(channels, 64, 2, [None, None], num_groups=4)
    assert skips == model.skip_channels == [8, 8, 8, 8, 16, 16]
    assert model.mid_channels == 16
    up = build_up_path(channels, skips, 64, 2, [None, None], num_groups=4)
    assert len(down) == len(up) == 2 and skips == [8, 8, 8, 8, 16, 16]  # not consumed
    with pytest.raises(ValueError, match="one attention spec per level"):
        build_down_path(channels, 64, 2, [None], num_groups=4)
    with pytest.raises(ValueError, match="skip channels"):
        build_up_path(channels, skips[:-1], 64, 2, [None, None], num_groups=4)


def test_zero_projections_leave_output_unchanged_and_train() -> None:
    main = UNetModel(**TINY).eval()
    ref = UNetModel(**TINY).eval()  # same structure, independent weights
    proj = ZeroResidualProjections(ref.skip_channels, ref.mid_channels, main.skip_channels, main.mid_channels)
    x, t, film = _inputs()
    x_ref = torch.randn_like(x)
    plain = main(x, t, film).detach()

    emb = ref.embed(t, film, x.shape[0], x.dtype)
    h_ref, skips_ref = ref.encode(x_ref, emb, ref.prepare_context(None, 2))
    residuals = proj(skips_ref, h_ref)
    assert [r.shape[1] for r in residuals.skips] == main.skip_channels
    out = main(x, t, film, residuals=residuals)
    assert torch.equal(out, plain)

    out.square().mean().backward()
    for conv in [*proj.skips, proj.mid]:
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
        assert conv.bias.grad is not None

    with torch.no_grad():
        for p in proj.parameters():
            p.normal_(0.0, 0.1)
        assert not torch.equal(main(x, t, film, residuals=proj(skips_ref, h_ref)), plain)


def test_encode_decode_compose_to_forward() -> None:
    model = UNetModel(**TINY, context_dims={"prompt": 6}).eval()
    x, t, film = _inputs()
    context = {"prompt": _context(6)}
    with torch.no_grad():
        ctx = model.prepare_context(context, 2)
        emb = model.embed(t, film, 2, x.dtype)
        h, skips = model.encode(x, emb, ctx)
        n_skips = len(skips)
        out = model.decode(h, skips, emb, ctx)
        assert len(skips) == n_skips  # decode does not consume the caller's list
        assert torch.equal(out, model(x, t, film, context))


def test_context_stages_decoder_only_cross_attention() -> None:
    model = UNetModel(
        **TINY, context_dims={"prompt": 6, "refcap": 10}, context_stages={"refcap": ["up"]}
    ).eval()
    names = [n for n, _ in model.named_modules()]
    refcap = [n for n in names if n.endswith("cross_attns.refcap")]
    prompt = [n for n in names if n.endswith("cross_attns.prompt")]
    assert refcap and all(n.startswith("up_blocks.") for n in refcap)
    for stage in ("down_blocks.", "mid_block.", "up_blocks."):
        assert any(n.startswith(stage) for n in prompt)
    assert model.stage_contexts == {"down": ("prompt",), "mid": ("prompt",), "up": ("prompt", "refcap")}

    with torch.no_grad():
        for key, p in model.named_parameters():
            if "cross_attns." in key and ".to_out.0" in key:
                p.normal_(0.0, 0.2)
        x, t, film = _inputs()
        prompt_ctx = _context(6)
        without = model(x, t, film, {"prompt": prompt_ctx})
        with_a = model(x, t, film, {"prompt": prompt_ctx, "refcap": _context(10)})
        with_b = model(x, t, film, {"prompt": prompt_ctx, "refcap": _context(10)})
        assert not torch.equal(with_a, without)
        assert not torch.equal(with_a, with_b)
        assert torch.equal(model(x, t, film, {"refcap": _context(10, length=0)}), model(x, t, film))


def test_stage_context_dims() -> None:
    dims = {"a": 4, "b": 6}
    assert stage_context_dims(dims) == {"down": dims, "mid": dims, "up": dims}
    assert stage_context_dims(dims, {"b": "mid"}) == {"down": {"a": 4}, "mid": dims, "up": {"a": 4}}


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ({"nope": ["up"]}, r"context_stages names unknown context\(s\) \['nope'\]"),
        ({"refcap": ["up", "side"]}, r"context_stages\['refcap'\] has unknown stage\(s\) \['side'\]"),
        ({"refcap": []}, r"context_stages\['refcap'\] names no stage"),
    ],
)
def test_bad_context_stages(stages: dict[str, list[str]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNetModel(**TINY, context_dims={"refcap": 10}, context_stages=stages)


def test_bad_residuals() -> None:
    model = UNetModel(**TINY).eval()
    x, t, film = _inputs()
    skips = [torch.zeros(2, c, 8 if i < 3 else 4, 8 if i < 3 else 4) for i, c in enumerate(model.skip_channels)]
    mid = torch.zeros(2, model.mid_channels, 4, 4)
    with torch.no_grad():
        model(x, t, film, residuals=UNetResiduals(skips, mid))  # the right shapes
        with pytest.raises(ValueError, match=r"residuals.skips needs 6 tensors"):
            model(x, t, film, residuals=UNetResiduals(skips[:-1], mid))
        bad = [*skips[:2], torch.zeros(2, 8, 4, 4), *skips[3:]]
        with pytest.raises(ValueError, match=r"residuals.skips\[2\] must have the skip's shape"):
            model(x, t, film, residuals=UNetResiduals(bad, mid))
        with pytest.raises(ValueError, match="residuals.mid must have"):
            model(x, t, film, residuals=UNetResiduals(skips, torch.zeros(2, 8, 4, 4)))


def test_projection_argument_checks() -> None:
    proj = ZeroResidualProjections([8, 16])
    assert proj.mid is None
    out = proj([torch.randn(1, 8, 4, 4), torch.randn(1, 16, 2, 2)])
    assert out.mid is None and all(torch.equal(r, torch.zeros_like(r)) for r in out.skips)
    with pytest.raises(ValueError, match="expects 2 skips"):
        proj([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match="without mid_channels"):
        proj([torch.randn(1, 8, 4, 4), torch.randn(1, 16, 2, 2)], torch.randn(1, 16, 2, 2))
    with pytest.raises(ValueError, match="out_skip_channels"):
        ZeroResidualProjections([8, 16], out_skip_channels=[8])
