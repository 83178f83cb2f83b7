"""AudioDataModule: splits, batches, bad clips, padding, mel cache, crop determinism, synthetic default."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

import tta.data.datamodule as dm_mod
from tta.data import synth as synth_mod
from tta.data.audio import AudioLoadError
from tta.data.datamodule import (
    AudioDataModule,
    ClipDataset,
    SynthSpec,
    TooManyBadClipsError,
    collate_clips,
)
from tta.data.manifest import ManifestItem, read_manifest, write_manifest
from tta.data.mel import MelConfig, MelFrontend, MelMismatchError

SR = 22050
HOP = 256
SEGMENT_S = 0.25
SEG = int(round(SEGMENT_S * SR)) // HOP  # 21 frames


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("TTA_CACHE", str(tmp_path / "tta_cache"))


def _tone(i: int, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(i)
    t = np.arange(int(round(seconds * SR))) / SR
    x = 0.5 * np.sin(2 * np.pi * (220 + 97 * i) * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(t.size)
    return x.astype(np.float32)


def _manifest(root: Path, splits: dict[str, int], seconds: float = 0.5, extra: list[ManifestItem] = ()) -> Path:
    """Tiny 22.05 kHz WAVs, ``splits[name]`` of each split, two captions per clip."""
    items = []
    k = 0
    for split, n in splits.items():
        for _ in range(n):
            path = root / "audio" / f"clip{k:03d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, _tone(k, seconds), SR, subtype="PCM_16")
            items.append(ManifestItem(id=f"clip{k:03d}", audio=path, captions=[f"caption a {k}", f"caption b {k}"],
                                      split=split, duration=seconds, sample_rate=SR))
            k += 1
    return write_manifest([*items, *extra], root / "manifest.jsonl")


def _dm(manifest: Path, **kw) -> AudioDataModule:
    args = dict(manifest=str(manifest), mel="demo", segment_seconds=SEGMENT_S, batch_size=3, seed=0)
    args.update(kw)
    return AudioDataModule(**args)


def _batches(loader) -> list[dict]:
    return list(loader)


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["id"] == y["id"] and x["caption"] == y["caption"] and x["n_skipped"] == y["n_skipped"]
        assert torch.equal(x["wav"], y["wav"]) and torch.equal(x["mel"], y["mel"])


@pytest.fixture
def manifest(tmp_path) -> Path:
    return _manifest(tmp_path / "data", {"train": 6, "val": 2, "test": 3})


# ------------------------------------------------------------------------ splits and batches
def test_splits_come_from_the_manifest_split_field(manifest):
    dm = _dm(manifest)
    dm.setup("fit")
    by_split: dict[str, set[str]] = {}
    for item in read_manifest(manifest):
        by_split.setdefault(item.split, set()).add(item.id)
    assert {i.id for i in dm.datasets["train"].items} == by_split["train"]
    assert {i.id for i in dm.datasets["val"].items} == by_split["val"]
    assert {i.id for i in dm.datasets["test"].items} == by_split["test"]
    assert dm.datasets["train"].random_crop and not dm.datasets["val"].random_crop
    assert dm.skipped == {"header": 0, "decode": 0}


def test_custom_split_names(tmp_path):
    manifest = _manifest(tmp_path / "d", {"development": 4, "evaluation": 2, "validation": 2})
    dm = _dm(manifest, train_split="development", val_split="validation", test_split="evaluation")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 4 and len(dm.datasets["val"]) == 2 and len(dm.datasets["test"]) == 2


def test_no_train_clips_is_an_error_for_fit(tmp_path):
    manifest = _manifest(tmp_path / "d", {"val": 2})
    with pytest.raises(ValueError, match="no clips in split 'train'"):
        _dm(manifest).setup("fit")


def test_batch_keys_and_shapes(manifest):
    dm = _dm(manifest)
    dm.setup("fit")
    assert dm.segment_frames == SEG
    captions = {i.id: set(i.captions) for i in read_manifest(manifest)}
    train = _batches(dm.train_dataloader())
    assert len(train) == 2  # 6 clips, batch 3, drop_last
    for batch in train + _batches(dm.val_dataloader()):
        b = len(batch["id"])
        assert {"id", "wav", "mel", "caption", "n_skipped"} <= set(batch)
        assert batch["wav"].shape == (b, SEG * HOP) and batch["wav"].dtype == torch.float32
        assert batch["mel"].shape == (b, 80, SEG) and batch["mel"].dtype == torch.float32
        assert batch["n_skipped"] == 0 and len(batch["caption"]) == b
        assert all(c in captions[i] for i, c in zip(batch["id"], batch["caption"]))
        # waveform and mel are the same segment: interior frames (no edge padding) agree
        again = MelFrontend("demo")(batch["wav"])
        assert torch.allclose(again[..., 2 : SEG - 2], batch["mel"][..., 2 : SEG - 2], atol=1e-4)
    assert sorted(i for b in train for i in b["id"]) == sorted(i.id for i in dm.datasets["train"].items)


def test_val_crops_the_start_of_the_clip(manifest):
    dm = _dm(manifest)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    item = dm.datasets["val"].items[0]
    wav, _ = sf.read(item.audio, dtype="float32")
    assert batch["id"][0] == item.id
    assert torch.allclose(batch["wav"][0], torch.from_numpy(wav[: SEG * HOP]))


# ------------------------------------------------------------------------------- bad clips
def _with_bad_clips(tmp_path: Path, n_train: int = 18) -> tuple[Path, list[str]]:
    bad_dir = tmp_path / "data" / "bad"
    bad_dir.mkdir(parents=True)
    corrupt = bad_dir / "corrupt.wav"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    extra = [
        ManifestItem(id="bad_corrupt", audio=corrupt, captions=["x"], split="train"),
        ManifestItem(id="bad_missing", audio=bad_dir / "missing.wav", captions=["y"], split="train"),
    ]
    return _manifest(tmp_path / "data", {"train": n_train, "val": 2}, seconds=0.3, extra=extra), ["bad_corrupt", "bad_missing"]


def test_bad_clips_under_threshold_are_skipped_and_counted(tmp_path):
    manifest, bad = _with_bad_clips(tmp_path)
    dm = _dm(manifest, max_bad_fraction=0.15)  # 2 of 20 = 0.1
    dm.setup("fit")
    assert dm.skipped["header"] == 2
    ids = {i.id for i in dm.datasets["train"].items}
    assert len(ids) == 18 and not ids & set(bad)
    seen = [i for b in dm.train_dataloader() for i in b["id"]]
    assert len(seen) == 18 and not set(seen) & set(bad)


def test_bad_clips_over_threshold_raise_naming_the_ids(tmp_path):
    manifest, bad = _with_bad_clips(tmp_path)
    dm = _dm(manifest, max_bad_fraction=0.05)
    with pytest.raises(TooManyBadClipsError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert all(b in msg for b in bad)
    assert "2 of 20" in msg and "'train'" in msg


def test_default_threshold_rejects_one_bad_clip_in_a_small_split(tmp_path):
    manifest, _ = _with_bad_clips(tmp_path, n_train=4)
    with pytest.raises(TooManyBadClipsError):
        _dm(manifest).setup("fit")  # max_bad_fraction=0.01


def test_decode_failure_is_dropped_from_its_batch_never_zero_filled(manifest, monkeypatch):
    dm = _dm(manifest, batch_size=3)
    dm.setup("fit")
    victim = dm.datasets["val"].items[1]
    real = dm_mod.load_audio

    def flaky(path, *args, **kwargs):
        if Path(path) == Path(victim.audio):
            raise AudioLoadError(path, "simulated decode failure")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dm_mod, "load_audio", flaky)
    batches = _batches(dm.val_dataloader())  # 2 val clips in one batch, in manifest order
    assert len(batches) == 1
    batch = batches[0]
    assert batch["n_skipped"] == 1
    assert batch["id"] == [dm.datasets["val"].items[0].id]
    assert batch["wav"].shape == (1, SEG * HOP) and batch["mel"].shape == (1, 80, SEG)
    assert len(batch["caption"]) == 1
    assert batch["wav"].abs().amax(dim=1).min() > 0.1  # every row is real audio
    assert dm.skipped["decode"] == 0
    out = dm.on_after_batch_transfer(batch, 0)
    assert out is batch and dm.skipped["decode"] == 1

    train = _batches(dm.train_dataloader())  # the victim is a val clip: train is untouched
    assert all(b["n_skipped"] == 0 for b in train)


def test_decode_failure_in_training_batches(manifest, monkeypatch):
    dm = _dm(manifest, batch_size=3)
    dm.setup("fit")
    victim = dm.datasets["train"].items[2]
    real = dm_mod.load_audio
    monkeypatch.setattr(
        dm_mod, "load_audio",
        lambda p, *a, **k: (_ for _ in ()).throw(AudioLoadError(p, "boom")) if Path(p) == victim.audio else real(p, *a, **k),
    )
    batches = _batches(dm.train_dataloader())
    assert sum(b["n_skipped"] for b in batches) == 1
    ids = [i for b in batches for i in b["id"]]
    assert victim.id not in ids and len(ids) == 5
    for b in batches:
        assert b["wav"].shape[0] == b["mel"].shape[0] == len(b["id"]) == 3 - b["n_skipped"]


def test_all_clips_of_a_batch_failing_gives_a_batch_without_tensors():
    out = collate_clips([None, None])
    assert out["n_skipped"] == 2 and out["id"] == [] and "wav" not in out and "mel" not in out


def test_clip_shorter_than_one_hop_is_skipped(tmp_path):
    path = tmp_path / "tiny.wav"
    sf.write(path, _tone(0, 100 / SR), SR)
    ds = ClipDataset([ManifestItem(id="tiny", audio=path, split="train")], MelConfig.preset("demo"), SEG, True)
    assert ds[(0, 0)] is None


# ------------------------------------------------------------------------------- padding
def test_short_clips_are_padded_to_the_segment(tmp_path):
    manifest = _manifest(tmp_path / "d", {"train": 3}, seconds=0.1)  # 2205 samples -> 8 frames
    dm = _dm(manifest)
    dm.setup("fit")
    ds = dm.datasets["train"]
    clip = ds[(0, 123)]
    frames = 2205 // HOP
    assert clip["wav"].shape == (SEG * HOP,) and clip["mel"].shape == (80, SEG)
    wav, _ = sf.read(ds.items[0].audio, dtype="float32")
    assert torch.equal(clip["wav"][: frames * HOP], torch.from_numpy(wav[: frames * HOP]))
    assert torch.all(clip["wav"][frames * HOP :] == 0)
    floor = float(np.log(MelConfig.preset("demo").log_floor))
    assert torch.all(clip["mel"][:, frames:] == floor)
    assert clip["mel"][:, :frames].max() > floor + 1  # real content before the padding
    batch = next(iter(dm.train_dataloader()))
    assert batch["wav"].shape == (3, SEG * HOP) and batch["mel"].shape == (3, 80, SEG)


def test_whole_clips_without_segment(manifest):
    dm = _dm(manifest, segment_seconds=None, batch_size=1)
    dm.setup("fit")
    clip = dm.datasets["train"][(0, 0)]
    frames = int(0.5 * SR) // HOP
    assert clip["wav"].shape == (frames * HOP,) and clip["mel"].shape == (80, frames)


# ----------------------------------------------------------------------------- mel cache
def test_cached_mels_give_identical_batches(manifest, tmp_path):
    cache = tmp_path / "melcache"
    plain, cached = _dm(manifest), _dm(manifest, cache_dir=str(cache))
    plain.setup("fit")
    cached.setup("fit")
    assert not cache.exists() or not list(cache.rglob("*.pt"))
    ref = _batches(plain.train_dataloader())
    first = _batches(cached.train_dataloader())
    _assert_same_batches(ref, first)
    files = list(cache.rglob("*.pt"))
    assert len(files) == 6  # one whole-clip mel per train clip
    assert all(torch.load(f, weights_only=True).shape[0] == 80 for f in files)

    def no_frontend(*_a, **_k):
        raise AssertionError("mel recomputed although it is cached")

    cached.datasets["train"].frontend = no_frontend  # the second pass must read the cache
    _assert_same_batches(ref, _batches(cached.train_dataloader()))
    assert len(list(cache.rglob("*.pt"))) == 6


def test_cache_is_keyed_by_mel_config(manifest, tmp_path):
    cache = tmp_path / "melcache"
    dm = _dm(manifest, cache_dir=str(cache))
    dm.setup("fit")
    _batches(dm.train_dataloader())
    other = _dm(manifest, cache_dir=str(cache), mel={**MelConfig.preset("demo").to_dict(), "n_mels": 64})
    other.setup("fit")
    batch = next(iter(other.train_dataloader()))
    assert batch["mel"].shape[1] == 64
    assert len(list(cache.rglob("*.pt"))) > 6


# -------------------------------------------------------------------------- determinism
def test_same_seed_same_random_crops(manifest):
    a, b, c = _dm(manifest, seed=7), _dm(manifest, seed=7), _dm(manifest, seed=8)
    for dm in (a, b, c):
        dm.setup("fit")
    batches_a = _batches(a.train_dataloader())
    _assert_same_batches(batches_a, _batches(b.train_dataloader()))
    # crops are random: another seed, or another epoch, gives other segments of the clips
    batches_c = _batches(c.train_dataloader())
    crops_a = {i: w for bt in batches_a for i, w in zip(bt["id"], bt["wav"])}
    crops_c = {i: w for bt in batches_c for i, w in zip(bt["id"], bt["wav"])}
    assert any(not torch.equal(crops_a[i], crops_c[i]) for i in crops_a)
    loader = a.train_dataloader()
    loader.sampler.set_epoch(1)
    crops_e1 = {i: w for bt in loader for i, w in zip(bt["id"], bt["wav"])}
    assert any(not torch.equal(crops_a[i], crops_e1[i]) for i in crops_a)


# ----------------------------------------------------------------------- synthetic default
def test_synthetic_default_is_created_then_reused(tmp_path, monkeypatch):
    data_dir = tmp_path / "synth"
    spec = SynthSpec(n=30, duration=1.0)
    dm = AudioDataModule(manifest=None, mel="demo", synth=spec, data_dir=str(data_dir), segment_seconds=0.5, batch_size=4)
    assert not data_dir.exists()
    dm.prepare_data()
    manifest = data_dir / "manifest.jsonl"
    stamp = data_dir / synth_mod.STAMP
    assert manifest.is_file() and stamp.is_file()
    assert json.loads(stamp.read_text())["args"]["sample_rate"] == SR
    dm.setup("fit")
    items = read_manifest(manifest)
    assert len(items) == 30
    assert len(dm.datasets["train"]) == sum(i.split == "train" for i in items) > 0
    batch = next(iter(dm.train_dataloader()))
    frames = int(round(0.5 * SR)) // HOP
    assert batch["mel"].shape == (4, 80, frames) and batch["wav"].shape == (4, frames * HOP)
    assert sf.info(str(items[0].audio)).samplerate == SR

    mtime = manifest.stat().st_mtime_ns

    def no_synthesis(*_a, **_k):
        raise AssertionError("synthetic dataset regenerated although its stamp matches")

    monkeypatch.setattr(synth_mod, "synthesize", no_synthesis)
    again = AudioDataModule(manifest=None, mel="demo", synth=spec, data_dir=str(data_dir), segment_seconds=0.5, batch_size=4)
    assert again.manifest_path() == manifest
    again.setup("fit")
    assert [i.id for i in again.datasets["train"].items] == [i.id for i in dm.datasets["train"].items]
    assert manifest.stat().st_mtime_ns == mtime
    # other synthesis arguments do not reuse the stamped dataset
    changed = AudioDataModule(manifest=None, mel="demo", synth=SynthSpec(n=31, duration=1.0), data_dir=str(data_dir))
    with pytest.raises(AssertionError, match="regenerated"):
        changed.prepare_data()


def test_synthetic_default_location_is_under_tta_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TTA_CACHE", str(tmp_path / "cache"))
    seen = {}

    def fake(root, **kwargs):
        seen["root"], seen["kwargs"] = Path(root), kwargs
        return Path(root) / "manifest.jsonl"

    monkeypatch.setattr(dm_mod, "ensure_synth", fake)
    dm = AudioDataModule(manifest=None, mel="demo", synth=SynthSpec(n=30, duration=1.0))
    assert dm.manifest_path() == seen["root"] / "manifest.jsonl"
    assert seen["root"].parent == tmp_path / "cache" / "synth"
    assert "sr22050" in seen["root"].name and "n30" in seen["root"].name
    assert seen["kwargs"]["sample_rate"] == SR and seen["kwargs"]["n"] == 30 and seen["kwargs"]["duration"] == 1.0


# ---------------------------------------------------------------------------- with Lightning
def _tiny_vae(mel: str):
    from tta.generators.vae.module import VAEModule
    from tta.generators.vae.network import AutoencoderKL

    return VAEModule(AutoencoderKL(ch=8, ch_mult=(1, 2), num_res_blocks=1, mid_attention=False), mel=mel)


def _trainer(tmp_path: Path) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )


def test_mel_mismatch_between_module_and_datamodule_fails_at_fit(manifest, tmp_path):
    model = _tiny_vae("audioldm")
    with pytest.raises(MelMismatchError, match="sample_rate"):
        _trainer(tmp_path).fit(model, _dm(manifest, mel="demo"))
    assert model.batches_trained == 0


def test_matching_mel_trains_and_counts_consumed_batches(manifest, tmp_path):
    model = _tiny_vae("demo")
    dm = _dm(manifest, mel="demo")
    trainer = _trainer(tmp_path)
    trainer.fit(model, dm)
    assert model.batches_trained == 1
    assert dm._train_loader is not None and dm._train_loader.state_dict() == {"epoch": 0, "consumed": 1}
