"""Shards: deterministic writing, round trip, rank/worker splitting (2 gloo processes), resume,
cached mels / VAE latents, and one `tta fit` step from shards."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from tta.data.commands import main as data_main
from tta.data.datamodule import ClipDataset
from tta.data.manifest import ManifestItem, read_manifest, write_manifest
from tta.data.mel import MelConfig, MelFrontend
from tta.data.shards import ShardError, ShardIndex, ShardReader
from tta.data.shards_datamodule import ShardDataModule
from tta.data.shards_stream import StreamSpec, item_seed

REPO = Path(__file__).resolve().parents[1]
SEGMENT = 0.25  # seconds: 21 demo-mel frames


def _shard(manifest: Path, out: Path, *extra: str, size: int = 4) -> int:
    return data_main(["shard", "--manifest", str(manifest), "--out", str(out), "--shard-size", str(size),
                      "--mel", "demo", *extra])


@pytest.fixture(scope="module")
def shards(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 28 training clips of `tiny_synth` in 7 shards of 4, with cached mels."""
    out = tmp_path_factory.mktemp("shards") / "train"
    assert _shard(tiny_synth, out, "--with", "mel") == 0
    return out


def _records(index: ShardIndex, arrays: list[str] | None = None) -> list:
    out = []
    for k in range(len(index.shards)):
        reader = ShardReader(index.path(k), arrays or [])
        out += [reader.read(i) for i in range(len(reader))]
        reader.close()
    return out


def _train_items(manifest: Path) -> list[ManifestItem]:
    return [i for i in read_manifest(manifest) if i.split == "train"]


def test_shard_writing_is_deterministic_and_round_trips(tiny_synth: Path, shards: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert _shard(tiny_synth, again, "--with", "mel") == 0
    names = sorted(p.name for p in shards.iterdir())
    assert names == ["index.json"] + [f"shard-{i:06d}.tar" for i in range(7)]
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:  # byte-identical: fixed tar headers, order and index
        assert (shards / name).read_bytes() == (again / name).read_bytes(), name

    index = ShardIndex.load(shards)
    items = _train_items(tiny_synth)
    assert index.counts == [4] * 7 and index.total == len(items) == 28 and index.arrays == ["mel"]
    assert index.manifest["sha256"] and index.split == "train" and index.skipped == []
    frontend = MelFrontend.from_config(MelConfig.preset("demo"))
    records = _records(index, ["mel"])
    assert [r.id for r in records] == [i.id for i in items]  # manifest order, every item once
    for rec, item in zip(records, items, strict=True):
        assert rec.audio == Path(item.audio).read_bytes() and rec.audio_ext == "wav"
        assert rec.item == item.to_json(tiny_synth.parent)
    wav = torch.from_numpy(sf.read(items[3].audio, dtype="float32")[0])
    wav = wav[: wav.shape[0] // 256 * 256]
    torch.testing.assert_close(torch.from_numpy(records[3].arrays["mel"]), frontend(wav)[0])

    assert _shard(tiny_synth, again) == 2  # refuses to overwrite without --force
    assert _shard(tiny_synth, again, "--force", size=10) == 0
    assert ShardIndex.load(again).counts == [10, 10, 8]
    assert _shard(tiny_synth, tmp_path / "x", "--with", "clap") == 2  # documented as not implemented


def test_unusable_clips_are_listed_not_written(tiny_synth: Path, tmp_path: Path) -> None:
    items = _train_items(tiny_synth)[:3]
    shutil.copy(items[1].audio, tmp_path / "cut.wav")
    data = (tmp_path / "cut.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])  # a truncated WAV
    items[1].audio = tmp_path / "cut.wav"
    items[2].audio = tmp_path / "missing.wav"
    manifest = write_manifest(items, tmp_path / "m.jsonl")
    assert _shard(manifest, tmp_path / "s") == 0
    index = ShardIndex.load(tmp_path / "s")
    assert index.total == 1
    reasons = {s["id"]: s["reason"] for s in index.skipped}
    assert set(reasons) == {items[1].id, items[2].id}
    assert "truncated" in reasons[items[1].id] and reasons[items[2].id] == "missing file"
    assert _shard(manifest, tmp_path / "strict", "--strict") == 1
    assert not list((tmp_path / "strict").glob("*.tar"))
    with pytest.raises(FileNotFoundError, match="index.json"):
        ShardIndex.load(tmp_path / "strict")


def test_stream_gives_the_audio_datamodules_examples(tiny_synth: Path, shards: Path) -> None:
    items = _train_items(tiny_synth)
    mel = MelConfig.preset("demo")
    batches = {}
    for cached in (None, []):  # the cached mels and the live front-end give the same batches
        dm = ShardDataModule(str(shards), mel="demo", segment_seconds=SEGMENT, batch_size=4, shuffle=False,
                             use_cached=cached)
        batches[cached is None] = list(dm.train_dataloader())
    assert len(batches[True]) == 7
    for a, b in zip(batches[True], batches[False], strict=True):
        assert a["id"] == b["id"] and a["start"] == b["start"] and a["caption"] == b["caption"]
        torch.testing.assert_close(a["mel"], b["mel"])
        assert torch.equal(a["wav"], b["wav"])
    reference = ClipDataset(items, mel, 21, random_crop=True)
    flat = [(k, i) for k, batch in enumerate(batches[False]) for i in range(len(batch["id"]))]
    assert set(batches[False][0]) == {"n_skipped", "id", "start", "caption", "captions", "labels", "wav", "mel"}
    for pos, (k, i) in enumerate(flat):  # not shuffled: position = manifest order
        want = reference[(pos, item_seed(0, 0, pos))]
        got = batches[False][k]
        assert got["id"][i] == want["id"] and got["start"][i] == want["start"]
        assert got["caption"][i] == want["caption"] and got["labels"][i] == want["labels"]
        assert torch.equal(got["wav"][i], want["wav"]) and torch.equal(got["mel"][i], want["mel"])
    assert len({s for b in batches[False] for s in b["start"]}) > 1  # random crops


@pytest.mark.parametrize("counts", [(4,) * 7, (5, 5, 5, 5, 4), (9, 1, 6, 8)])
def test_every_item_once_per_epoch_with_equal_rank_lengths(counts: tuple[int, ...]) -> None:
    everything = {(s, w) for s, n in enumerate(counts) for w in range(n)}
    for world in (1, 2, 3, 4):
        for epoch in (0, 1):
            specs = [StreamSpec(counts, 3, world=world, rank=r, shuffle=True, shuffle_buffer=5, drop_last=False)
                     for r in range(world)]
            seen = Counter((int(s), int(w)) for spec in specs for s, w in zip(*spec.rank_items(epoch)[:2]))
            assert len({spec.num_batches for spec in specs}) == 1
            assert all(n == 1 for n in seen.values())
            assert len(seen) == len(everything) // world * world  # the remainder (< world items) waits
            assert set(seen) <= everything
    a, b = (StreamSpec(counts, 3, world=2, rank=0).rank_items(e)[0] for e in (0, 1))
    assert not np.array_equal(a, b)  # a new order every epoch
    res = [StreamSpec(counts, 3, world=2, rank=r, resample=True, samples_per_rank=10) for r in range(2)]
    assert all(len(spec.rank_items(0)[0]) == 10 and spec.num_batches == 3 for spec in res)


def _rank(rank: int, world: int, init: str, folder: str, out: str) -> None:
    # ranks started by mp.spawn inherit the "spawn" start method, so DataLoader workers would re-import
    # torch and tta; Lightning launches ranks as fresh processes whose workers fork, as here
    mp.set_start_method("fork", force=True)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        dm = ShardDataModule(folder, mel="demo", segment_seconds=SEGMENT, batch_size=4, num_workers=2,
                             drop_last=False, shuffle_buffer=6)
        loader = dm.train_dataloader()
        record = {"len": len(loader), "epochs": []}
        for _ in range(2):
            ids = []
            for batch in loader:
                ids.append(batch["id"])
                step = torch.ones(1)
                dist.all_reduce(step)  # a DDP step: a rank with more batches than the other would hang here
            record["epochs"].append(ids)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, record)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_two_workers_see_every_item_once(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "ranks.json"
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", str(shards), str(out)), nprocs=2, join=True)
    ranks = json.loads(out.read_text())
    ids = sorted(r.id for r in _records(ShardIndex.load(shards)))
    assert [r["len"] for r in ranks] == [4, 4]  # 7 shards over 2 ranks: 14 items each, 4 batches
    for epoch in range(2):
        per_rank = [r["epochs"][epoch] for r in ranks]
        assert [len(b) for b in per_rank] == [4, 4]
        assert [len(x) for x in per_rank[0]] == [4, 4, 4, 2]
        assert sorted(i for batches in per_rank for b in batches for i in b) == ids  # each item exactly once
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # reshuffled


def test_resume_continues_the_stream(shards: Path) -> None:
    def loader(workers: int):
        return ShardDataModule(str(shards), mel="demo", segment_seconds=SEGMENT, batch_size=3,
                               num_workers=workers, shuffle_buffer=5).train_dataloader()

    full = loader(0)
    first = list(full)  # epoch 0
    assert len(first) == len(full) == 9
    second = [b["id"] for b in full]  # epoch 1
    run = loader(0)
    it = iter(run)
    for _ in range(4):
        next(it)
        run.mark_consumed()
    state = run.state_dict()
    assert state == {"epoch": 0, "consumed": 4}
    resumed = loader(2)  # another worker count
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b["id"] for b in rest] == [b["id"] for b in first[4:]]
    assert [b["start"] for b in rest] == [b["start"] for b in first[4:]]  # same crops
    assert all(torch.equal(a["wav"], b["wav"]) for a, b in zip(rest, first[4:], strict=True))
    assert [b["id"] for b in resumed] == second  # then the next epoch, as uninterrupted
    done = loader(0)
    done.load_state_dict({"epoch": 0, "consumed": 9})  # a finished epoch: continue with epoch 1
    assert [b["id"] for b in done] == second


def test_datamodule_refuses_mismatched_caches(shards: Path) -> None:
    dm = ShardDataModule(str(shards), mel="audioldm", segment_seconds=SEGMENT)
    with pytest.raises(Exception, match="different mel front-ends"):
        dm.train_dataloader()
    with pytest.raises(ShardError, match="no cached arrays"):
        ShardDataModule(str(shards), mel="demo", use_cached=["latent"]).train_dataloader()


def test_cached_vae_latents_equal_live_encoding(tiny_synth: Path, tmp_path: Path, single_thread: None) -> None:
    from tests.ldm_fixtures import build, build_module, tiny_unet_config, tiny_vae_config, write_checkpoint
    from tta.generators.ldm.module import LatentDiffusionModule
    from tta.generators.vae.shard_latents import check_cached_latents

    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = {"class_path": "tta.generators.vae.module.VAEModule",
               "init_args": {"autoencoder": tiny_vae_config(), "mel": "demo"}}
        ckpts.append(write_checkpoint(build_module(cfg), cfg, tmp_path / f"vae{seed}.ckpt"))
    out = tmp_path / "lat"
    assert _shard(tiny_synth, out, "--with", "latent", "--vae", str(ckpts[0]), "--segment-seconds",
                  str(SEGMENT), size=10) == 0
    index = ShardIndex.load(out)
    assert index.arrays == ["latent"] and index.segment_frames == 21
    assert index.sources["latent"]["batch_key"] == "latent_moments"
    dm = ShardDataModule(str(out), mel="demo", segment_seconds=SEGMENT, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch["start"] == [0, 0, 0, 0]  # the cached segment
    assert batch["latent_moments"].shape == (4, 8, 11, 40)

    unet = tiny_unet_config()
    unet["init_args"]["film_dim"] = 0
    module = LatentDiffusionModule(unet=build(unet), vae_checkpoint=str(ckpts[0]), mel="demo")
    live = {k: v for k, v in batch.items() if k != "latent_moments"}
    torch.testing.assert_close(batch["latent_moments"], module.codec.moments(batch["mel"]), atol=1e-5, rtol=1e-4)
    cached = module.training_latents(batch, torch.Generator().manual_seed(3))
    torch.testing.assert_close(cached, module.training_latents(live, torch.Generator().manual_seed(3)),
                               atol=1e-5, rtol=1e-4)
    check_cached_latents(module.codec.autoencoder, dm)
    other = LatentDiffusionModule(unet=build(unet), vae_checkpoint=str(ckpts[1]), mel="demo")
    with pytest.raises(ValueError, match="cached latents were made by VAE 'vae0.ckpt'"):
        check_cached_latents(other.codec.autoencoder, dm)
    with pytest.raises(ShardError, match="21-frame segments"):
        ShardDataModule(str(out), mel="demo", segment_seconds=0.5).train_dataloader()


@pytest.mark.slow
def test_fit_one_step_from_shards(tiny_synth: Path, shards: Path, tmp_path: Path) -> None:
    from tests.conftest import CONFIGS
    from tta.cli import main

    assert _shard(tiny_synth, tmp_path / "val", "--split", "val") == 0  # the demo callback renders a val batch
    data = {"data": {"class_path": "shards", "init_args": {"train": str(shards), "val": str(tmp_path / "val"),
                                                           "mel": "demo", "segment_seconds": SEGMENT,
                                                           "batch_size": 2}}}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    args = ["fit", "--config", str(CONFIGS / "demo" / "vae.yaml"), "--config", str(tmp_path / "data.yaml"),
            "--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
            '--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
            '"init_args": {"every_n_train_steps": 1, "dirpath": "' + str(tmp_path / "ck") + '"}}]',
            "--model.init_args.autoencoder.init_args.ch=8"]
    assert main(args) == 0
    ck = torch.load(next((tmp_path / "ck").glob("*.ckpt")), map_location="cpu", weights_only=True)
    assert ck["global_step"] == 1
    assert ck["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "consumed": 1}]
    assert os.path.basename(yaml.safe_load(ck["tta"]["config"])["data"]["class_path"]) \
        == "tta.data.shards_datamodule.ShardDataModule"
