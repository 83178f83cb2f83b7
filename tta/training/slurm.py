"""SLURM auto-requeue with the checkpoint written between batches, not inside the signal handler.

Lightning's own SLURM support (``SLURMEnvironment(auto_requeue=True)``) saves the HPC checkpoint
*inside* the SIGUSR1 handler, i.e. wherever the main thread happens to be when the signal lands:
mid-backward, between ``optimizer.step()`` and the batch counters (a checkpoint that resumes one
batch off), or while the DDP ranks are inside a collective (the save's barrier then pairs with the
wrong collective and the job hangs until SLURM kills it; Lightning issue 21406, open in 2.6).

`SlurmRequeue` replaces it. Its handler only records the signal. At the end of the next training
batch (where `ModelCheckpoint` saves, so the checkpoint resumes exactly) the ranks agree whether any
of them was signalled (one boolean all-reduce per batch), all of them call
``trainer.save_checkpoint(<default_root_dir>/hpc_ckpt_<n>.ckpt)`` and global rank 0 runs ``scontrol
requeue <job id>``. SLURM then ends the job and starts it again with the same job id; the same
``srun tta fit ...`` finds the newest ``hpc_ckpt_*.ckpt`` in ``default_root_dir`` (Lightning's own
resume rule whenever SLURM is detected and no ``--ckpt_path`` is given) and continues.

`slurm_trainer_setup` wires it into ``tta fit|validate|test|predict`` when Lightning detects SLURM.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

__all__ = ["SlurmRequeue", "hpc_checkpoint_path", "slurm_job_id", "slurm_trainer_setup"]

_HPC_NAME = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


def slurm_job_id(env: dict[str, str] | None = None) -> str:
    """The id ``scontrol requeue`` takes: ``SLURM_JOB_ID``, or ``<array job>_<task>`` in an array job."""
    env = dict(os.environ) if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID"):
        if not env.get("SLURM_ARRAY_TASK_ID"):
            raise ValueError("SLURM_ARRAY_JOB_ID is set but SLURM_ARRAY_TASK_ID is not: cannot name the array task")
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    elif env.get("SLURM_JOB_ID"):
        job_id = env["SLURM_JOB_ID"]
    else:
        raise ValueError("SLURM_JOB_ID is not set: not inside a SLURM job, nothing to requeue")
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job_id):
        raise ValueError(f"SLURM job id {job_id!r} (from SLURM_JOB_ID / SLURM_ARRAY_*) is not numeric")
    return job_id


def hpc_checkpoint_path(folder: str | os.PathLike) -> Path:
    """The next ``hpc_ckpt_<n>.ckpt`` in ``folder`` (n = 1 + the largest present), the name
    Lightning resumes from under SLURM."""
    folder = Path(folder)
    numbers = [int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else []) if (m := _HPC_NAME.match(p.name))]
    return folder / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


class SlurmRequeue(L.Callback):
    """On ``signum`` (SLURM's ``--signal=SIGUSR1@90``): save an HPC checkpoint at the end of the
    current training batch on every rank and requeue the job from global rank 0.

    Args:
        signum: the signal SLURM sends before the time limit (``--signal``).
        requeue: run ``scontrol requeue <job id>`` after saving (False: only save).
    """

    def __init__(self, signum: int = signal.SIGUSR1, requeue: bool = True) -> None:
        self.signum = signal.Signals(signum)
        self.requeue = requeue
        self.signalled = False
        self._previous: Any = None
        self._installed = False

    def _record(self, signum: int, frame: Any) -> None:
        # a signal handler runs between any two bytecodes: only set a flag (no I/O, no logging locks)
        self.signalled = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("SlurmRequeue: fit does not run in the main thread, so %s cannot be handled: the job "
                        "will not save an HPC checkpoint or requeue itself", self.signum.name)
            return
        self._previous = signal.signal(self.signum, self._record)
        self._installed = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # every rank takes part, signalled or not: a rank that saves alone would wait in the save's barrier
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        self.save_and_requeue(trainer)
        self.signalled = False  # after the save: a rank signalled a moment later does not save (and requeue) twice

    def save_and_requeue(self, trainer: L.Trainer) -> Path:
        """Write ``hpc_ckpt_<n>.ckpt`` into ``default_root_dir`` (collective) and, on global rank 0,
        requeue the job. Returns the checkpoint path."""
        path = trainer.strategy.broadcast(str(hpc_checkpoint_path(trainer.default_root_dir)), src=0)
        trainer.save_checkpoint(path, weights_only=False)  # the whole training state: optimizers, loops, RNG
        if not trainer.is_global_zero:
            return Path(path)
        log.info("%s: saved %s at step %d", self.signum.name, path, trainer.global_step)
        if self.requeue:
            _scontrol_requeue(slurm_job_id())
        return Path(path)


def _scontrol_requeue(job_id: str) -> None:
    cmd = ["scontrol", "requeue", job_id]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        log.error("`scontrol` is not on PATH (a container without the SLURM client?): job %s is NOT requeued. "
                  "The HPC checkpoint is saved: submit the same job script again to resume from it", job_id)
        return
    if result.returncode != 0:
        log.error("`%s` failed (exit %d): %s. The HPC checkpoint is saved: submit the same job script again "
                  "to resume from it", " ".join(cmd), result.returncode, (result.stderr or result.stdout).strip())
        return
    log.info("requeued SLURM job %s", job_id)


def slurm_trainer_setup(config: dict[str, Any], callbacks: list[Any]) -> tuple[dict[str, Any], list[Any]]:
    """Trainer arguments and callbacks for a run under SLURM (unchanged elsewhere).

    When Lightning detects SLURM (``SLURM_NTASKS`` set, job name not ``bash``/``interactive``):
    Lightning's in-handler requeue is switched off (``SLURMEnvironment(auto_requeue=False)`` added
    to ``plugins`` unless a cluster environment is configured there), `SlurmRequeue` is added, and
    checkpoint-write temporaries left in ``default_root_dir`` by a job killed while saving are
    removed (their names would otherwise make Lightning pick a nonexistent ``hpc_ckpt_<n>``).
    """
    from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment

    from tta.utils.files import remove_stale_temporaries

    if not SLURMEnvironment.detect():
        return config, callbacks
    plugins = config.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, ClusterEnvironment) for p in plugins):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    if not any(isinstance(c, SlurmRequeue) for c in list(config.get("callbacks") or []) + list(callbacks)):
        callbacks = [*callbacks, SlurmRequeue()]
    root = config.get("default_root_dir") or os.getcwd()
    for path in remove_stale_temporaries(root):
        log.warning("removed %s: a checkpoint write interrupted by an earlier run of this job", path)
    return {**config, "plugins": plugins}, callbacks
