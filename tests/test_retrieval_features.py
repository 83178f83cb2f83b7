"""Retrieval feature store: multi-rank writes + merge, lookup, mismatch errors, `tta predict` end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchaudio
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.conftest import CONFIGS
from tests.hf_fixtures import make_bert_folder, make_t5_folder
from tta.cli import build_cli, main
from tta.data.datamodule import AudioDataModule
from tta.data.manifest import read_manifest
from tta.encoders.audiomae import AudioMAE
from tta.encoders.clap_towers import CLAPAudioTower, CLAPTextTower
from tta.encoders.pretrained import MiniLMTextEncoder
from tta.retrieval.features import (
    FeatureStore,
    FeatureStoreMismatchError,
    FeatureStoreWriter,
    MissingFeaturesError,
    finalize_store,
    fit_length,
    module_fingerprint,
    new_run_id,
    parts_dir,
)
from tta.retrieval.features_extract import RetrievalFeatureExtractor
from tta.training.loading import build_model

pytestmark = pytest.mark.usefixtures("single_thread")

FP16 = {"rtol": 2e-3, "atol": 2e-3}


def _data(
    n: int = 10, seed: int = 0
) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = [f"clip{i:02d}" for i in range(n)]
    audio = torch.randn(n, 4, 6, generator=g)
    text = torch.randn(n, 5, 3, generator=g)
    text_mask = torch.arange(5)[None] < torch.randint(1, 6, (n, 1), generator=g)
    return ids, audio, text, text_mask


# ------------------------------------------------------------------------------ the store
def test_two_rank_parts_merge_to_sorted_store_with_exact_rows(tmp_path: Path) -> None:
    ids, audio, text, text_mask = _data()
    out, run = tmp_path / "store", new_run_id()
    meta = {
        "audio": {"encoder": {"sha256": "a" * 64}},
        "text": {"encoder": {"sha256": "t" * 64}},
    }
    writers = [
        FeatureStoreWriter(
            out,
            run,
            rank=r,
            audio_meta=meta["audio"],
            text_meta=meta["text"],
            flush_rows=2,
        )
        for r in (0, 1)
    ]
    order = [7, 2, 9, 0, 4, 1, 8, 3, 6, 5]  # any order, rank r takes every other clip
    for r, writer in enumerate(writers):
        mine = order[r::2]
        for lo in range(0, len(mine), 3):
            rows = mine[lo : lo + 3]
            writer.add(
                [ids[i] for i in rows],
                audio=audio[rows],
                text=text[rows],
                text_mask=text_mask[rows],
            )
    writers[1].add(
        [ids[4]], audio=audio[[4]], text=text[[4]], text_mask=text_mask[[4]]
    )  # rank 0 also wrote clip04
    parts = [p for w in writers for p in w.close()]
    assert len(parts) == 5 and all(
        p.parent == parts_dir(out, run) for p in parts
    )  # flushed at >= 2 rows
    finalize_store(out, run, extra_meta={"note": "x"})
    assert not parts_dir(out, run).exists() and sorted(os.listdir(tmp_path)) == [
        "store"
    ]

    store = FeatureStore.open(
        out,
        expect_audio_hash="a" * 64,
        expect_text_hash="t" * 64,
        require=("audio", "text"),
    )
    assert (
        store.ids == sorted(ids)
        and len(store) == 10
        and json.loads((out / "ids.json").read_text()) == store.ids
    )
    assert store.meta["created"]["duplicates_dropped"] == 1 and store.meta["created"][
        "ranks"
    ] == [0, 1]
    assert (
        store.meta["audio"]["tokens"] == 4
        and store.meta["text"]["length"] == 5
        and store.meta["extra"]["note"] == "x"
    )
    query = [["clip03", "clip00", "clip09"], ["clip04", "clip04", "clip07"]]
    got = store.lookup(query)
    assert (
        got["audio"].shape == (2, 3, 4, 6)
        and got["text"].shape == (2, 3, 5, 3)
        and got["audio"].dtype == torch.float32
    )
    for b, row in enumerate(query):
        for j, clip in enumerate(row):
            i = ids.index(clip)
            want_text = (
                text[i] * text_mask[i, :, None]
            )  # padded positions are stored as zeros
            torch.testing.assert_close(
                got["audio"][b, j], audio[i].half().float(), rtol=0, atol=0
            )
            torch.testing.assert_close(
                got["text"][b, j], want_text.half().float(), rtol=0, atol=0
            )
            assert torch.equal(got["text_mask"][b, j], text_mask[i]) and bool(
                got["audio_mask"][b, j].all()
            )
    assert not np.load(out / "audio.npy", mmap_mode="r").flags.writeable


def test_missing_ids_raise_naming_them(tmp_path: Path) -> None:
    ids, audio, text, text_mask = _data(4)
    store = FeatureStore.write(
        tmp_path / "s", ids, audio=audio, text=text, text_mask=text_mask
    )
    with pytest.raises(
        MissingFeaturesError,
        match=r"2 ids are not in feature store .*s \(4 clips\): ghost, nobody",
    ):
        store.lookup([["clip00", "ghost"], ["nobody", "clip01"]])
    with pytest.raises(KeyError):
        store.lookup([["ghost"]])
    with pytest.raises(ValueError, match="same number"):
        store.lookup([["clip00", "clip01"], ["clip02"]])


def test_open_checks_encoders_modalities_and_files(tmp_path: Path) -> None:
    ids, audio, _, _ = _data(3)
    out = tmp_path / "audio_only"
    FeatureStore.write(out, ids, audio=audio, audio_meta={"encoder": {"sha256": "abc"}})
    store = FeatureStore.open(out, expect_audio_hash="abc")
    assert store.modalities == ("audio",) and set(store.lookup([ids])) == {
        "audio",
        "audio_mask",
    }
    with pytest.raises(
        FeatureStoreMismatchError,
        match="audio encoder weights 'abc', not the expected 'def'",
    ):
        FeatureStore.open(out, expect_audio_hash="def")
    with pytest.raises(FeatureStoreMismatchError, match="text encoder weights None"):
        FeatureStore.open(out, expect_text_hash="abc")
    with pytest.raises(FeatureStoreMismatchError, match="holds no text features"):
        FeatureStore.open(out, require=("text",))
    np.save(
        out / "audio.npy", np.zeros((3, 4, 5), np.float16)
    )  # a width that meta.json does not record
    with pytest.raises(
        ValueError,
        match=r"audio.npy: float16 \(3, 4, 5\), expected float16 \(3, 4, 6\)",
    ):
        FeatureStore.open(out)
    with pytest.raises(FileNotFoundError, match="meta.json not found"):
        FeatureStore.open(tmp_path)


def test_text_only_store_length_check_and_overwrite(tmp_path: Path) -> None:
    ids, _, text, text_mask = _data(3)
    out = tmp_path / "t"
    FeatureStore.write(out, ids, text=text, text_mask=text_mask)
    assert set(FeatureStore.open(out, expect_text_length=5).lookup([ids[:1]])) == {
        "text",
        "text_mask",
    }
    with pytest.raises(FeatureStoreMismatchError, match="length 5, expected 50"):
        FeatureStore.open(out, expect_text_length=50)
    with pytest.raises(FileExistsError, match="already exists"):
        FeatureStore.write(out, ids, text=text)
    store = FeatureStore.write(out, ids[:2], text=text[:2] + 1, overwrite=True)
    assert store.ids == ids[:2] and torch.allclose(
        store.lookup([["clip00"]])["text"][0, 0], (text[0] + 1), **FP16
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="holds no feature store"):
        FeatureStore.write(tmp_path / "other", ids, text=text, overwrite=True)


def test_conflicting_duplicates_and_bad_values_raise(tmp_path: Path) -> None:
    ids, audio, _, _ = _data(2)
    run = new_run_id()
    for rank, values in ((0, audio), (1, audio + 1)):
        w = FeatureStoreWriter(tmp_path / "s", run, rank=rank, audio_meta={})
        w.add(ids, audio=values)
        w.close()
    with pytest.raises(
        ValueError, match=r"different audio rows \(first: \['clip00', 'clip01'\]\)"
    ):
        finalize_store(tmp_path / "s", run)
    w = FeatureStoreWriter(tmp_path / "s2", new_run_id(), audio_meta={})
    bad = audio.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"not finite in float16 \(first: \['clip01'\]\)"
    ):
        w.add(ids, audio=bad)
    with pytest.raises(ValueError, match="has no text"):
        w.add(ids, audio=audio, text=audio)
    with pytest.raises(FileNotFoundError, match="no part files"):
        finalize_store(tmp_path / "s3", new_run_id())


def test_fit_length_pads_and_truncates_with_masks() -> None:
    seq = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2) + 1
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    padded, pmask = fit_length(seq, mask, 6)
    assert padded.shape == (2, 6, 2) and pmask.tolist() == [
        [True] * 3 + [False] * 3,
        [True] * 4 + [False] * 2,
    ]
    assert (
        torch.equal(padded[0, :3], seq[0, :3])
        and padded[0, 3:].abs().sum() == 0
        and padded[1, 4:].abs().sum() == 0
    )
    cut, cmask = fit_length(seq, mask, 2)
    assert torch.equal(cut, seq[:, :2]) and cmask.all() and cmask.shape == (2, 2)
    with pytest.raises(ValueError, match="length must be >= 1"):
        fit_length(seq, mask, 0)


# -------------------------------------------------------------------------- predict path
DEMO = CONFIGS / "demo" / "retrieval_features.yaml"
MAE = {
    "out_dim": None,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "clip_seconds": 1.0,
    "num_frames": None,
}


def test_tta_predict_writes_one_row_per_clip(tiny_synth: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(7)
    mae = AudioMAE(**MAE).eval()
    save_file(mae.state_dict(), str(tmp_path / "mae.safetensors"))
    out = tmp_path / "store"
    args = [
        "predict",
        "--config",
        str(DEMO),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        f"--model.init_args.out_dir={out}",
        f"--model.init_args.audio_weights={tmp_path / 'mae.safetensors'}",
        "--model.init_args.flush_rows=16",
        "--model.init_args.audio_encoder.init_args.clip_seconds=1.0",
        f"--data.init_args.manifest={tiny_synth}",
        "--data.init_args.segment_seconds=1.0",
    ]
    assert main(args) == 0
    items = read_manifest(tiny_synth)
    store = FeatureStore.open(out, require=("audio", "text"), expect_text_length=50)
    assert (
        store.ids == sorted(i.id for i in items) and len(items) == 40
    )  # every split, each clip once
    created = store.meta["created"]
    assert (
        created["rows_written"] == 40
        and created["duplicates_dropped"] == 0
        and created["parts"] == 3
    )
    assert (
        store.meta["audio"]["tokens"] == 8
        and store.meta["audio"]["dim"] == 32
        and store.meta["text"]["dim"] == 384
    )

    # recompute a few clips independently: same crop (the predict dataset), resample, encode, pool
    dm = AudioDataModule(manifest=str(tiny_synth), mel="demo", segment_seconds=1.0)
    dm.setup("predict")
    dataset = dm.datasets["predict"]
    multi = next(
        i for i, item in enumerate(dataset.items) if len(set(item.captions)) > 1
    )
    pick = [0, multi, 39]
    wav = torch.stack([dataset[i]["wav"] for i in pick])
    ids = [dataset.items[i].id for i in pick]
    with torch.no_grad():
        seq = mae(torchaudio.functional.resample(wav, 22050, 16000)).seq
        want_audio = F.adaptive_avg_pool1d(seq.transpose(1, 2), 8).transpose(1, 2)
        minilm = MiniLMTextEncoder(max_length=50)
        emb = minilm([dataset.items[i].captions[0] for i in pick])
        want_text, want_mask = fit_length(emb.seq, emb.mask, 50)
        other = minilm([dataset.items[multi].captions[1]]).seq
    got = store.lookup([ids])
    assert store.meta["audio"]["encoder"]["sha256"] == module_fingerprint(
        mae
    )  # audio_weights were loaded
    assert store.meta["text"]["encoder"]["sha256"] == module_fingerprint(minilm)
    torch.testing.assert_close(got["audio"][0], want_audio, **FP16)
    torch.testing.assert_close(got["text"][0], want_text, **FP16)
    assert (
        torch.equal(got["text_mask"][0], want_mask)
        and not got["text_mask"][0, :, -1].any()
    )
    assert not torch.allclose(
        got["text"][0, 1, :3], other[0, :3], atol=1e-2
    )  # the first caption, not another

    with pytest.raises(
        FileExistsError, match="already exists"
    ):  # refused before any work
        main([*args, "--model.init_args.overwrite=false"])


def _clap_checkpoint(folder: Path) -> tuple[Path, torch.nn.Module]:
    bert = make_bert_folder(folder / "bert")
    htsat = {
        "dim": 32,
        "embed_dim": 16,
        "depths": [1, 1],
        "num_heads": [1, 2],
        "window_size": 4,
        "spec_frames": 64,
        "freq_ratio": 4,
        "drop_path": 0.0,
        "window_seconds": 1.0,
        "mel_preset": "demo",
    }
    model = {
        "class_path": "clap_trainer",
        "init_args": {
            "mel": "demo",
            "clap": {
                "class_path": "clap",
                "init_args": {
                    "joint_dim": 16,
                    "temperature": 0.07,
                    "dropout": 0.0,
                    "audio_encoder": {"class_path": "htsat", "init_args": htsat},
                    "text_encoder": {
                        "class_path": "bert_text",
                        "init_args": {"path": str(bert), "max_length": 32},
                    },
                },
            },
        },
    }
    torch.manual_seed(0)
    module = build_model(model).eval()
    counters = {"batches_trained": 0, "nan_skips_total": 0, "nan_skips_consecutive": 0}
    path = folder / "clap.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "tta": {
                "config": yaml.safe_dump({"model": model}),
                "mel": module.mel_config.to_dict(),
                "counters": counters,
            },
        },
        path,
    )
    return path, module


def test_clap_towers_and_audio_only_predict(tiny_synth: Path, tmp_path: Path) -> None:
    ckpt, module = _clap_checkpoint(tmp_path)
    clap = module.clap
    wav = torch.randn(2, 22050, generator=torch.Generator().manual_seed(0)) * 0.1
    texts = ["a dog barks", "rain falls on a roof"]
    audio_tower, text_tower = (
        CLAPAudioTower(str(ckpt)),
        CLAPTextTower(str(ckpt), project=True),
    )
    with torch.no_grad():
        a, ref = audio_tower(wav), clap.audio_encoder(wav)
        torch.testing.assert_close(a.pooled, ref.pooled)
        torch.testing.assert_close(a.seq, ref.seq)
        torch.testing.assert_close(
            CLAPAudioTower(str(ckpt), project=True)(wav).pooled, clap.embed_audio(wav)
        )
        torch.testing.assert_close(text_tower(texts).pooled, clap.embed_text(texts))
        torch.testing.assert_close(text_tower(texts).seq, clap.text_encoder(texts).seq)
    assert audio_tower.frozen and not any(
        p.requires_grad for p in audio_tower.parameters()
    )
    assert (
        audio_tower.sample_rate == 22050
        and audio_tower.dim == 32
        and text_tower.dim == 16
    )
    with pytest.raises(FileNotFoundError, match="CLAP checkpoint not found"):
        CLAPAudioTower(str(tmp_path / "nope.ckpt"))

    # audio-only store through the predict loop: pooled tower vector as one token, uneven batches
    out = tmp_path / "store"
    extractor = RetrievalFeatureExtractor(
        str(out), audio_encoder=audio_tower, mel="demo", audio_source="pooled"
    )
    dm = AudioDataModule(
        manifest=str(tiny_synth),
        mel="demo",
        segment_seconds=1.0,
        batch_size=7,
        predict_splits=["train"],
    )
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    assert sum(trainer.predict(extractor, datamodule=dm)) == len(dm.datasets["predict"])
    train = [i for i in read_manifest(tiny_synth) if i.split == "train"]
    store = FeatureStore.open(
        out, expect_audio_hash=module_fingerprint(audio_tower), require=("audio",)
    )
    assert store.modalities == ("audio",) and store.ids == sorted(i.id for i in train)
    assert store.meta["audio"]["encoder"]["name"] == "clap_audio_tower"
    assert store.meta["audio"]["encoder"]["config"]["checkpoint"] == str(ckpt)
    first = dm.datasets["predict"][0]
    with torch.no_grad():
        want = audio_tower(first["wav"][None]).pooled
    got = store.lookup([[first["id"]]])["audio"]
    assert got.shape == (1, 1, 1, 32)
    torch.testing.assert_close(got[0, 0], want, **FP16)


def _uses_extractor(path: Path) -> bool:
    model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
    return model.get("class_path") in (
        "retrieval_features",
        "tta.retrieval.features_extract.RetrievalFeatureExtractor",
    )


FEATURE_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if _uses_extractor(p))


@pytest.mark.parametrize(
    "path", FEATURE_CONFIGS, ids=[str(p.relative_to(CONFIGS)) for p in FEATURE_CONFIGS]
)
def test_feature_configs_instantiate(path: Path, tmp_path: Path) -> None:
    overrides = []
    if (
        "/path/to/" in path.read_text()
    ):  # paper config: point T5 at a tiny random folder
        overrides.append(
            f"--model.init_args.text_encoder.init_args.path={make_t5_folder(tmp_path / 't5')}"
        )
    cli = build_cli(
        ["--config", str(path), f"--trainer.default_root_dir={tmp_path}", *overrides],
        run=False,
    )
    assert (
        isinstance(cli.model, RetrievalFeatureExtractor) and cli.model.text_length == 50
    )
    assert cli.model.mel_config == cli.datamodule.mel_config
    assert (
        cli.model.audio_encoder.sample_rate == 16000 and cli.model.text_encoder.frozen
    )
    assert {"retrieval_features.yaml", "demo/retrieval_features.yaml"} <= {
        str(p.relative_to(CONFIGS)) for p in FEATURE_CONFIGS
    }
