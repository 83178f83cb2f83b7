"""DreamAudio's MRC UNet (two encoder paths, zero-projected reference residuals, decoder-only
reference-caption cross-attention) and the reference-count alignment CNN."""

from __future__ import annotations

import pytest
import torch

from tta.nn.mrc_unet import REFCAP, MRCUNet, ReferenceEncoder
from tta.nn.reference_align import ReferenceAlignment
from tta.nn.unet import UNetModel
from tta.registry import get
from tta.utils.weights import WeightMismatchError

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 8,
    "channel_mult": (1, 2),
    "num_res_blocks": 1,
    "attention_resolutions": (1, 2),
    "num_head_channels": 8,
    "num_groups": 4,
    "film_dim": 0,
    "self_attn2": False,
    "context_dims": {"prompt": 6},
}
MRC = {**TINY, "ref_context_dim": 10}
B, T, FREQ = 2, 8, 8  # latent (B, 4, T, FREQ)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(B, 4, T, FREQ), torch.tensor([5.0, 900.0])


def _ctx(dim: int, length: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(B, length, dim), torch.ones(B, length, dtype=torch.bool)


def _context(refcap_len: int = 5) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"prompt": _ctx(6), REFCAP: _ctx(10, refcap_len)}


def _refs(k: int, t_r: int = T, channels: int = 4) -> torch.Tensor:
    return torch.randn(B, channels, k * t_r, FREQ)


def _pair(share: bool = False) -> tuple[UNetModel, MRCUNet]:
    plain = UNetModel(**TINY).eval()
    mrc = MRCUNet(**MRC, share_encoder=share).eval()
    mrc.load_unet(plain)
    return plain, mrc


def _perturb(module: torch.nn.Module, std: float = 0.1) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


def _trained(share: bool = False) -> tuple[UNetModel, MRCUNet]:
    """A pair whose MRC projections and refcap attentions are non-zero (as after training)."""
    plain, mrc = _pair(share)
    _perturb(mrc.projections)
    with torch.no_grad():
        for key, p in mrc.unet.named_parameters():
            if f"cross_attns.{REFCAP}.to_out.0" in key:
                p.normal_(0.0, 0.2)
    return plain, mrc


# ---------------------------------------------------------------- equality with the plain UNet


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize(("k", "t_r"), [(1, T), (2, T), (3, T), (1, 4), (3, 4), (2, 12)])
def test_fresh_mrc_equals_its_unet_for_any_references(share: bool, k: int, t_r: int) -> None:
    plain, mrc = _pair(share)
    x, t = _inputs()
    context = _context()
    with torch.no_grad():
        expected = plain(x, t, context={"prompt": context["prompt"]})
        out = mrc(x, t, context=context, references=_refs(k, t_r))
        assert out.shape == (B, 4, T, FREQ)
        torch.testing.assert_close(out, expected, rtol=0.0, atol=1e-6)
        assert torch.equal(mrc(x, t, context={"prompt": context["prompt"]}), expected)


def test_no_references_is_the_plain_unet_after_training() -> None:
    plain, mrc = _trained()
    _perturb(mrc.reference)
    x, t = _inputs()
    prompt = {"prompt": _ctx(6)}
    with torch.no_grad():
        expected = plain(x, t, context=prompt)
        assert torch.equal(mrc(x, t, context=prompt), expected)
        assert torch.equal(mrc(x, t, context=prompt, references=None), expected)
        assert not torch.equal(mrc(x, t, context={**prompt, REFCAP: _ctx(10)}, references=_refs(3)), expected)


def test_one_step_opens_the_reference_path() -> None:
    _, mrc = _pair()
    mrc.train()
    x, t = _inputs()
    context, refs = _context(), _refs(3)
    target = torch.randn(B, 4, T, FREQ)
    opt = torch.optim.Adam(mrc.parameters(), lr=1e-2)

    (mrc(x, t, context=context, references=refs) - target).square().mean().backward()
    conv_in_grad = mrc.reference.conv_in.weight.grad
    assert conv_in_grad is not None and torch.count_nonzero(conv_in_grad) == 0  # zero projections block it
    assert all(torch.count_nonzero(c.weight.grad) > 0 for c in [*mrc.projections.skips, mrc.projections.mid])
    opt.step()
    opt.zero_grad()

    assert all(torch.count_nonzero(c.weight) > 0 for c in [*mrc.projections.skips, mrc.projections.mid])
    with torch.no_grad():
        assert not torch.equal(mrc(x, t, context=context, references=refs), mrc(x, t, context=context))
    (mrc(x, t, context=context, references=refs) - target).square().mean().backward()
    assert torch.count_nonzero(mrc.reference.conv_in.weight.grad) > 0


def test_reference_mask_zeroes_rows() -> None:
    _, mrc = _trained()
    x, t = _inputs()
    context, refs = _context(), _refs(3)
    with torch.no_grad():
        with_refs = mrc(x, t, context=context, references=refs)
        without = mrc(x, t, context=context)
        mixed = mrc(x, t, context=context, references=refs, reference_mask=torch.tensor([True, False]))
    assert torch.equal(mixed[0], with_refs[0])
    assert torch.equal(mixed[1], without[1])
    assert not torch.equal(with_refs[1], without[1])


@pytest.mark.parametrize(("k", "t_r"), [(1, T), (2, T), (3, T), (3, 4), (1, 4), (5, 2)])
def test_output_shapes_for_reference_counts_and_lengths(k: int, t_r: int) -> None:
    _, mrc = _trained()
    x, t = _inputs()
    context = _context()
    with torch.no_grad():
        out = mrc(x, t, context=context, references=_refs(k, t_r))
        assert out.shape == (B, 4, T, FREQ) and torch.isfinite(out).all()
        assert not torch.equal(out, mrc(x, t, context=context))
        mid, skips = mrc.encode_references(_refs(k, t_r), t, context=context)
    assert skips[0].shape == (B, 8, k * t_r, FREQ)  # the reference path keeps the references' own length
    assert mid.shape == (B, 16, k * t_r // 2, FREQ // 2)


def test_empty_reference_captions_are_allowed() -> None:
    _, mrc = _trained()
    x, t = _inputs()
    with torch.no_grad():
        out = mrc(x, t, context={"prompt": _ctx(6), REFCAP: _ctx(10, length=0)}, references=_refs(2))
    assert out.shape == (B, 4, T, FREQ) and torch.isfinite(out).all()


# ---------------------------------------------------------------- structure


def test_registered() -> None:
    # the first registry lookup of a session imports every built-in module (seconds, once)
    assert get("mrc_unet", "network") is MRCUNet and get("reference_align", "network") is ReferenceAlignment


def test_structure_and_shared_encoder() -> None:
    dual = MRCUNet(**MRC)
    shared = MRCUNet(**MRC, share_encoder=True)
    assert isinstance(dual.reference, ReferenceEncoder) and shared.reference is None
    n_dual = sum(p.numel() for p in dual.parameters())
    n_shared = sum(p.numel() for p in shared.parameters())
    assert n_shared < n_dual

    names = [n for n, _ in dual.named_modules()]
    refcap = [n for n in names if n.endswith(f"cross_attns.{REFCAP}")]
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in refcap} == {"unet.up_blocks", "reference.down_blocks",
                                                                          "reference.mid_block"}
    assert not any(n.startswith(("reference.up_blocks", "reference.conv_out")) for n in names)
    assert dual.context_dims == {"prompt": 6, REFCAP: 10} and dual.unet.stage_contexts["down"] == ("prompt",)
    with pytest.raises(TypeError, match="no decoder"):
        dual.reference.decode()

    _, t = _inputs()
    refs, context = _refs(2), _context()
    for model, tied in ((shared, True), (dual, False)):
        with torch.no_grad():
            mid, skips = model.encode_references(refs, t, context=context)
            if tied:  # the references run through the feature path's own encoder
                unet = model.unet
                ctx = unet.prepare_context({REFCAP: context[REFCAP]}, B)
                mid2, skips2 = unet.encode(refs, unet.embed(t, None, B, refs.dtype), ctx)
                assert torch.equal(mid, mid2) and all(torch.equal(a, b) for a, b in zip(skips, skips2))
            model.unet.conv_in.weight.add_(1.0)
            changed = not torch.equal(model.encode_references(refs, t, context=context)[0], mid)
        assert changed is tied


def test_gradient_checkpointing_same_output() -> None:
    _, mrc = _trained()
    x, t = _inputs()
    context, refs = _context(), _refs(3)
    out = mrc(x, t, context=context, references=refs)
    mrc.gradient_checkpointing = True
    assert mrc.reference.gradient_checkpointing and mrc.unet.gradient_checkpointing
    torch.testing.assert_close(mrc(x, t, context=context, references=refs), out)


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors() -> None:
    _, mrc = _pair()
    x, t = _inputs()
    context = _context()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"references must have shape \(B=2, ref_channels=4"):
            mrc(x, t, context=context, references=_refs(3, channels=3))
        with pytest.raises(ValueError, match="context has no 'refcap' entry"):
            mrc(x, t, context={"prompt": context["prompt"]}, references=_refs(3))
        with pytest.raises(ValueError, match="context has no 'refcap' entry"):
            mrc(x, t, references=_refs(3))
        with pytest.raises(ValueError, match="time length 9 .* divisible by 2"):
            mrc(x, t, context=context, references=torch.randn(B, 4, 9, FREQ))
        with pytest.raises(ValueError, match=r"context\['refcap'\] sequence must have shape"):
            mrc(x, t, context={**context, REFCAP: _ctx(7)}, references=_refs(1))
        with pytest.raises(ValueError, match="reference_mask must be a bool tensor"):
            mrc(x, t, context=context, references=_refs(1), reference_mask=torch.ones(B))
        with pytest.raises(ValueError, match="reference_mask was given without references"):
            mrc(x, t, context=context, reference_mask=torch.ones(B, dtype=torch.bool))


def test_bad_construction_and_loading() -> None:
    with pytest.raises(ValueError, match="remove 'refcap' from context_dims"):
        MRCUNet(**{**MRC, "context_dims": {"prompt": 6, REFCAP: 10}})
    with pytest.raises(ValueError, match=r"ref_channels \(8\) must equal in_channels \(4\)"):
        MRCUNet(**MRC, ref_channels=8, share_encoder=True)
    mrc = MRCUNet(**MRC, ref_channels=8)  # a separate path takes any reference channels
    assert mrc.reference.conv_in.in_channels == 8

    plain = UNetModel(**TINY)
    state = plain.state_dict()
    with pytest.raises(WeightMismatchError, match=r"missing keys \(1\): conv_in.bias"):
        mrc.load_unet({k: v for k, v in state.items() if k != "conv_in.bias"})
    with pytest.raises(WeightMismatchError, match=r"unexpected keys \(1\): extra"):
        mrc.load_unet({**state, "extra": torch.zeros(1)})
    with pytest.raises(WeightMismatchError, match="shape mismatches"):
        mrc.load_unet({**state, "conv_in.bias": torch.zeros(3)})


# ---------------------------------------------------------------- reference alignment


@pytest.mark.parametrize("k_in", [1, 2, 3, 4, 5])
def test_alignment_output_shape(k_in: int) -> None:
    align = ReferenceAlignment(channels=4, num_references=3, reference_length=4, hidden_channels=8)
    refs = torch.randn(B, 4, k_in * 4, FREQ)
    out = align(refs)
    assert out.shape == (B, 4, 12, FREQ)
    if k_in == 3:
        assert torch.equal(out, refs)  # identity at initialisation for the trained count


def test_alignment_errors() -> None:
    align = ReferenceAlignment(channels=4, num_references=3, reference_length=4)
    with pytest.raises(ValueError, match=r"expects references of shape \(B, 4"):
        align(torch.randn(B, 3, 12, FREQ))
    with pytest.raises(ValueError, match="10 frames, not a positive multiple of reference_length=4"):
        align(torch.randn(B, 4, 10, FREQ))
    with pytest.raises(ValueError, match="positive"):
        ReferenceAlignment(num_references=0)


def test_alignment_finetune_leaves_mrc_untouched() -> None:
    _, mrc = _trained()
    _perturb(mrc.reference, 0.05)
    mrc.requires_grad_(False)
    frozen = {k: v.clone() for k, v in mrc.state_dict().items()}
    align = ReferenceAlignment(channels=4, num_references=3, reference_length=4, hidden_channels=8)
    start = {k: v.clone() for k, v in align.state_dict().items()}
    opt = torch.optim.Adam(align.parameters(), lr=1e-2)
    x, t = _inputs()
    context = _context()
    four = _refs(4, t_r=4)
    with torch.no_grad():
        target = mrc(x, t, context=context, references=_refs(3, t_r=4))
    losses = []
    for _ in range(15):
        loss = (mrc(x, t, context=context, references=align(four)) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, frozen[k]) for k, v in mrc.state_dict().items())
    assert all(p.grad is None for p in mrc.parameters())
    assert any(not torch.equal(v, start[k]) for k, v in align.state_dict().items())
