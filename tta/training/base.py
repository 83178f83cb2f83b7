"""`TTAModule`: the LightningModule base shared by tta's trainable components.

It gives every module the same training features:

- manual optimization helpers (`guarded_step`) with gradient clipping and a NaN/Inf guard that
  skips a non-finite step and aborts after ``nan_max_skips`` consecutive skips;
- an EMA of the trained network (counter saved);
- a mel front-end whose parameters are stored in the checkpoint (``checkpoint["tta"]["mel"]``);
- exact resume: counters and RNG states are saved with the checkpoint and restored at the first
  training batch after a resume.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from tta import __version__
from tta.data.mel import MelConfig, MelFrontend
from tta.training.ema import EMA

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps produced NaN/Inf losses or gradients."""


class TTAModule(L.LightningModule):
    """Base class: subclasses implement ``ema_target()`` and their training step."""

    def __init__(
        self,
        mel: str | dict[str, Any] = "audioldm",
        ema_decay: float | None = None,
        grad_clip: float | None = 1.0,
        nan_max_skips: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.frontend = MelFrontend(mel) if isinstance(mel, str) else MelFrontend.from_config(mel)
        self.grad_clip = grad_clip
        self.nan_max_skips = nan_max_skips
        self.seed = seed
        self.ema_decay = ema_decay
        self.ema: EMA | None = None
        self.nan_skips_consecutive = 0
        self.nan_skips_total = 0
        self.batches_trained = 0
        self._pending_rng: dict[str, Any] | None = None

    # ----------------------------------------------------------------- identity
    @property
    def mel_config(self) -> MelConfig:
        return self.frontend.config

    def ema_target(self) -> nn.Module:
        """The network whose weights are averaged (the generator / autoencoder)."""
        raise NotImplementedError

    def require_sample_rate(self, sample_rate: int, what: str) -> None:
        """Raise unless ``what`` (an audio encoder) expects the mel front-end's (the data's) rate."""
        if sample_rate != self.mel_config.sample_rate:
            raise ValueError(
                f"{type(self).__name__}: {what} expects {sample_rate} Hz but mel preset "
                f"{self.mel_config.name!r} (the datamodule's audio) is {self.mel_config.sample_rate} Hz"
            )

    def step_generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded by (seed, batches_trained, salt): noise that survives resume."""
        g = torch.Generator()
        g.manual_seed(hash((self.seed, self.batches_trained, salt)) & 0x7FFF_FFFF_FFFF_FFFF)
        return g

    # --------------------------------------------------------------- the steps
    def optimizer_pairs(self, n: int) -> list[tuple[Any, Any]]:
        """``n`` (optimizer, scheduler) pairs in ``configure_optimizers`` order, padded with Nones."""
        opts = self.optimizers()
        scheds = self.lr_schedulers()
        opts = list(opts) if isinstance(opts, (list, tuple)) else [opts]
        scheds = list(scheds) if isinstance(scheds, (list, tuple)) else ([scheds] if scheds is not None else [])
        pairs = [(o, scheds[i] if i < len(scheds) else None) for i, o in enumerate(opts)]
        return pairs + [(None, None)] * (n - len(pairs))

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None and self.trainer.is_global_zero:
            _remove_stale_checkpoint_temporaries(self.trainer)
        dm = self.trainer.datamodule if self._trainer is not None else None
        dm_mel = getattr(dm, "mel_config", None)
        if dm_mel is not None:
            self.mel_config.check_compatible(dm_mel, f"{type(self).__name__} and {type(dm).__name__}")
        if self.ema_decay is not None and self.ema is None:
            self.ema = EMA(self.ema_target(), self.ema_decay)

    def guarded_step(
        self,
        loss: torch.Tensor,
        optimizer: Any,
        params: list[nn.Parameter],
        scheduler: Any | None = None,
        name: str = "loss",
    ) -> bool:
        """Backward, clip and step ``optimizer`` unless loss or gradients are non-finite.

        Returns True when the step was taken. Non-finite steps are skipped (gradients zeroed),
        counted, logged, and after ``nan_max_skips`` consecutive ones training aborts.
        """
        if not torch.isfinite(loss.detach()).all():
            self._skip(optimizer, f"{name} is {loss.item()}")
            return False
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        max_norm = self.grad_clip if self.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm)
        if not torch.isfinite(grad_norm):
            self._skip(optimizer, f"gradient norm of {name} is {grad_norm.item()}")
            return False
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        self.nan_skips_consecutive = 0
        self.log(f"train/grad_norm_{name}", grad_norm, on_step=True, prog_bar=False)
        return True

    def finite_mean(self, losses: torch.Tensor, ids: list[str]) -> torch.Tensor:
        """Mean of the finite clips' entries of a loss per clip ``(B,)`` or per element ``(B, ...)``:
        the clips of ``ids`` whose loss is NaN/Inf are named in the log and appended to
        ``<default_root_dir>/nonfinite.jsonl`` (batch, ids, values). With every clip finite the result
        is ``losses.mean()`` (for squared errors, exactly the batch MSE); with no finite clip it is
        non-finite, so `guarded_step` skips the step and the ``nan_max_skips`` abort still applies.

        Gradients reach only the finite entries, but a NaN that flowed through a network before the
        loss still poisons the weight gradients (0 x NaN); `finite_batch_loss` recomputes instead."""
        finite = self.record_nonfinite(losses, ids)
        if bool(finite.all()):
            return losses.mean()
        return losses[finite].mean() if bool(finite.any()) else losses.sum()

    def record_nonfinite(self, losses: torch.Tensor, ids: list[str]) -> torch.Tensor:
        """Which clips' losses (``(B,)`` or ``(B, ...)``, one row per id) are finite, as a bool ``(B,)``;
        the others are logged and written to ``<default_root_dir>/nonfinite.jsonl``."""
        if losses.dim() < 1 or losses.shape[0] != len(ids):
            raise ValueError(f"the non-finite check needs one loss per clip: got shape {tuple(losses.shape)} "
                             f"for {len(ids)} ids")
        per_clip = losses.detach().flatten(1).mean(1) if losses.dim() > 1 else losses.detach()
        finite = torch.isfinite(per_clip)
        if bool(finite.all()):
            return finite
        bad = [(str(clip), float(v)) for clip, v, ok in zip(ids, per_clip.cpu().tolist(), finite.tolist()) if not ok]
        log.warning("non-finite loss at batch %d for clip(s) %s; %d of %d clips still train",
                    self.batches_trained, ", ".join(c for c, _ in bad), int(finite.sum()), len(ids))
        if self._trainer is not None and self.trainer.is_global_zero:
            path = Path(self.trainer.default_root_dir) / "nonfinite.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"batch": self.batches_trained, "ids": [c for c, _ in bad],
                                     "loss": [str(v) for _, v in bad]}) + "\n")
        return finite

    def finite_batch_loss(self, batch: dict[str, Any],
                          clip_losses: Callable[[dict[str, Any]], torch.Tensor]) -> torch.Tensor:
        """The training loss of ``batch`` without its non-finite clips.

        ``clip_losses(batch)`` gives the loss per clip ``(B,)`` or per element ``(B, ...)`` and draws
        its randomness from `step_generator` (so on a sub-batch it gives what that sub-batch alone
        gives). All finite: their mean (one forward, the value of the plain batch loss). Some not:
        they are named (`record_nonfinite`) and the loss is computed again on the other clips alone
        (`select_clips`), so the step equals the step on the batch without them; a NaN input would
        otherwise make every weight gradient NaN through the network (0 x NaN). None finite: a
        non-finite loss, so `guarded_step` skips the step and counts it toward ``nan_max_skips``."""
        losses = clip_losses(batch)
        finite = self.record_nonfinite(losses, list(batch["id"]))
        if bool(finite.all()):
            return losses.mean()
        if not bool(finite.any()):
            return losses.sum()
        del losses  # the graph through the non-finite clips
        return clip_losses(select_clips(batch, finite.tolist())).mean()

    def _skip(self, optimizer: Any, why: str) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.nan_skips_consecutive += 1
        self.nan_skips_total += 1
        log.warning(
            "non-finite step skipped at batch %d (%s); %d consecutive, %d total",
            self.batches_trained, why, self.nan_skips_consecutive, self.nan_skips_total,
        )
        if self.nan_skips_consecutive >= self.nan_max_skips:
            raise NonFiniteLossError(
                f"{self.nan_skips_consecutive} consecutive non-finite steps (last: {why}); aborting. "
                "Lower the learning rate, check the data (`tta data check`) or use 32-bit precision."
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None

    def train_step(self, batch: dict[str, Any]) -> None:
        """One manual-optimization step on a non-empty batch (implemented by subclasses)."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Runs `train_step`, then advances the batch counter and the EMA.

        Both happen inside the step so that a checkpoint written by a callback at the end of
        this batch already includes them (callbacks' batch-end hooks run before the module's).
        """
        if "mel" in batch:  # an empty batch: every clip failed to decode (counted by the datamodule)
            self.train_step(batch)
        self.batches_trained += 1
        if self.ema is not None:
            self.ema.update(self.ema_target())
        self.log("train/nan_skips", float(self.nan_skips_total), on_step=True)

    # -------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.setdefault("tta", {})
        meta.update(
            {
                "version": __version__,
                "component": getattr(type(self), "registry_name", type(self).__name__),
                "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "mel": self.mel_config.to_dict(),
                "counters": {
                    "batches_trained": self.batches_trained,
                    "nan_skips_total": self.nan_skips_total,
                    "nan_skips_consecutive": self.nan_skips_consecutive,
                },
                "rng": _get_rng_state(),
            }
        )
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("tta")
        if meta is None:
            raise KeyError("checkpoint has no 'tta' section: it was not written by a tta module")
        stored = MelConfig.from_dict(meta["mel"])
        stored.check_compatible(self.mel_config, "checkpoint and module")
        counters = meta["counters"]
        self.batches_trained = int(counters["batches_trained"])
        self.nan_skips_total = int(counters["nan_skips_total"])
        self.nan_skips_consecutive = int(counters["nan_skips_consecutive"])
        self._pending_rng = meta.get("rng")
        if "ema" in checkpoint:
            if self.ema is None:
                if self.ema_decay is None:
                    raise KeyError("checkpoint holds an EMA but the module was built with ema_decay=None")
                self.ema = EMA(self.ema_target(), self.ema_decay)
            self.ema.load_state_dict(checkpoint["ema"])


def select_clips(batch: dict[str, Any], keep: list[bool]) -> dict[str, Any]:
    """The clips of a collated batch where ``keep`` is True: every tensor with one row per clip and
    every list / tuple with one entry per clip is indexed; other entries (``n_skipped``) are kept."""
    n = len(batch["id"])
    if len(keep) != n:
        raise ValueError(f"select_clips: {len(keep)} flags for a batch of {n} clips")
    rows = [i for i, k in enumerate(keep) if k]
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value[torch.tensor(rows, dtype=torch.long, device=value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == n:
            out[key] = type(value)(value[i] for i in rows)
        else:
            out[key] = value
    return out


def _remove_stale_checkpoint_temporaries(trainer: L.Trainer) -> None:
    """Remove (and log) the half-written checkpoint temporaries an interrupted run left in the
    checkpoint folders and beside ``ckpt_path``."""
    from tta.utils.files import remove_stale_temporaries

    folders = {Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
    ckpt_path = getattr(trainer, "ckpt_path", None)
    if ckpt_path and Path(ckpt_path).is_file():
        folders.add(Path(ckpt_path).parent)
    for folder in sorted(folders):
        for path in remove_stale_temporaries(folder):
            log.warning("removed %s: a checkpoint write interrupted by an earlier run", path)


def _get_rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> tuple:
    """numpy's RNG state as plain Python types (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return (str(kind), keys.tolist(), int(pos), int(has_gauss), float(gauss))


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
