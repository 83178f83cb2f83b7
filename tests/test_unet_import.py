"""Import of diffusers ``UNet2DConditionModel`` (AudioLDM layout) weights into `UNetModel`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tta.generators.ldm.unet_import import (
    convert_diffusers_unet_state_dict,
    unet_config_from_diffusers,
    unet_from_diffusers,
)
from tta.utils.weights import WeightMismatchError

pytestmark = pytest.mark.usefixtures("single_thread")

CHANNELS = [16, 32, 48]
AUDIOLDM_TINY: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 8,
    "out_channels": 8,
    "block_out_channels": CHANNELS,
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": CHANNELS,  # AudioLDM: attn2 attends to the hidden states
    "attention_head_dim": 2,  # a head *count* in diffusers (AudioLDM: 8)
    "norm_num_groups": 8,
    "class_embed_type": "simple_projection",
    "projection_class_embeddings_input_dim": 12,
    "class_embeddings_concat": True,
}
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def diffusers_unet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A tiny random AudioLDM-layout diffusers UNet saved with ``save_pretrained``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**AUDIOLDM_TINY).eval()
    with (
        torch.no_grad()
    ):  # move every tensor off its init so nothing matches by accident
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("audioldm") / "unet"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 8, 16, 8, generator=g),
        torch.tensor([10, 981]),
        torch.randn(2, 12, generator=g),
    )


def _copy_with(folder: Path, dest: Path, state: dict[str, torch.Tensor]) -> Path:
    dest.mkdir()
    (dest / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, str(dest / WEIGHTS))
    return dest


def test_outputs_equal_diffusers(diffusers_unet: tuple[Any, Path]) -> None:
    ref_model, folder = diffusers_unet
    ours = unet_from_diffusers(folder).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for p in ref_model.parameters()
    )
    x, t, film = _inputs()
    with torch.no_grad():
        ref = ref_model(x, t, encoder_hidden_states=None, class_labels=film).sample
        out = ours(x, t, film=film)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # a pipeline folder (``unet/`` inside) loads the same
    torch.testing.assert_close(
        unet_from_diffusers(folder.parent).eval()(x, t, film=film).detach(), out
    )


def test_config_translation(diffusers_unet: tuple[Any, Path]) -> None:
    _, folder = diffusers_unet
    kwargs = unet_config_from_diffusers(
        json.loads((folder / "config.json").read_text())
    )
    assert kwargs["model_channels"] == 16 and kwargs["channel_mult"] == (1, 2, 3)
    assert kwargs["attention_resolutions"] == (2, 4) and kwargs["num_heads"] == (
        2,
        2,
        2,
    )
    assert (
        kwargs["film_dim"] == 12
        and kwargs["num_res_blocks"] == 1
        and kwargs["num_groups"] == 8
    )


def test_state_dict_source_and_retrieval_extension(
    diffusers_unet: tuple[Any, Path],
) -> None:
    ref_model, folder = diffusers_unet
    state = load_file(str(folder / WEIGHTS))
    with pytest.raises(ValueError, match="needs its diffusers config"):
        unet_from_diffusers(state)
    config = json.loads((folder / "config.json").read_text())
    re_model = unet_from_diffusers(state, config, context_dims={"retrieval": 6}).eval()
    assert re_model.context_dims == {"retrieval": 6}
    x, t, film = _inputs()
    ctx = {"retrieval": (torch.randn(2, 4, 6), torch.ones(2, 4, dtype=torch.bool))}
    with torch.no_grad():
        ref = ref_model(x, t, encoder_hidden_states=None, class_labels=film).sample
        out = re_model(x, t, film=film, context=ctx)
    torch.testing.assert_close(
        out, ref, rtol=0, atol=1e-5
    )  # zero-init retrieval: starts at AudioLDM


def test_key_table_renames_only_resnet_entries() -> None:
    sd = {
        "down_blocks.0.resnets.0.time_emb_proj.weight": torch.zeros(1),
        "up_blocks.1.resnets.2.conv_shortcut.bias": torch.zeros(1),
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.weight": torch.zeros(
            1
        ),
        "class_embedding.weight": torch.zeros(1),
    }
    assert sorted(convert_diffusers_unet_state_dict(sd)) == [
        "class_embedding.weight",
        "down_blocks.0.resnets.0.temb_proj.weight",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.weight",
        "up_blocks.1.resnets.2.nin_shortcut.bias",
    ]
    with pytest.raises(ValueError, match="add_embedding.linear_1.weight"):
        convert_diffusers_unet_state_dict(
            {**sd, "add_embedding.linear_1.weight": torch.zeros(1)}
        )


def test_missing_and_extra_keys_raise(
    diffusers_unet: tuple[Any, Path], tmp_path: Path
) -> None:
    _, folder = diffusers_unet
    state = load_file(str(folder / WEIGHTS))
    missing = dict(state)
    del missing["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    with pytest.raises(
        WeightMismatchError, match=r"missing keys \(1\): mid_block.*attn2.to_k.weight"
    ):
        unet_from_diffusers(_copy_with(folder, tmp_path / "missing", missing))
    extra = {
        **state,
        "down_blocks.0.attentions.0.norm.weight": torch.ones(16),
    }  # level 0 has no attention
    with pytest.raises(
        WeightMismatchError,
        match=r"unexpected keys \(1\): down_blocks.0.attentions.0.norm.weight",
    ):
        unet_from_diffusers(_copy_with(folder, tmp_path / "extra", extra))
    with pytest.raises(WeightMismatchError, match="missing keys"):
        unet_from_diffusers(
            missing,
            json.loads((folder / "config.json").read_text()),
            context_dims={"retrieval": 6},
        )
    with pytest.raises(FileNotFoundError, match="config.json"):
        unet_from_diffusers(tmp_path)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"cross_attention_dim": 768}, "cross_attention_dim"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"class_embeddings_concat": False}, "class_embeddings_concat"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        (
            {"up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]},
            "only mirrored",
        ),
        ({"addition_embed_type": "text"}, "addition_embed_type"),
        ({"some_new_option": 1}, "some_new_option"),
    ],
)
def test_unsupported_configs_raise(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        unet_config_from_diffusers({**AUDIOLDM_TINY, **change})
