"""CLAPModule: contrastive training overfits a tiny set (retrieval R@1 -> 1.0), eval metrics."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.hf_fixtures import make_bert_folder
from tta.data.datamodule import AudioDataModule
from tta.data.manifest import read_manifest, write_manifest
from tta.encoders.clap.module import CLAPModule
from tta.encoders.clap.network import CLAP
from tta.encoders.htsat import HTSAT
from tta.encoders.text import BertTextEncoder
from tta.metrics.retrieval import caption_retrieval_metrics

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_clap(bert: Path) -> CLAPModule:
    torch.manual_seed(0)
    audio = HTSAT(dim=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, spec_frames=64,
                  freq_ratio=4, drop_path=0.0, window_seconds=1.0, mel_preset="demo")
    text = BertTextEncoder(bert, max_length=32, trainable=True)
    clap = CLAP(audio, text, joint_dim=32, temperature=0.07, dropout=0.0)
    return CLAPModule(clap, mel="demo", lr=3e-3)


@pytest.fixture(scope="module")
def eight_clips(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 training clips with distinct captions; val = the same clips."""
    seen, chosen = set(), []
    for item in read_manifest(tiny_synth):
        if item.split == "train" and item.captions[0] not in seen:
            seen.add(item.captions[0])
            item.captions = item.captions[:1]
            chosen.append(item)
    assert len(chosen) >= 8
    return write_manifest(chosen[:8], tmp_path_factory.mktemp("clap") / "eight.jsonl")


def test_clap_overfits_tiny_set_retrieval_r1_reaches_one(eight_clips: Path, tmp_path: Path) -> None:
    module = tiny_clap(make_bert_folder(tmp_path / "bert"))
    # whole 1 s clips (no random crops): the training batch is the evaluation batch
    dm = AudioDataModule(manifest=str(eight_clips), mel="demo", segment_seconds=None, batch_size=8,
                         val_split="train", test_split="train")
    trainer = L.Trainer(accelerator="cpu", max_steps=150, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp_path)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    module.eval()
    with torch.no_grad():
        before = module.evaluate(*module.clap(batch["wav"], batch["caption"]))
    trainer.fit(module, datamodule=dm)
    module.eval()
    with torch.no_grad():
        after = module.evaluate(*module.clap(batch["wav"], batch["caption"]))
    assert after["loss"] < 0.5 * before["loss"]
    assert after["t2a_R@1"] == 1.0 and after["a2t_R@1"] == 1.0, after
    assert before["t2a_R@1"] < 1.0
    # test loop: retrieval over the split + zero-shot from label prompts
    metrics = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert metrics["test/t2a_R@1"] == 1.0
    assert 0.0 <= metrics["test/zero_shot_mAP"] <= 1.0
    # deterministic embeddings: one clip alone equals the same clip in a batch
    with torch.no_grad():
        alone = module.clap.embed_audio(batch["wav"][:1])
        batched = module.clap.embed_audio(batch["wav"])[:1]
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=1e-4)


def test_sample_rate_mismatch_is_refused(tmp_path: Path) -> None:
    audio = HTSAT(dim=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, spec_frames=64,
                  freq_ratio=4, window_seconds=0.5, mel_preset="demo")
    clap = CLAP(audio, BertTextEncoder(make_bert_folder(tmp_path / "bert"), max_length=16), joint_dim=16)
    with pytest.raises(ValueError, match="expects 22050 Hz but mel preset 'audioldm'"):
        CLAPModule(clap, mel="audioldm")


def test_frozen_text_tower_is_cached_and_equal(tmp_path: Path) -> None:
    audio = HTSAT(dim=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, spec_frames=64,
                  freq_ratio=4, window_seconds=0.5, mel_preset="demo")
    text = BertTextEncoder(make_bert_folder(tmp_path / "bert"), max_length=16, trainable=False)
    clap = CLAP(audio, text, joint_dim=16, dropout=0.0).eval()
    calls = []
    original = text.forward
    text.forward = lambda texts: (calls.append(list(texts)), original(texts))[1]  # type: ignore[method-assign]
    with torch.no_grad():
        first = clap.embed_text(["a dog barks", "rain falls", "a dog barks"])
        second = clap.embed_text(["rain falls", "a bell rings"])
    assert calls == [["a dog barks", "rain falls"], ["a bell rings"]]
    torch.testing.assert_close(first[1], second[0])
    clap.cache_frozen_text = False
    with torch.no_grad():
        torch.testing.assert_close(clap.embed_text(["a dog barks"])[0], first[0], atol=1e-5, rtol=1e-4)


def test_test_split_retrieval_scores_every_caption_of_every_clip_once(tiny_synth: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import tta.encoders.clap.module as clap_module

    items = [i for i in read_manifest(tiny_synth) if i.split == "train"][:5]
    for k, item in enumerate(items):
        item.captions = [f"caption {k} number {j}" for j in range(1 + k % 3)]  # 1, 2, 3, 1, 2 captions
    manifest = write_manifest(items, tmp_path / "multi.jsonl")
    module = tiny_clap(make_bert_folder(tmp_path / "bert"))
    seen = {}

    def spy(audio: torch.Tensor, captions: torch.Tensor, owners: list[int]) -> dict[str, float]:
        seen.update(audio=audio, captions=captions, owners=owners)
        return caption_retrieval_metrics(audio, captions, owners)

    monkeypatch.setattr(clap_module, "caption_retrieval_metrics", spy)
    dm = AudioDataModule(manifest=str(manifest), mel="demo", segment_seconds=None, batch_size=2,
                         val_split="train", test_split="train")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    metrics = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert metrics["test/n_clips"] == 5 and metrics["test/n_captions"] == 9
    assert {"test/t2a_R@1", "test/a2t_R@10", "test/a2t_mAP@10", "test/zero_shot_mAP"} <= set(metrics)
    # caption c of the split belongs to clip owners[c] (clips in loader order = id order)
    by_id = sorted(items, key=lambda i: i.id)
    assert seen["owners"] == [k for k, item in enumerate(by_id) for _ in item.captions]
    module.eval()  # Lightning restores train mode after testing (the BERT tower has dropout)
    with torch.no_grad():
        expected = module.clap.embed_text([c for item in by_id for c in item.captions])
    torch.testing.assert_close(seen["captions"], expected, atol=1e-5, rtol=1e-4)
