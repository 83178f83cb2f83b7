"""The published AudioMAE checkpoint layout loads strictly into `AudioMAE` (tiny random stand-in)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from tta.encoders.audiomae import AudioMAE, sincos_2d
from tta.encoders.audiomae_import import convert, load_audiomae_weights
from tta.retrieval.features_extract import RetrievalFeatureExtractor
from tta.utils.weights import WeightMismatchError

TINY = {"out_dim": 8, "reduction": "group_mean", "embed_dim": 32, "depth": 2, "num_heads": 2, "num_frames": 64,
        "clip_seconds": 0.64}
ROWS, COLS = 64 // 16, 128 // 16


def official_checkpoint(path: Path, encoder: AudioMAE, pos: torch.Tensor | None = None, **extra: torch.Tensor) -> Path:
    """Write ``encoder``'s weights as the MAE training script does: ``{"model": ..., "args": ...}``
    with the fixed pos_embed ([CLS] zeros first) and the decoder's tensors."""
    state = dict(encoder.state_dict())
    table = sincos_2d(32, ROWS, COLS) if pos is None else pos
    state["pos_embed"] = torch.cat([torch.zeros(1, 32), table]).unsqueeze(0)
    state.update({"mask_token": torch.randn(1, 1, 16), "decoder_embed.weight": torch.randn(16, 32),
                  "decoder_embed.bias": torch.randn(16), "decoder_pos_embed": torch.randn(1, 33, 16),
                  "decoder_blocks.0.norm1.weight": torch.randn(16), "decoder_norm.weight": torch.randn(16),
                  "decoder_pred.weight": torch.randn(256, 16)}, **extra)
    torch.save({"model": state, "epoch": 32, "args": argparse.Namespace(model="mae_vit_base_patch16")}, path)
    return path


def _wav() -> torch.Tensor:
    return torch.randn(2, 10240, generator=torch.Generator().manual_seed(0))


def test_official_checkpoint_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = AudioMAE(**TINY).eval()
    ckpt = official_checkpoint(tmp_path / "pretrained.pth", source)
    torch.manual_seed(2)
    target = AudioMAE(**TINY).eval()
    assert not torch.equal(target.cls_token, source.cls_token)
    load_audiomae_weights(target, ckpt)
    with torch.no_grad():
        a, b = source(_wav()), target(_wav())
    assert torch.equal(a.pooled, b.pooled) and torch.equal(a.seq, b.seq)
    # the conversion writes tta's layout, which the plain strict loader then reads
    out = convert(ckpt, tmp_path / "mae.safetensors", **TINY)
    again = load_audiomae_weights(AudioMAE(**TINY).eval(), out)
    with torch.no_grad():
        assert torch.equal(again(_wav()).pooled, a.pooled)


def test_group_mean_reduction_is_weight_free_and_exact() -> None:
    torch.manual_seed(0)
    mae = AudioMAE(**TINY).eval()
    assert mae.proj is None and not any(k.startswith("proj") for k in mae.state_dict())
    with torch.no_grad():
        emb = mae(_wav())
    expected = emb.seq.mean(dim=1).view(2, 8, 4).mean(dim=-1)
    assert emb.pooled.shape == (2, 8) and torch.allclose(emb.pooled, expected, atol=1e-7)
    with pytest.raises(ValueError, match="out_dim \\(7\\) to divide embed_dim \\(32\\)"):
        AudioMAE(**{**TINY, "out_dim": 7})
    with pytest.raises(ValueError, match="reduction must be one of"):
        AudioMAE(**{**TINY, "reduction": "pca"})


def test_strictness_and_layout_checks(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = AudioMAE(**TINY)
    extra = official_checkpoint(tmp_path / "extra.pth", source, **{"blocks.0.attn.scale": torch.ones(1)})
    with pytest.raises(WeightMismatchError, match="blocks.0.attn.scale"):
        load_audiomae_weights(AudioMAE(**TINY), extra)
    # a table laid out time-first instead of frequency-first is refused, not loaded wrongly
    swapped = torch.cat([sincos_2d(32, ROWS, COLS)[:, 16:], sincos_2d(32, ROWS, COLS)[:, :16]], dim=1)
    with pytest.raises(ValueError, match="pos_embed differs"):
        load_audiomae_weights(AudioMAE(**TINY), official_checkpoint(tmp_path / "swap.pth", source, pos=swapped))
    with pytest.raises(ValueError, match="pos_embed has"):
        load_audiomae_weights(AudioMAE(**{**TINY, "num_frames": 128, "clip_seconds": 1.28}),
                              official_checkpoint(tmp_path / "ok.pth", source))
    # the linear reduction's proj is not in the public checkpoint: named as missing
    with pytest.raises(WeightMismatchError, match="proj.weight"):
        load_audiomae_weights(AudioMAE(**{**TINY, "reduction": "linear"}), tmp_path / "ok.pth")
    finetuned = {k: v for k, v in source.state_dict().items() if not k.startswith("norm.")}
    finetuned.update({"fc_norm.weight": torch.ones(32), "head.weight": torch.zeros(527, 32)})
    torch.save({"model": finetuned}, tmp_path / "finetuned.pth")
    with pytest.raises(ValueError, match="fine-tuned AudioMAE classifier"):
        load_audiomae_weights(AudioMAE(**TINY), tmp_path / "finetuned.pth")


def test_feature_extractor_reads_the_published_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = AudioMAE(**TINY)
    ckpt = official_checkpoint(tmp_path / "pretrained.pth", source)
    module = RetrievalFeatureExtractor(str(tmp_path / "store"), audio_encoder=AudioMAE(**TINY),
                                       audio_weights=str(ckpt), audio_source="pooled", mel="audioldm")
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in module.audio_encoder.state_dict().items())
