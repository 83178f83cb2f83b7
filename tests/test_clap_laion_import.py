"""LAION ``ClapModel`` import: embeddings equal transformers', strict keys, the laion front-end."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.hf_fixtures import roberta_tokenizer
from tta.data.mel import MelConfig, MelFrontend
from tta.encoders.clap.network import CLAP, Projection
from tta.encoders.clap_import import LaionCLAP, load_laion_clap
from tta.encoders.htsat import HTSAT
from tta.utils.weights import WeightMismatchError

pytestmark = pytest.mark.usefixtures("single_thread")

CAPTIONS = ["a dog barks", "rain falls on a roof in the morning", "wind"]
WINDOW = 28800  # 0.6 s at 48 kHz: 61 mel frames, resized to the 64 of spec_size 32 x freq_ratio 2


def build_laion_folder(folder: Path, **audio_overrides: Any) -> tuple[Path, Any, Any, Any]:
    """A tiny random transformers ``ClapModel`` (2 Swin stages, shifted windows) with tokenizer + extractor."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    tok = roberta_tokenizer()
    text = {"vocab_size": len(tok), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 66}  # fmt: skip
    audio = {"hidden_size": 16, "patch_embeds_hidden_size": 8, "depths": [2, 2], "num_attention_heads": [1, 2],
             "spec_size": 32, "num_mel_bins": 16, "window_size": 4, "patch_size": 4,
             "patch_stride": [4, 4]}  # fmt: skip
    audio.update(audio_overrides)
    torch.manual_seed(0)
    model = ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=12))
    with torch.no_grad():  # move everything off its init values, so a mis-mapped tensor shows
        for name, p in model.named_parameters():
            if name.startswith(("audio", "text_projection")):
                p.add_(0.1 * torch.randn_like(p))
        bn = model.audio_model.audio_encoder.batch_norm
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        model.logit_scale_a.fill_(3.0)
    model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    fe = ClapFeatureExtractor(feature_size=16, frequency_min=50, frequency_max=14000, truncation="rand_trunc",
                              padding="repeatpad", max_length_s=WINDOW / 48000)  # fmt: skip
    fe.save_pretrained(folder)
    return folder, model, tok, fe


@pytest.fixture(scope="module")
def laion(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder, model, tok, fe = build_laion_folder(tmp_path_factory.mktemp("laion") / "clap")
    clap = load_laion_clap(folder, text_max_length=32).eval()
    return {"folder": folder, "model": model, "tok": tok, "fe": fe, "clap": clap}


def test_imported_is_a_full_clap_with_laion_heads(laion: dict[str, Any]) -> None:
    clap = laion["clap"]
    assert isinstance(clap, LaionCLAP) and isinstance(clap, CLAP)
    assert clap.joint_dim == 12 and clap.audio_encoder.dim == 16 and clap.text_encoder.dim == 32
    assert clap.audio_projection.style == clap.text_projection.style == "laion"
    assert float(clap.logit_scale.detach()) == 3.0
    assert clap.audio_encoder.sample_rate == 48000 and clap.audio_encoder.window_samples == WINDOW
    assert clap.audio_encoder.frontend.config == MelConfig.preset("laion", n_mels=16)
    assert clap.text_encoder.frozen


def test_text_embeddings_equal_get_text_features(laion: dict[str, Any]) -> None:
    enc = laion["tok"](CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = laion["model"].get_text_features(**enc).pooler_output
        ours = laion["clap"].embed_text(CAPTIONS)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_audio_embeddings_equal_get_audio_features(laion: dict[str, Any]) -> None:
    clap, fe = laion["clap"], laion["fe"]
    g = np.random.default_rng(0)
    wavs = [(0.3 * g.standard_normal(n)).astype(np.float32) for n in (WINDOW, 11000, 20000)]
    feats = fe(wavs, sampling_rate=48000, max_length=WINDOW, return_tensors="pt")["input_features"]
    assert feats.shape == (3, 1, 61, 16)
    with torch.no_grad():
        ref = laion["model"].get_audio_features(input_features=feats).pooler_output
        # 1. from the same input features (the tower alone)
        frames = clap.audio_encoder.encode_mel(feats[:, 0].transpose(1, 2).float())
        ours = F.normalize(clap.audio_projection(frames.mean(1)), dim=-1)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
        # 2. from the waveforms: our front-end + LAION's repeat-padding of short clips
        for i, wav in enumerate(wavs):
            got = clap.embed_audio(torch.from_numpy(wav)[None])
            torch.testing.assert_close(got[0], ref[i], atol=1e-4, rtol=0)


def test_laion_front_end_equals_clap_feature_extractor() -> None:
    from transformers import ClapFeatureExtractor

    fe = ClapFeatureExtractor(frequency_min=50, frequency_max=14000, truncation="rand_trunc", padding="repeatpad")
    wav = (0.3 * np.random.default_rng(1).standard_normal(480000)).astype(np.float32)  # 10 s at 48 kHz
    ref = fe(wav, sampling_rate=48000, return_tensors="pt")["input_features"][0, 0].T.float()
    frontend = MelFrontend("laion")
    ours = frontend(torch.from_numpy(wav))[0]
    assert ours.shape == ref.shape == (64, frontend.config.num_frames(480000)) == (64, 1001)
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)  # dB values up to ~30
    quiet = torch.zeros(4800)
    assert float(frontend(quiet).min()) == pytest.approx(-100.0)  # 10 log10(1e-10)


def _rewrite(src: Path, dst: Path, edit: Any) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_strict_loading_lists_missing_and_unexpected_keys(laion: dict[str, Any], tmp_path: Path) -> None:
    def drop_and_add(state: dict[str, torch.Tensor]) -> None:
        del state["audio_model.audio_encoder.layers.0.blocks.1.attention.self.key.weight"]
        del state["audio_model.audio_encoder.norm.bias"]
        state["audio_model.audio_encoder.fusion_model.local_att.0.weight"] = torch.zeros(2, 8, 1, 1)

    bad = _rewrite(laion["folder"], tmp_path / "bad", drop_and_add)
    with pytest.raises(WeightMismatchError) as err:
        load_laion_clap(bad, text_max_length=32)
    msg = str(err.value)
    assert "missing keys (2): layers.0.blocks.1.attn.qkv.weight, norm.bias" in msg
    assert "unexpected keys (1): audio_model.audio_encoder.fusion_model.local_att.0.weight" in msg
    assert "layers.0.blocks.1.attn.qkv.weight: only ['query', 'value']" in msg

    def bad_projection(state: dict[str, torch.Tensor]) -> None:
        state["audio_projection.linear1.weight"] = torch.zeros(12, 17)
        del state["logit_scale_a"]

    with pytest.raises(WeightMismatchError, match=r"audio_projection.*linear1.weight: \(12, 17\)"):
        load_laion_clap(_rewrite(laion["folder"], tmp_path / "proj", bad_projection), text_max_length=32)

    def stray(state: dict[str, torch.Tensor]) -> None:
        state["classifier.weight"] = torch.zeros(2)

    with pytest.raises(WeightMismatchError, match="unexpected top-level keys for a ClapModel: classifier.weight"):
        load_laion_clap(_rewrite(laion["folder"], tmp_path / "stray", stray), text_max_length=32)


def test_fusion_models_are_refused(tmp_path: Path) -> None:
    folder, *_ = build_laion_folder(tmp_path / "fused", enable_fusion=True, fusion_type="channel_map")
    with pytest.raises(ValueError, match=r"audio_config.enable_fusion=True is not supported"):
        load_laion_clap(folder, text_max_length=32)


def test_projection_and_htsat_defaults_are_unchanged() -> None:
    assert set(Projection(8, 4).state_dict()) == {"linear1.weight", "linear2.weight", "norm.weight", "norm.bias"}
    assert set(Projection(8, 4, style="laion").state_dict()) == {
        "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}  # fmt: skip
    with pytest.raises(ValueError, match="style must be"):
        Projection(8, 4, style="clip")  # type: ignore[arg-type]
    kw = {"dim": 16, "embed_dim": 8, "depths": (1, 1), "num_heads": (1, 2), "window_size": 4, "spec_frames": 64,
          "window_seconds": 0.5, "mel": {"n_mels": 32}}  # fmt: skip
    assert any(k.startswith("tscam_conv.") for k in HTSAT(**kw).state_dict())
    mean = HTSAT(**kw, head="mean")
    assert not any(k.startswith("tscam_conv.") for k in mean.state_dict())
    out = mean.eval()(0.1 * torch.randn(2, 22050))
    assert out.pooled.shape == (2, 16) and out.seq.shape == (2, mean.frames_per_window, 16) == (2, 8, 16)
    torch.testing.assert_close(out.pooled, out.seq.mean(1))
    with pytest.raises(ValueError, match="must be the last stage's width"):
        HTSAT(**dict(kw, dim=24), head="mean")


def test_laion_clap_is_configurable_by_name(laion: dict[str, Any]) -> None:
    from jsonargparse import ArgumentParser

    from tta.registry import resolve

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(CLAP, "clap")
    init = {"path": str(laion["folder"]), "text_max_length": 32}
    cfg = parser.parse_object({"clap": {"class_path": resolve("laion_clap"), "init_args": init}})
    clap = parser.instantiate_classes(cfg).clap.eval()
    assert isinstance(clap, LaionCLAP)
    with torch.no_grad():
        torch.testing.assert_close(clap.embed_text(CAPTIONS), laion["clap"].embed_text(CAPTIONS))
