"""`EvalMetricsCallback` (registered ``eval_metrics``): generation metrics on a fixed small set.

At the end of every ``every_n_epochs``-th validation epoch (not the sanity check) the module
generates audio for the first ``n_clips`` clips (sorted by id) of a manifest split and the chosen
metrics (`tta.evaluation.core.evaluate`: FAD, KL, IS, CLAP score, ...) are logged as
``eval/<name>``. The module must implement `GeneratesAudio`; otherwise the callback warns once
and does nothing. Under DDP every rank scores the same fixed set, so the logged values agree.
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
        manifest: manifest of the reference clips (captions are the prompts).
        split: the manifest split to draw from (None: all clips).
        n_clips: size of the fixed set (the first ids in sorted order).
        metrics: metric names of ``tta eval`` (fad, kl, is, clap, clap_a, psnr, spec_fid).
        seconds: generated length and pad/crop length (default: the longest reference clip).
        embedder: ``yamnet`` | ``cnn14:WEIGHTS`` | ``cnn14_16k:WEIGHTS`` | ``clap:CKPT``, or an `Embedder`.
        clap_checkpoint: ``clap_trainer`` checkpoint for ``clap`` / ``clap_a`` (or pass ``clap``).
        every_n_epochs: run after every n-th validation epoch.
    """

    def __init__(
        self, manifest: str, split: str | None = "val", n_clips: int = 8, metrics: tuple[str, ...] = ("fad", "kl"),
        seconds: float | None = None, embedder: Any = "yamnet", clap_checkpoint: str | None = None,
        clap: Any | None = None, every_n_epochs: int = 1, batch_size: int = 8,
    ) -> None:  # fmt: skip
        self.manifest, self.split, self.n_clips = manifest, split, int(n_clips)
        self.metrics = tuple(metrics)
        self.seconds = seconds
        self.embedder_spec = embedder
        self.clap_checkpoint = clap_checkpoint
        self.clap = clap
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.batch_size = batch_size
        self._warned = False
        self._clips: list[Any] | None = None
        self._embedder: Any | None = None
        self.last: dict[str, float] = {}

    def _reference(self) -> list[Any]:
        if self._clips is None:
            from tta.data.audio import audio_info
            from tta.data.manifest import read_manifest
            from tta.evaluation.clips import Clip

            items = read_manifest(self.manifest)
            if self.split is not None:
                items = [i for i in items if i.split == self.split]
            items = sorted((i for i in items if i.captions), key=lambda i: i.id)[
                : self.n_clips
            ]
            if not items:
                raise ValueError(
                    f"EvalMetricsCallback: {self.manifest} has no captioned clips in split {self.split!r}"
                )
            self._clips = [Clip.from_item(i) for i in items]
            if self.seconds is None:
                self.seconds = max(audio_info(i.audio).duration for i in items)
        return self._clips

    def _models(self) -> tuple[Any, Any]:
        if self._embedder is None and set(self.metrics) & {"fad", "kl", "is"}:
            from tta.metrics.embedders import build_embedder

            spec = self.embedder_spec
            self._embedder = build_embedder(spec) if isinstance(spec, str) else spec
        if self.clap is None and self.clap_checkpoint is not None:
            from tta.training.loading import load_trained_part

            self.clap = load_trained_part(self.clap_checkpoint, "clap", "CLAP (clap_trainer)")[1]
        return self._embedder, self.clap

    def on_validation_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if not isinstance(pl_module, GeneratesAudio):
            if not self._warned:
                log.warning(
                    "EvalMetricsCallback: %s does not implement generate_for_eval(captions, ids, seconds); "
                    "generation metrics are skipped", type(pl_module).__name__,
                )  # fmt: skip
                self._warned = True
            return
        self.last = self.run(pl_module)
        pl_module.log_dict(
            {f"eval/{k}": v for k, v in self.last.items()}, sync_dist=False
        )

    @torch.no_grad()
    def run(self, module: Any) -> dict[str, float]:
        """Generate the fixed set with ``module`` and return the scalar metrics."""
        from tta.evaluation.clips import Clip
        from tta.evaluation.core import evaluate

        ref = self._reference()
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
