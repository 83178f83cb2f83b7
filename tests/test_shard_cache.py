"""Caches added to existing shards through ``tta predict`` (configs/shard_cache.yaml): the result
equals ``tta data shard --with`` of the same arrays, in one process and in two gloo ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CONFIGS
from tests.hf_fixtures import make_t5_folder
from tests.ldm_fixtures import component_checkpoints
from tests.test_ddp import _env
from tests.test_shards import _records, _shard
from tta.cli import main
from tta.data.manifest import read_manifest, write_manifest
from tta.data.shards import ShardError, ShardIndex
from tta.data.shards_datamodule import ShardDataModule
from tta.data.shards_extend import ShardChunkData, ShardExtender, rank_shards

SEGMENT = 0.25  # seconds: 21 demo-mel frames
ARRAYS = ["latent", "t5", "t5_mask"]


@pytest.fixture(scope="module")
def setup(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """10 training clips (one with three captions, one with none) in 3 shards of 4/4/2, without
    arrays; the same with ``--with latent,t5`` by `tta data shard`; a tiny VAE and T5."""
    root = tmp_path_factory.mktemp("shard_cache")
    items = [i for i in read_manifest(tiny_synth) if i.split == "train"][:10]
    items[0].captions = ["a dog barks", "a siren wails twice in the distance", "rain falls on a roof"]
    items[1].captions = []
    manifest = write_manifest(items, root / "manifest.jsonl")
    vae, _ = component_checkpoints(root, mel="demo")
    t5 = make_t5_folder(root / "t5")
    assert _shard(manifest, root / "plain") == 0
    assert _shard(manifest, root / "direct", "--with", "latent,t5", "--vae", str(vae), "--t5", str(t5),
                  "--t5-length", "8", "--segment-seconds", str(SEGMENT)) == 0
    return {"plain": root / "plain", "direct": root / "direct", "vae": vae, "t5": t5}


def _args(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["predict", "--config", str(CONFIGS / "shard_cache.yaml"), f"--trainer.default_root_dir={out.parent}",
            "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
            f"--data.init_args.root={setup['plain']}", "--data.init_args.mel=demo",
            f"--data.init_args.segment_seconds={SEGMENT}", "--data.init_args.chunk_size=3",
            "--data.init_args.num_workers=0",
            f"--model.init_args.out_dir={out}", "--model.init_args.arrays=[latent, t5]",
            f"--model.init_args.vae={setup['vae']}", "--model.init_args.clap=null",
            f"--model.init_args.t5={setup['t5']}", "--model.init_args.t5_length=8", *extra]


def _assert_same_shards(got: Path, want: Path) -> None:
    """Same index (but the shards' hashes) and items; members byte-identical, arrays equal to 1e-5."""
    a, b = ShardIndex.load(got), ShardIndex.load(want)
    assert a.arrays == b.arrays == ARRAYS
    assert a.sources == b.sources and a.mel == b.mel and a.segment_frames == b.segment_frames == 21
    assert a.counts == b.counts == [4, 4, 2] and [s.name for s in a.shards] == [s.name for s in b.shards]
    for x, y in zip(_records(a, ARRAYS), _records(b, ARRAYS), strict=True):
        assert (x.key, x.item, x.audio) == (y.key, y.item, y.audio)
        for name in ARRAYS:
            assert x.arrays[name].shape == y.arrays[name].shape
            np.testing.assert_allclose(x.arrays[name], y.arrays[name], atol=1e-5, rtol=1e-4)
    first = _records(a, ["t5"])[0]
    assert first.arrays["t5"].shape == (3, 8, 32)  # one row per caption


def test_predict_adds_the_arrays_tta_data_shard_writes(setup: dict[str, Path], tmp_path: Path, single_thread: None,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cached"
    assert main(_args(setup, out)) == 0
    _assert_same_shards(out, setup["direct"])
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar", "shard-000001.tar",
                                                     "shard-000002.tar"]  # no part files or temporaries left
    batch = next(iter(ShardDataModule(str(out), mel="demo", segment_seconds=SEGMENT, batch_size=4,
                                      shuffle=False).train_dataloader()))
    assert batch["latent_moments"].shape == (4, 16, 11, 40) and batch["t5_tokens"].shape == (4, 8, 32)
    # an existing output is refused without overwrite, replaced with it
    assert main(_args(setup, out)) == 2
    assert "model.init_args.out_dir" in (err := capsys.readouterr().err) and "already holds shards; pass " \
        "model.init_args.overwrite=true" in err
    assert main(_args(setup, out, "--model.init_args.overwrite=true", "--model.init_args.arrays=[t5]",
                      "--model.init_args.vae=null")) == 0
    assert ShardIndex.load(out).arrays == ["t5", "t5_mask"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--model.init_args.arrays=[latent]", "--model.init_args.t5=null", "--model.init_args.t5_length=null",
      "--data.init_args.segment_seconds=null"], "model.init_args.arrays latent needs data.init_args.segment_seconds"),
    (["--model.init_args.arrays=[clap]", "--model.init_args.vae=null", "--model.init_args.t5=null",
      "--model.init_args.t5_length=null"], "model.init_args.arrays clap needs model.init_args.clap"),
    (["--model.init_args.arrays=[t5]"], "model.init_args.vae applies to model.init_args.arrays latent only"),
])
def test_predict_refuses_bad_options(setup: dict[str, Path], tmp_path: Path, extra: list[str], message: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(setup, tmp_path / "out", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "index.json").exists()


def test_predict_refuses_its_input_and_cached_arrays(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(_args(setup, setup["plain"].parent / "x", "--model.init_args.arrays=[nope]"))
    assert "Expected a typing.Literal['latent', 'clap', 'clap_audio', 't5']. Got value: nope" in capsys.readouterr().err
    assert main(_args(setup, setup["plain"])) == 2
    assert "is the input shard folder" in capsys.readouterr().err
    assert main(_args(setup, setup["plain"].parent / "again", f"--data.init_args.root={setup['direct']}")) == 2
    assert "already hold arrays ['latent', 't5']" in capsys.readouterr().err
    with pytest.raises(ShardError, match="are of 21-frame segments"):
        ShardChunkData(str(setup["direct"]), mel="demo", segment_seconds=0.5)


def test_rank_split_and_extender_order(setup: dict[str, Path], tmp_path: Path) -> None:
    assert [rank_shards(3, r, 2) for r in range(2)] == [[0, 2], [1]]
    assert [rank_shards(2, r, 4) for r in range(4)] == [[0], [1], [], []]  # more ranks than shards: idle ranks
    index = ShardIndex.load(setup["direct"])
    ext = ShardExtender(index.path(0), tmp_path / "x.tar", ["extra"])
    with pytest.raises(ShardError, match="chunk at item 2 arrived, expected item 0"):
        ext.add(2, ["000000002"], {"extra": np.zeros((1, 2))})
    ext.add(0, ["000000000"], {"extra": np.zeros((1, 2))})
    with pytest.raises(ShardError, match="only 1 of 4 items"):
        ext.close()
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(ShardError, match="already holds array 'latent'"):
        ShardExtender(index.path(0), tmp_path / "y.tar", ["latent"])


@pytest.mark.slow
def test_two_gloo_ranks_write_every_shard_once(setup: dict[str, Path], tmp_path: Path) -> None:
    """``tta predict`` with 2 DDP processes (gloo, CPU) and 2 workers each: ranks take shards 0, 2
    and 1 (uneven counts cannot hang: no collective between batches); the folder equals the
    1-process `tta data shard --with` one."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "tta.cli", *_args(setup, out, "--trainer.strategy=ddp", "--trainer.devices=2",
                                                    "--data.init_args.num_workers=2")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=240,
                          check=False)
    log = f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log
    text = proc.stdout + proc.stderr
    assert "rank 0 of 2 extends 2 of 3 shards: shard-000000.tar, shard-000002.tar" in text, log
    assert "rank 1 of 2 extends 1 of 3 shards: shard-000001.tar" in text, log
    assert "rank 0: 2 shards; rank 1: 1 shards" in text, log
    _assert_same_shards(out, setup["direct"])
    assert json.loads((out / "index.json").read_text())["sources"]["latent"]["batch_key"] == "latent_moments"


def test_a_rank_without_shards_still_reaches_the_end_hooks(setup: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """More ranks than shards: an idle rank's loader is empty, but its epoch-end hook (the barrier,
    then the index merge on rank 0) must run, or the other ranks would wait forever."""
    import tta.data.shards_extend as extend

    monkeypatch.setattr(extend, "rank_shards", lambda n, rank, world: [])
    assert main(_args(setup, tmp_path / "idle")) == 1  # the merge ran and found no shard written
    assert "do not match the input's 3 shards" in capsys.readouterr().err
