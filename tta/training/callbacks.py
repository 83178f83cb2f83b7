"""Callbacks, progress display and checkpoint I/O shared by every tta run."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from tta.registry import register
from tta.training.vocoding import resolve_vocoder
from tta.utils.plots import safe_name, save_spectrograms
from tta.utils.weights import atomic_save, load_checkpoint

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed, loaded with ``weights_only=True``.

    A run killed while saving leaves the previous checkpoint intact, and a checkpoint that needs
    arbitrary code to unpickle is refused (`tta.utils.weights.UnsafeCheckpointError`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location or "cpu")


@register("callback", "config_in_checkpoint")
class ConfigInCheckpoint(L.Callback):
    """Stores the resolved run config (YAML text) in every checkpoint under ``["tta"]["config"]``."""

    def __init__(self, config_yaml: str) -> None:
        self.config_yaml = config_yaml

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault("tta", {})["config"] = self.config_yaml


@register("callback", "demo_audio")
class DemoAudioCallback(L.Callback):
    """Every ``every_n_steps`` training batches, writes WAVs and spectrogram PNGs of the module's
    ``demo_outputs(batch)`` on the first validation batch.

    ``demo_outputs`` returns ``{name: mel (B, n_mels, F)}`` and/or ``{name: wav (B, T)}`` (1-D
    per item). Mels are vocoded with ``vocoder`` (a registered weight-free vocoder such as
    ``"griffinlim"`` or ``"universal"``, a vocoder checkpoint, or None for PNGs only; see
    `tta.training.vocoding.resolve_vocoder`), which must share the module's mel front-end.
    """

    def __init__(self, every_n_steps: int = 500, out_dir: str | None = None, vocoder: str | None = "griffinlim",
                 max_items: int = 2) -> None:
        self.every_n_steps = every_n_steps
        self.out_dir = out_dir
        self.vocoder_name = vocoder
        self.max_items = max_items
        self._vocoder: torch.nn.Module | None = None
        self._batch: dict[str, Any] | None = None

    def _get_vocoder(self, pl_module: L.LightningModule) -> torch.nn.Module | None:
        if self.vocoder_name is None:
            return None
        if self._vocoder is None:
            self._vocoder = resolve_vocoder(self.vocoder_name, pl_module.mel_config)
        return self._vocoder

    def _out_dir(self, trainer: L.Trainer) -> Path:
        root = Path(self.out_dir) if self.out_dir else Path(trainer.default_root_dir) / "demo_audio"
        return root

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = getattr(pl_module, "batches_trained", trainer.global_step)
        if self.every_n_steps <= 0 or step % self.every_n_steps != 0 or not trainer.is_global_zero:
            return
        self.write(trainer, pl_module, step)

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> list[Path]:
        """Render the demo outputs now; returns the files written."""
        from tta.data.audio import save_audio

        if self._batch is None:
            dm = trainer.datamodule
            loader = dm.val_dataloader() if dm is not None else None
            if loader is None:
                return []
            self._batch = next(iter(loader))
        batch = {k: (v[: self.max_items].to(pl_module.device) if torch.is_tensor(v) else v[: self.max_items])
                 for k, v in self._batch.items() if k != "n_skipped"}
        was_training = pl_module.training
        pl_module.eval()
        outputs = pl_module.demo_outputs(batch)
        pl_module.train(was_training)
        out = self._out_dir(trainer) / f"step{step:07d}"
        sr = pl_module.mel_config.sample_rate
        written: list[Path] = []
        mels = {k: v.float().cpu() for k, v in outputs.items() if v.dim() == 3}
        wavs = {k: v.float().cpu() for k, v in outputs.items() if v.dim() == 2}
        vocoder = self._get_vocoder(pl_module)
        if vocoder is not None:
            for name, mel in mels.items():
                wavs.setdefault(name, vocoder(mel))
        for name, wav in wavs.items():
            for i, w in enumerate(wav):
                path = out / f"{safe_name(batch['id'][i])}_{name}.wav"
                save_audio(path, w, sr)
                written.append(path)
        if mels:
            for i, item_id in enumerate(batch["id"]):
                written.append(save_spectrograms(out / f"{safe_name(item_id)}.png", {k: v[i] for k, v in mels.items()},
                                                 pl_module.mel_config))
        log.info("demo outputs for step %d written to %s", step, out)
        return written


# ------------------------------------------------------------------------------------ progress
def step_bounded(trainer: L.Trainer) -> bool:
    """Whether the run stops at ``max_steps`` (optimizer steps, `trainer.global_step`)."""
    return trainer.max_steps is not None and trainer.max_steps > 0


def epoch_text(trainer: L.Trainer, epoch: int) -> str:
    """``epoch 6/9`` (0-based, as Lightning's checkpoint names) or ``epoch 6`` when epochs are
    unbounded (``max_epochs`` None or -1; Lightning's own bar would print ``6/-2``)."""
    bounded = trainer.max_epochs is not None and trainer.max_epochs >= 0
    return f"epoch {epoch}/{trainer.max_epochs - 1}" if bounded else f"epoch {epoch}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _metric_text(metrics: dict[str, Any]) -> str:
    shown = []
    for name, value in metrics.items():
        if name == "v_num":
            continue
        value = value.item() if torch.is_tensor(value) and value.numel() == 1 else value
        shown.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    return ", ".join(shown)


@register("callback", "step_progress_bar")
class StepProgressBar(RichProgressBar):
    """Lightning's rich bar with honest text for step-bounded runs: with ``max_steps`` the training
    bar counts optimizer steps (``Epoch 6, step ━━━ 120/500``), and unbounded epochs
    (``max_epochs: -1``) read ``Epoch 6``, not ``Epoch 6/-2``. `tta fit` uses it on a terminal."""

    def _get_train_description(self, current_epoch: int) -> str:
        text = epoch_text(self.trainer, current_epoch).capitalize()
        if step_bounded(self.trainer):
            text += ", step"
        width = len(self.validation_description)  # as Lightning: no flicker between the bars' texts
        return f"{text:{width}}" if width > len(text) else text

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if step_bounded(self.trainer) else super().total_train_batches

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not step_bounded(trainer) or self.is_disabled or self._leave:
            super().on_train_epoch_start(trainer, pl_module)  # a bar per epoch, from 0
            if step_bounded(trainer):
                self._update(self.train_progress_bar_id, trainer.global_step)
            return
        description = self._get_train_description(trainer.current_epoch)
        if self.progress is not None:  # one bar for the run: its steps and speed go on across epochs
            if self.train_progress_bar_id is None:
                self.train_progress_bar_id = self._add_task(trainer.max_steps, description)
            self.progress.update(self.train_progress_bar_id, total=trainer.max_steps, completed=trainer.global_step,
                                 description=description, visible=True)
        self.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if step_bounded(trainer):
            self._update(self.train_progress_bar_id, trainer.global_step)


@register("callback", "progress_log")
class ProgressLog(ProgressBar):
    """Progress as plain log lines, for output redirected to a file (SLURM, CI), where a live bar
    is noise: ``step 120/500 (epoch 6, batch 3/20): 2.1 steps/s, eta 3m10s; train/loss 0.1234``
    (epoch-bounded runs: ``epoch 6/9, batch 3/20: ...``), at the first batch, then every
    ``every_seconds`` and at the last step; ``validation at step 120: val/loss ...`` after each
    validation. `tta fit` uses it when standard output is not a terminal."""

    def __init__(self, every_seconds: float = 30.0) -> None:
        super().__init__()
        if not every_seconds >= 0:
            raise ValueError(f"progress_log: every_seconds must be >= 0, got {every_seconds}")
        self.every_seconds = float(every_seconds)
        self._enabled = True
        self._started: tuple[float, int] | None = None
        self._last_line: float | None = None

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started, self._last_line = (time.monotonic(), trainer.global_step), None

    def progress_text(self, trainer: L.Trainer, batch_idx: int) -> str:
        """Where the run is: steps (step-bounded) or epochs, the batch in the epoch, speed and ETA."""
        total = trainer.num_training_batches  # per epoch (Lightning's bar total shrinks to the steps left)
        batch = f"batch {batch_idx + 1}/{total}" if math.isfinite(total) else f"batch {batch_idx + 1}"
        step = trainer.global_step
        if step_bounded(trainer):
            text = f"step {step}/{trainer.max_steps} ({epoch_text(trainer, trainer.current_epoch)}, {batch})"
        else:
            text = f"{epoch_text(trainer, trainer.current_epoch)}, {batch} (step {step})"
        if self._started is not None:
            elapsed, done = time.monotonic() - self._started[0], step - self._started[1]
            if elapsed > 0 and done > 0:
                rate = done / elapsed
                text += f": {rate:.3g} steps/s"
                if step_bounded(trainer):
                    text += f", eta {_duration(max(trainer.max_steps - step, 0) / rate)}"
        return text

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.is_disabled:
            return
        now = time.monotonic()
        last = step_bounded(trainer) and trainer.global_step >= trainer.max_steps
        if self._last_line is not None and now - self._last_line < self.every_seconds and not last:
            return
        self._last_line = now
        metrics = _metric_text(self.get_metrics(trainer, pl_module))
        log.info("%s%s", self.progress_text(trainer, batch_idx), f"; {metrics}" if metrics else "")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_disabled or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        log.info("validation at step %d (%s): %s", trainer.global_step,
                 epoch_text(trainer, trainer.current_epoch), _metric_text(metrics) or "no metrics")
