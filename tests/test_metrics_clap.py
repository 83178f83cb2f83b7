"""CLAP score (eq. 7) and CLAP_A (eq. 8): definitions, pairing, and ranking with a trained tiny CLAP."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.hf_fixtures import make_bert_folder
from tta.data.synth import render_event
from tta.encoders.clap.network import CLAP, clip_loss
from tta.encoders.cnn14 import CNN14
from tta.encoders.text import BertTextEncoder
from tta.metrics.clap_score import CLAPAudioScore, CLAPScore, clap_cosine
from tta.metrics.embedders import CLAPAudioEmbedder
from tta.metrics.pairing import IdMismatchError

pytestmark = pytest.mark.usefixtures("single_thread")
SR = 16000
EVENTS = {"tone": "a steady tone", "white_noise": "white noise hisses", "dog_bark": "a dog barks",
          "bell": "a bell rings", "engine": "an engine hums", "rain": "rain falls"}  # fmt: skip
TINY_MEL = {"sample_rate": SR, "n_fft": 512, "win_length": 512, "hop_length": 160, "n_mels": 32, "f_min": 0.0,
            "f_max": 8000.0}  # fmt: skip


def test_clap_cosine_is_eq_7_with_an_epsilon() -> None:
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[6.0, 8.0], [0.0, 2.0], [1.0, 1.0]])
    torch.testing.assert_close(
        clap_cosine(a, b), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="one shape"):
        clap_cosine(a, b[:2])


def test_clap_a_pairs_by_id_and_errors_on_mismatch() -> None:
    g = torch.Generator().manual_seed(0)
    gen, ref = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    ids = ["a", "b", "c", "d"]
    metric = CLAPAudioScore()
    metric.update(gen, ids)
    metric.update(ref.flip(0), ids[::-1], real=True)
    assert float(metric.compute()) == pytest.approx(
        float(clap_cosine(gen, ref).mean()), rel=1e-12
    )
    same = CLAPAudioScore()
    same.update(gen, ids)
    same.update(gen * 2.5, ids, real=True)  # eq. 8 is scale-free
    assert float(same.compute()) == pytest.approx(1.0)
    bad = CLAPAudioScore()
    bad.update(gen, ids)
    bad.update(ref, ["a", "b", "c", "x"], real=True)
    with pytest.raises(IdMismatchError, match=r"\(d\).*\(x\)"):
        bad.compute()


@pytest.fixture(scope="module")
def trained_clap(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[CLAP, torch.Tensor, list[str]]:
    """A tiny CLAP (CNN14 audio tower, BERT text tower) trained until it matches 6 clips to captions."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    wav = torch.stack([torch.from_numpy(render_event(name, np.random.default_rng(i), SR, SR)).float() * 0.5
                       for i, name in enumerate(EVENTS)])  # fmt: skip
    captions = list(EVENTS.values())
    audio = CNN14(
        dim=32, channels=(8, 16, 32), num_classes=None, dropout=(0.0, 0.0), mel=TINY_MEL
    )
    text = BertTextEncoder(
        make_bert_folder(tmp_path_factory.mktemp("bert")), max_length=16, trainable=True
    )
    clap = CLAP(audio, text, joint_dim=16, temperature=0.1, dropout=0.0)
    opt = torch.optim.Adam(clap.parameters(), lr=3e-3)
    for _ in range(150):
        loss = clip_loss(*clap(wav, captions), clap.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    # BatchNorm running statistics lag after a few steps: set them to this batch's statistics
    for m in clap.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = (
                None  # cumulative average: one pass gives the exact batch statistics
            )
    with torch.no_grad():
        clap.embed_audio(wav)
    clap.eval()
    return clap, wav, captions


def test_clap_score_ranks_matching_above_mismatched_pairs(trained_clap) -> None:
    clap, wav, captions = trained_clap
    ids = list(EVENTS)
    match, mismatch = CLAPScore(clap), CLAPScore(clap)
    match.update(wav, captions, ids)
    shifted = captions[1:] + captions[:1]
    mismatch.update(wav, shifted, ids)
    names, per_match = match.per_item()
    _, per_mismatch = mismatch.per_item()
    assert names == ids
    assert (per_match > per_mismatch).all(), (per_match, per_mismatch)
    assert float(match.compute()) > float(mismatch.compute()) + 0.2
    # CLAP_A: a clip against itself scores 1, against another clip less
    emb = CLAPAudioEmbedder(clap)
    assert (
        emb.dim == 16
        and emb.sample_rate == SR
        and len(emb.weight_hash) == 64
        and not emb.has_classifier
    )
    same, other = CLAPAudioScore(clap), CLAPAudioScore(clap)
    for m, ref in ((same, wav), (other, wav.roll(1, dims=0))):
        m.update(wav, ids)
        m.update(ref, ids, real=True)
    assert float(same.compute()) == pytest.approx(1.0, abs=1e-5)
    assert float(other.compute()) < 0.9
    with pytest.raises(ValueError, match="non-empty prompt"):
        CLAPScore(clap).update(wav[:1], [" "], ids[:1])


def test_clap_embedder_from_a_trainer_checkpoint(tmp_path: Path, trained_clap) -> None:
    """``clap:CKPT`` goes through load_trained; a non-CLAP checkpoint is refused by name."""
    from tta.metrics.embedders import build_embedder

    with pytest.raises(ValueError, match="clap:PATH"):
        build_embedder("clap")
    with pytest.raises(ValueError, match="unknown embedder"):
        build_embedder("openl3")
    with pytest.raises(FileNotFoundError):
        build_embedder(f"clap:{tmp_path / 'missing.ckpt'}")
