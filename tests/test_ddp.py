"""Two-process DDP (gloo, CPU) through the real CLI: ``python -m tta.cli fit`` on the demo VAE config.

Lightning launches rank 1 by re-executing the same command (``python -m tta.cli ...``) with rank
variables in the environment, so this runs in a subprocess. `RankRecorder` (added with
``--trainer.callbacks+=``, imported by both ranks from this file through ``PYTHONPATH``) writes
what each rank trained on, since the checkpoint holds rank 0's loader state only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MAX_STEPS = 3

# Variables that would make Lightning think it already runs inside a launched/cluster job.
_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED", "PL_TRAINER_GPUS")


class RankRecorder(L.Callback):
    """Writes ``rank<r>.json`` into ``default_root_dir``: the clip ids and loader state of that rank."""

    def __init__(self) -> None:
        self.ids: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids.append(list(batch["id"]))

    def on_train_end(self, trainer, pl_module) -> None:
        loader = trainer.datamodule._train_loader
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "ids": self.ids,
            "loader_state": loader.state_dict(),
            "sampler": {"rank": loader.sampler.rank, "num_replicas": loader.sampler.num_replicas},
            "n_train": len(trainer.datamodule.datasets["train"]),
        }
        Path(trainer.default_root_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCH_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_", "OMPI_", "PMI_"))}
    env["TTA_CACHE"] = str(tmp_path / "cache")
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.mark.slow
def test_ddp_two_processes_through_the_cli(tmp_path):
    root = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "tta.cli", "fit",
        "--config", str(REPO / "configs" / "demo" / "vae.yaml"),
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
        f"--trainer.max_steps={MAX_STEPS}", f"--trainer.val_check_interval={MAX_STEPS}",
        f"--trainer.default_root_dir={root}",
        "--trainer.callbacks+=test_ddp.RankRecorder",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.autoencoder.init_args.ch=8",
        "--data.init_args.batch_size=2",
        "--data.init_args.synth.n=24",
        "--data.init_args.synth.duration=1.0",
        "--data.init_args.segment_seconds=0.5",
    ]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:  # a hung rendezvous: show what the ranks printed
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        pytest.fail(f"DDP run timed out after {exc.timeout}s\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-6000:]}")
    elapsed = time.monotonic() - start
    log = f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr + proc.stdout, log
    assert elapsed < 200, f"DDP run took {elapsed:.0f}s"

    # the synthetic default went to $TTA_CACHE, never to the home directory
    assert list((tmp_path / "cache" / "synth").glob("*/manifest.jsonl"))

    ckpts = sorted(root.rglob("*.ckpt"))
    assert ckpts, f"no checkpoint under {root}\n{log}"
    ck = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    assert ck["tta"]["mel"]["sample_rate"] == 22050 and ck["tta"]["mel"]["n_mels"] == 80
    assert ck["global_step"] == MAX_STEPS
    assert ck["tta"]["counters"]["batches_trained"] == MAX_STEPS
    loader_states = ck["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_states == [{"epoch": 0, "consumed": MAX_STEPS}]

    # both ranks trained the same number of batches, on disjoint shards of the train split
    records = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    for r, rec in enumerate(records):
        assert rec["rank"] == r and rec["world_size"] == 2
        assert rec["sampler"] == {"rank": r, "num_replicas": 2}
        assert rec["global_step"] == MAX_STEPS
        assert rec["loader_state"] == loader_states[0]
        assert len(rec["ids"]) == MAX_STEPS and all(len(b) == 2 for b in rec["ids"])
    ids0, ids1 = ({i for b in rec["ids"] for i in b} for rec in records)
    assert len(ids0) == len(ids1) == 2 * MAX_STEPS
    assert not ids0 & ids1
