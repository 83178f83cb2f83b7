"""Callbacks and checkpoint I/O shared by every tta run."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
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
