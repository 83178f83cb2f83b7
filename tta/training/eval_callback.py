"""`EvalMetricsCallback` (registered ``eval_metrics``): generation metrics on a fixed small set.

At the end of every ``every_n_epochs``-th validation epoch (not the sanity check) the module
generates audio for the first ``n_clips`` clips (sorted by id) of a manifest split and the chosen
metrics (`tta.evaluation.core.evaluate`: FAD, KL, IS, CLAP score, ...) are logged as
``eval/<name>``. At the end of ``tta test`` it does the same on ``test_split`` (``n_test_clips``,
default every captioned clip) and logs ``test/<name>``, so a generator's test reports generation
metrics next to its denoising loss. The manifest defaults to the datamodule's. The module must
implement `GeneratesAudio`; otherwise the callback warns once and does nothing. Under DDP every
rank scores the same fixed set, so the logged values agree.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch

from tta.registry import register

log = logging.getLogger(__name__)


@runtime_checkable
class GeneratesAudio(Protocol):
    """A module that can generate waveforms for evaluation."""

    def generate_for_eval(
        self, captions: list[str], ids: list[str], seconds: float
    ) -> torch.Tensor:
        """Waveforms ``(B, T)`` at the module's ``sample_rate`` (or its mel sample rate)."""
        ...


def module_sample_rate(module: Any) -> int:
    """``module.sample_rate``, else the sample rate of its mel front-end."""
    sr = getattr(module, "sample_rate", None)
    if sr is None and hasattr(module, "mel_config"):
        sr = module.mel_config.sample_rate
    if sr is None:
        raise AttributeError(
            f"{type(module).__name__} has neither sample_rate nor mel_config"
        )
    return int(sr)


@register("callback", "eval_metrics")
class EvalMetricsCallback(L.Callback):
    """Logs generation metrics on a fixed small set after validation.

    Args:
        manifest: manifest of the reference clips (captions are the prompts); None: the
            datamodule's (`manifest_path()`).
        split: the manifest split validation draws from (None: all clips).
        n_clips: size of the fixed validation set (the first ids in sorted order).
        test_split, n_test_clips: the split and size (None: all) scored at the end of ``tta test``;
            ``test_split=None`` skips it.
        metrics: metric names of ``tta eval`` (fad, kl, is, clap, clap_a, psnr, spec_fid).
        seconds: generated length and pad/crop length (default: the longest reference clip).
        embedder: ``yamnet`` | ``cnn14:WEIGHTS`` | ``cnn14_16k:WEIGHTS`` | ``clap:CKPT``, or an `Embedder`.
        clap_checkpoint: ``clap_trainer`` checkpoint for ``clap`` / ``clap_a`` (or pass ``clap``).
        every_n_epochs: run after every n-th validation epoch.
    """

    def __init__(
        self, manifest: str | None = None, split: str | None = "val", n_clips: int = 8,
        metrics: tuple[str, ...] = ("fad", "kl"), seconds: float | None = None, embedder: Any = "yamnet",
        clap_checkpoint: str | None = None, clap: Any | None = None, every_n_epochs: int = 1, batch_size: int = 8,
        test_split: str | None = "test", n_test_clips: int | None = None,
    ) -> None:  # fmt: skip
        if n_clips < 1 or (n_test_clips is not None and n_test_clips < 1):
            raise ValueError(f"EvalMetricsCallback: n_clips ({n_clips}) and n_test_clips ({n_test_clips}) must be >= 1")
        self.manifest, self.split, self.n_clips = manifest, split, int(n_clips)
        self.test_split, self.n_test_clips = test_split, n_test_clips
        self.metrics = tuple(metrics)
        self.seconds = seconds
        self.embedder_spec = embedder
        self.clap_checkpoint = clap_checkpoint
        self.clap = clap
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.batch_size = batch_size
        self._warned = False
        self._clips: dict[str, list[Any]] = {}
        self._embedder: Any | None = None
        self.last: dict[str, float] = {}

    def _reference(self, stage: str = "val") -> list[Any]:
        """The fixed clips of ``stage`` (``val``: ``split`` / ``n_clips``; ``test``: ``test_split`` /
        ``n_test_clips``), read once."""
        if stage not in self._clips:
            from tta.data.audio import audio_info
            from tta.data.manifest import read_manifest
            from tta.evaluation.clips import Clip

            if self.manifest is None:
                raise ValueError("EvalMetricsCallback: no manifest given and the datamodule has none "
                                 "(give manifest=...)")
            split, n = (self.split, self.n_clips) if stage == "val" else (self.test_split, self.n_test_clips)
            items = read_manifest(self.manifest)
            if split is not None:
                items = [i for i in items if i.split == split]
            items = sorted((i for i in items if i.captions), key=lambda i: i.id)[:n]
            if not items:
                raise ValueError(
                    f"EvalMetricsCallback: {self.manifest} has no captioned clips in split {split!r}"
                )
            self._clips[stage] = [Clip.from_item(i) for i in items]
            if self.seconds is None:
                self.seconds = max(audio_info(i.audio).duration for i in items)
        return self._clips[stage]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.manifest is None:
            dm = getattr(trainer, "datamodule", None)
            if dm is not None and hasattr(dm, "manifest_path"):
                self.manifest = str(dm.manifest_path())

    def _models(self) -> tuple[Any, Any]:
        if self._embedder is None and set(self.metrics) & {"fad", "kl", "is"}:
            from tta.metrics.embedders import build_embedder

            spec = self.embedder_spec
            self._embedder = build_embedder(spec) if isinstance(spec, str) else spec
        if self.clap is None and self.clap_checkpoint is not None:
            from tta.training.loading import load_trained_part

            self.clap = load_trained_part(self.clap_checkpoint, "clap", "CLAP (clap_trainer)")[1]
        return self._embedder, self.clap

    def _generates(self, pl_module: L.LightningModule) -> bool:
        if isinstance(pl_module, GeneratesAudio):
            return True
        if not self._warned:
            log.warning(
                "EvalMetricsCallback: %s does not implement generate_for_eval(captions, ids, seconds); "
                "generation metrics are skipped", type(pl_module).__name__,
            )  # fmt: skip
            self._warned = True
        return False

    def on_validation_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if not self._generates(pl_module):
            return
        self.last = self.run(pl_module)
        pl_module.log_dict(
            {f"eval/{k}": v for k, v in self.last.items()}, sync_dist=False
        )

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.test_split is None or not self._generates(pl_module):
            return
        self.last = self.run(pl_module, stage="test")
        pl_module.log_dict({f"test/{k}": v for k, v in self.last.items()}, sync_dist=False)

    @torch.no_grad()
    def run(self, module: Any, stage: str = "val") -> dict[str, float]:
        """Generate the fixed set of ``stage`` with ``module`` and return the scalar metrics."""
        from tta.evaluation.clips import Clip
        from tta.evaluation.core import evaluate

        ref = self._reference(stage)
        embedder, clap = self._models()
        ids = [c.id for c in ref]
        captions = [c.captions[0] for c in ref]
        was_training = module.training
        module.eval()
        try:
            wav = module.generate_for_eval(captions, ids, float(self.seconds))
        finally:
            module.train(was_training)
        if wav.dim() != 2 or wav.shape[0] != len(ids):
            raise ValueError(
                f"generate_for_eval returned {tuple(wav.shape)}; expected ({len(ids)}, T)"
            )
        sr = module_sample_rate(module)
        gen = [
            Clip(c.id, [cap], c.labels, None, w.detach().float().cpu(), sr)
            for c, cap, w in zip(ref, captions, wav)
        ]
        report = evaluate(gen, ref, self.metrics, embedder=embedder, clap=clap, seconds=self.seconds,
                          batch_size=self.batch_size, n_examples=0, is_splits=1)  # fmt: skip
        scores = {
            k: float(v)
            for k, v in report["metrics"].items()
            if isinstance(v, (int, float))
        }
        scores["n_flagged"] = float(report["flagged"]["count"])
        return scores
