"""SLURM requeue and resume: the sbatch templates and `tta.training.slurm`, on CPU.

`test_requeue_and_resume_under_simulated_slurm` runs ``configs/slurm/train.sbatch`` with ``bash``
as SLURM would run it for a one-node, two-task job: the job's ``SLURM_*`` variables are set, and a
fake ``srun`` first on ``PATH`` starts the two tasks with their ``SLURM_PROCID``/``SLURM_LOCALID``
(gloo DDP on CPU; ``--trainer.accelerator=cpu`` is appended to the template's arguments). The test
sends both tasks SIGUSR1 and checks that the job saved ``hpc_ckpt_1.ckpt`` in its run folder and
called ``scontrol requeue`` once (a fake ``scontrol`` records its arguments). The "requeued" job
(the same script, variables and run folder, ``SLURM_RESTART_COUNT=1``) must resume from that
checkpoint and train the next steps with exactly the losses the first job computed for them (the
first job trains on after its requeue call: a real ``scontrol requeue`` would end it there).
`StepRecorder` (imported by the tasks from this file through ``PYTHONPATH``) writes every rank's
losses and holds each rank at batch `PAUSE_AT` until the test has signalled it, so the signal
lands at a known step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from tta.training.slurm import SlurmRequeue, hpc_checkpoint_path, slurm_job_id, slurm_trainer_setup

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TEMPLATES = REPO / "configs" / "slurm"
PAUSE_AT, MAX_STEPS, JOB_ID, NTASKS = 2, 4, "4242", 2
_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED", "PL_TRAINER_GPUS")
# srun as SLURM runs it on one node: drop srun's options, start one task per SLURM_NTASKS_PER_NODE
_FAKE_SRUN = """#!/bin/sh
while [ "${1#-}" != "$1" ]; do shift; done
i=0; pids=""
while [ "$i" -lt "$SLURM_NTASKS_PER_NODE" ]; do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" > "$TASK_LOGS/task$i.log" 2>&1 &
  pids="$pids $!"; i=$((i + 1))
done
rc=0; for p in $pids; do wait "$p" || rc=1; done; exit $rc
"""
# srun that only records the command it would run (one argument a line) and the rendezvous host
_ECHO_SRUN = ('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nprintf "%s\\n" "$@" > "$TASK_LOGS/srun.args"\n'
              'printf "%s" "${MASTER_ADDR:-}" > "$TASK_LOGS/srun.master"\n')


class StepRecorder(L.Callback):
    """Appends ``{"batch", "global_step", "losses"}`` per training batch to
    ``<default_root_dir>/steps.rank<r>.jsonl`` (every loss passed to backward in that batch). With
    ``TTA_TEST_PAUSE_AT`` set, rank r writes its pid to ``paused.rank<r>`` after that batch and waits
    for the file ``go`` (written by the test once it has signalled the rank)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self.losses.append(float(loss.detach()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        root, rank = Path(trainer.default_root_dir), trainer.global_rank
        step = {"batch": pl_module.batches_trained, "global_step": trainer.global_step, "losses": self.losses}
        with (root / f"steps.rank{rank}.jsonl").open("a") as fh:
            fh.write(json.dumps(step) + "\n")
        self.losses = []
        if str(pl_module.batches_trained) == os.environ.get("TTA_TEST_PAUSE_AT"):
            (root / f"paused.rank{rank}").write_text(str(os.getpid()))
            deadline = time.monotonic() + 120
            while not (root / "go").exists():
                if time.monotonic() > deadline:
                    raise RuntimeError("StepRecorder: the test never wrote 'go'")
                time.sleep(0.02)


# ------------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_tools(folder: Path, srun: str) -> Path:
    """``srun`` (script text) and a ``scontrol`` that appends its arguments to ``scontrol.log``,
    answers ``show hostnames`` with two nodes and succeeds. Returns the log's path."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "scontrol.log"
    (folder / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n'
                                     'if [ "$1" = show ]; then echo node001; echo node002; fi\n')
    (folder / "srun").write_text(srun)
    for tool in ("scontrol", "srun"):
        (folder / tool).chmod(0o755)
    return log


def _job_env(tmp_path: Path, bin_dir: Path, task_logs: Path, restart: int) -> dict[str, str]:
    """The variables of a one-node job with NTASKS tasks (srun adds each task's own)."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCH_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_", "OMPI_", "PMI_"))}
    tools = Path(sys.executable).parent  # `tta` of this environment, as an activated venv gives the job
    env.update({
        "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "tta-test", "SLURM_NTASKS": str(NTASKS),
        "SLURM_NTASKS_PER_NODE": str(NTASKS), "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost", "SLURM_CPUS_PER_TASK": "1",
        "SLURM_RESTART_COUNT": str(restart), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
        "PATH": os.pathsep.join([str(bin_dir), str(tools), env.get("PATH", "")]), "TASK_LOGS": str(task_logs),
        "TTA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    })
    return env


def _run_job(tmp_path: Path, bin_dir: Path, root: Path, restart: int, pause_at: int | None) -> tuple[str, list[str]]:
    """``bash train.sbatch`` on the demo VAE (tiny, CPU) to its end; with ``pause_at``, SIGUSR1 to
    every task at that batch. Returns the script's output and each task's log."""
    task_logs = tmp_path / f"tasks-restart{restart}"
    task_logs.mkdir()
    env = _job_env(tmp_path, bin_dir, task_logs, restart)
    if pause_at is not None:
        env["TTA_TEST_PAUSE_AT"] = str(pause_at)
    cmd = ["bash", str(TEMPLATES / "train.sbatch"), str(REPO / "configs" / "demo" / "vae.yaml"),
           "--trainer.accelerator=cpu", f"--trainer.max_steps={MAX_STEPS}", "--trainer.limit_val_batches=0",
           "--trainer.log_every_n_steps=1",
           "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
           "--trainer.callbacks+=test_slurm.StepRecorder", "--model.init_args.autoencoder.init_args.ch=8",
           "--model.init_args.warmup_steps=0", "--data.init_args.batch_size=2", "--data.init_args.synth.n=24",
           "--data.init_args.synth.duration=1.0", "--data.init_args.segment_seconds=0.5"]
    logs = [task_logs / f"task{r}.log" for r in range(NTASKS)]
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if pause_at is not None:
            deadline = time.monotonic() + 150
            while not all((root / f"paused.rank{r}").exists() for r in range(NTASKS)):
                if job.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"tasks never reached batch {pause_at}\n{job.communicate()[0]}\n{_tails(logs)}")
                time.sleep(0.05)
            for r in range(NTASKS):  # what --signal=SIGUSR1@90 does: every task of the step
                os.kill(int((root / f"paused.rank{r}").read_text()), signal.SIGUSR1)
            (root / "go").write_text("")
        out = job.communicate(timeout=150)[0]
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail(f"the job hung\n{job.communicate()[0]}\n{_tails(logs)}")
    assert job.returncode == 0, f"{out}\n{_tails(logs)}"
    return out, [log.read_text() for log in logs]


def _tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in logs if log.exists())


def _steps(root: Path, rank: int) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / f"steps.rank{rank}.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_requeue_and_resume_under_simulated_slurm(tmp_path: Path) -> None:
    if shutil.which("tta", path=str(Path(sys.executable).parent)) is None:
        pytest.fail(f"no `tta` script beside {sys.executable}: install the package (pip install -e .)")
    bin_dir = tmp_path / "bin"
    scontrol_log = _fake_tools(bin_dir, _FAKE_SRUN)
    run = Path("outputs") / "slurm" / f"vae-{JOB_ID}"  # the template's run folder, relative to the job's cwd
    root = tmp_path / run

    script, first = _run_job(tmp_path, bin_dir, root, restart=0, pause_at=PAUSE_AT)
    assert f"job {JOB_ID} restart 0: run folder {run}, resume from nothing" in script
    # tta's handler saved at the end of the signalled batch; Lightning's in-handler save never ran
    assert f"SIGUSR1: saved {run / 'hpc_ckpt_1.ckpt'} at step {PAUSE_AT}" in first[0], first[0][-4000:]
    assert not any("Handling auto-requeue signal" in out for out in first)
    assert scontrol_log.read_text().splitlines() == [f"requeue {JOB_ID}"]  # rank 0 only, once
    assert sorted(p.name for p in root.glob("*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    ckpt = torch.load(root / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == PAUSE_AT and ckpt["tta"]["counters"]["batches_trained"] == PAUSE_AT
    first_steps = [_steps(root, r) for r in range(NTASKS)]
    assert [[s["batch"] for s in steps] for steps in first_steps] == [list(range(1, MAX_STEPS + 1))] * NTASKS

    # the pinned logger folder holds ModelCheckpoint's last.ckpt, written when the first job reached
    # max_steps; a real `scontrol requeue` would have ended that job at step PAUSE_AT, before it
    last = root / "logs" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == MAX_STEPS
    last.unlink()
    # a temporary left by a job killed while writing a checkpoint: removed before the requeued job
    # starts (its digits would make Lightning's own hpc_ckpt search look for hpc_ckpt_1729.ckpt)
    stale = root / ".hpc_ckpt_1.ckpt.x7q2z9.tmp"
    stale.write_bytes(b"half a checkpoint")
    for r in range(NTASKS):
        (root / f"steps.rank{r}.jsonl").rename(root / f"first.rank{r}.jsonl")

    script, second = _run_job(tmp_path, bin_dir, root, restart=1, pause_at=None)
    assert f"job {JOB_ID} restart 1: run folder {run}, resume from {run / 'hpc_ckpt_1.ckpt'}" in script
    assert f"Restoring states from the checkpoint path at {run / 'hpc_ckpt_1.ckpt'}" in second[0], second[0][-4000:]
    assert not stale.exists()
    assert scontrol_log.read_text().splitlines() == [f"requeue {JOB_ID}"]  # no second requeue
    assert sorted(p.name for p in (root / "logs").iterdir()) == ["run"]  # one logger folder across requeues
    for csv, steps in (("metrics.before-restart1.csv", range(MAX_STEPS)), ("metrics.csv", range(PAUSE_AT, MAX_STEPS))):
        rows = (root / "logs" / "run" / csv).read_text().splitlines()  # each job's rows kept
        column = rows[0].split(",").index("step")
        assert sorted({int(r.split(",")[column]) for r in rows[1:]}) == list(steps), (csv, rows)
    for r in range(NTASKS):
        resumed = _steps(root, r)
        assert [s["batch"] for s in resumed] == list(range(PAUSE_AT + 1, MAX_STEPS + 1))
        # same batches, same weights, same optimizer and RNG states: bitwise the same losses
        assert resumed == first_steps[r][PAUSE_AT:], (r, resumed, first_steps[r])


@pytest.mark.parametrize("template", ["train.sbatch", "train_multinode.sbatch"])
def test_template_resumes_from_the_newest_checkpoint(tmp_path: Path, template: str) -> None:
    bin_dir = tmp_path / "bin"
    _fake_tools(bin_dir, _ECHO_SRUN)
    env = _job_env(tmp_path, bin_dir, tmp_path, restart=1)
    run = tmp_path / "outputs" / "slurm" / f"clap-{JOB_ID}"

    def srun_args() -> list[str]:
        proc = subprocess.run(["bash", str(TEMPLATES / template), "configs/clap.yaml", "--trainer.max_steps=9"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 0, proc.stderr
        return (tmp_path / "srun.args").read_text().splitlines()

    args = srun_args()
    assert args[:4] == ["tta", "fit", "--config", "configs/clap.yaml"] and args[-1] == "--trainer.max_steps=9"
    if template == "train_multinode.sbatch":  # the first of `scontrol show hostnames`, without a SIGPIPE race
        assert (tmp_path / "srun.master").read_text() == "node001"
    assert f"--trainer.devices={NTASKS}" in args and "--trainer.num_nodes=1" in args and "--ckpt_path" not in args
    assert f"--trainer.default_root_dir={run.relative_to(tmp_path)}" in args
    logger = json.loads(next(a for a in args if a.startswith("--trainer.logger=")).partition("=")[2])
    assert logger["init_args"] == {"save_dir": str(run.relative_to(tmp_path)), "name": "logs", "version": "run"}
    last = run / "logs" / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    (run / "logs" / "run" / "metrics.csv").write_text("step\n0\n")
    for i, path in enumerate([run / "hpc_ckpt_1.ckpt", last, run / "hpc_ckpt_2.ckpt"]):
        path.write_bytes(b"")
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
        args = srun_args()  # the newest so far
        assert args[args.index("--ckpt_path") + 1] == str(path.relative_to(tmp_path)), (path, args)
    # the metrics of the job before this restart (SLURM_RESTART_COUNT=1) are moved out of CSVLogger's way
    assert (run / "logs" / "run" / "metrics.before-restart1.csv").read_text() == "step\n0\n"


class _Tiny(L.LightningModule):
    """One linear layer, manual optimization; sends itself ``signum`` between backward and the
    optimizer step of batch `signal_at` (where Lightning's in-handler save would catch it)."""

    def __init__(self, signal_at: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = nn.Linear(4, 1)
        self.signal_at = signal_at

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self.layer(batch[0]).pow(2).mean())
        if batch_idx + 1 == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        opt.step()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_signal_mid_step_saves_after_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = _fake_tools(tmp_path / "bin", _ECHO_SRUN)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4))
    module, callback = _Tiny(signal_at=3), SlurmRequeue()
    before = signal.getsignal(signal.SIGUSR1)
    weights: dict[int, torch.Tensor] = {}

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            weights[trainer.global_step] = pl_module.layer.weight.detach().clone()

    trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path / "run",
                        callbacks=[Snapshot(), callback])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=1))
    ckpt = torch.load(tmp_path / "run" / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3  # the signalled step's update is in, and counted
    assert torch.equal(ckpt["state_dict"]["layer.weight"], weights[3])
    assert log.read_text().splitlines() == ["requeue 77"]
    assert signal.getsignal(signal.SIGUSR1) == before  # handler restored after fit


def test_job_id_and_checkpoint_names(tmp_path: Path) -> None:
    assert slurm_job_id({"SLURM_JOB_ID": "123"}) == "123"
    assert slurm_job_id({"SLURM_JOB_ID": "130", "SLURM_ARRAY_JOB_ID": "123", "SLURM_ARRAY_TASK_ID": "7"}) == "123_7"
    with pytest.raises(ValueError, match="SLURM_JOB_ID is not set"):
        slurm_job_id({})
    with pytest.raises(ValueError, match="not numeric"):
        slurm_job_id({"SLURM_JOB_ID": "12; rm -rf /"})
    assert hpc_checkpoint_path(tmp_path / "missing") == tmp_path / "missing" / "hpc_ckpt_1.ckpt"
    for name in ("hpc_ckpt_1.ckpt", "hpc_ckpt_3.ckpt", ".hpc_ckpt_4.ckpt.a9.tmp", "last.ckpt"):
        (tmp_path / name).write_bytes(b"")
    assert hpc_checkpoint_path(tmp_path) == tmp_path / "hpc_ckpt_4.ckpt"


def test_trainer_setup_only_under_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from tta.training.callbacks import AtomicCheckpointIO

    for var in [v for v in os.environ if v.startswith("SLURM_")]:
        monkeypatch.delenv(var)
    config = {"plugins": [AtomicCheckpointIO()], "default_root_dir": str(tmp_path)}
    assert slurm_trainer_setup(config, []) == (config, [])
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # salloc + a shell: not a batch task, left alone
    assert slurm_trainer_setup(config, []) == (config, [])
    monkeypatch.setenv("SLURM_JOB_NAME", "tta")
    stale = tmp_path / ".hpc_ckpt_1.ckpt.abc123.tmp"
    stale.write_bytes(b"")
    new, callbacks = slurm_trainer_setup(config, [])
    assert isinstance(new["plugins"][0], AtomicCheckpointIO)
    assert isinstance(new["plugins"][1], SLURMEnvironment) and new["plugins"][1].auto_requeue is False
    assert [type(c) for c in callbacks] == [SlurmRequeue] and not stale.exists()
    assert slurm_trainer_setup({**config, "callbacks": [SlurmRequeue()]}, [])[1] == []  # not twice
