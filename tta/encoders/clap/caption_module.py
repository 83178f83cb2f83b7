"""`ClapCaptionModule` (registered ``clap_caption_trainer``): trains a `ClapCaptioner`.

The trained CLAP enters through the captioner (``clap_checkpoint``: a ``clap_trainer``
checkpoint rebuilt with `tta.training.loading.load_trained`; or ``clap``: a network) and stays
frozen; the mapper (and GPT2 with ``train_lm``) is trained with AdamW and a linear warm-up.

- training: the caption LM loss (`ClapCaptioner.forward`); clips whose caption is empty are
  dropped from the batch and counted (``empty_captions``), never trained on;
- validation: ``val/loss``, and the greedy captions of the first ``val_captions`` clips of the
  first batch, logged (INFO, and as text to a TensorBoard logger) and kept in ``val_samples``;
  with ``val_metrics=True`` also greedy captions of *every* validation clip, scored as the test
  set is (``val/cider_d`` ...; costs one decoding per clip at each validation);
- test: ``test/loss`` and, from captions generated with ``test_beam_size`` for every test clip,
  corpus-level ``test/cider_d``, ``test/bleu1`` .. ``test/bleu4``, ``test/rougeL`` and
  ``test/exact`` (words equal to one reference; `tta.metrics.captioning.caption_metrics`), plus
  ``test/n_clips``. The references of a clip are *all* its captions (``batch["captions"]``,
  those without words left out; 5 per clip on AudioCaps / Clotho test), or the batch caption
  when the clip has none. The
  records of every DDP rank are gathered (each clip once) before scoring, so CIDEr-D's
  document frequencies and BLEU's counts are over the whole split; ``test_samples`` then holds
  ``{"id", "references", "generated"}`` per clip;
- predict: ``{"id", "caption"}`` with generated captions.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from tta.encoders.clap.captioner import ClapCaptioner
from tta.metrics.captioning import caption_metrics, words
from tta.registry import register
from tta.training.base import TTAModule
from tta.training.gather import gather_records
from tta.training.schedule import adamw_with_warmup

log = logging.getLogger(__name__)

_RECORD_KEYS = ("id", "references", "generated")


@register("module", "clap_caption_trainer")
class ClapCaptionModule(TTAModule):
    """Trains the mapper (and optionally GPT2) of a `ClapCaptioner` on (waveform, caption) batches.

    Args:
        captioner: the captioning network (holds the frozen CLAP audio tower).
        mel: the datamodule's mel preset; its sample rate must be the audio tower's.
        lr, weight_decay, warmup_steps: AdamW with a linear warm-up (ClipCap: 2e-5, 0, 5000).
        val_captions: clips of the first validation batch whose greedy captions are logged.
        max_len: longest generated caption in tokens.
        test_beam_size, length_penalty: decoding of the test and predict captions.
        val_metrics: also caption every validation clip (greedy) and log the test metrics as ``val/*``.
    """

    def __init__(
        self,
        captioner: ClapCaptioner,
        mel: str | dict[str, Any] = "msclap",
        lr: float = 2.0e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 5000,
        val_captions: int = 4,
        max_len: int = 30,
        test_beam_size: int = 3,
        length_penalty: float = 1.0,
        val_metrics: bool = False,
        ema_decay: float | None = None,
        grad_clip: float | None = 1.0,
        nan_max_skips: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__(mel=mel, ema_decay=ema_decay, grad_clip=grad_clip, nan_max_skips=nan_max_skips, seed=seed)
        self.save_hyperparameters(ignore=["captioner"])
        self.require_sample_rate(captioner.sample_rate, "the CLAP audio tower")
        self.captioner = captioner
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.val_captions, self.max_len = val_captions, max_len
        self.test_beam_size, self.length_penalty = test_beam_size, length_penalty
        self.val_metrics = bool(val_metrics)
        self.empty_captions = 0
        self.val_samples: list[dict[str, str]] = []
        self.test_samples: list[dict[str, Any]] = []
        self._records: dict[str, list[Any]] = {k: [] for k in _RECORD_KEYS}

    def ema_target(self) -> nn.Module:
        return self.captioner

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates (mapper, plus GPT2 with ``train_lm``)."""
        return [p for p in self.captioner.parameters() if p.requires_grad]

    def _captioned(self, batch: dict[str, Any]) -> tuple[torch.Tensor, list[str], list[str], list[int]] | None:
        """Clips with a non-empty caption: ``(wav, captions, ids, their batch indices)``; None when there is none."""
        captions = batch["caption"]
        keep = [i for i, c in enumerate(captions) if c.strip()]
        if len(keep) < len(captions):
            self.empty_captions += len(captions) - len(keep)
            log.warning(
                "%d clips without caption dropped from the batch (%d so far): %s",
                len(captions) - len(keep), self.empty_captions,
                ", ".join(str(batch["id"][i]) for i, c in enumerate(captions) if not c.strip())[:200],
            )  # fmt: skip
        if not keep:
            return None
        wav = batch["wav"] if len(keep) == len(captions) else batch["wav"][keep]
        return wav, [captions[i] for i in keep], [batch["id"][i] for i in keep], keep

    @staticmethod
    def references(batch: dict[str, Any], keep: list[int]) -> list[list[str]]:
        """The reference captions of clips ``keep``: every entry of ``batch["captions"]`` that has
        words, or ``[batch["caption"]]`` for a clip without any (or a batch without ``captions``)."""
        every = batch.get("captions")
        out = []
        for i in keep:
            given = list(every[i]) if every is not None else []
            refs = [c for c in given if words(c)] or [batch["caption"][i]]
            if not words(refs[0]):
                raise ValueError(f"clip {batch['id'][i]}: no caption with words to score against: {given or refs!r}")
            out.append(refs)
        return out

    # ---------------------------------------------------------------------------- train
    def train_step(self, batch: dict[str, Any]) -> None:
        data = self._captioned(batch)
        if data is None:
            return
        wav, captions, _, _ = data
        ((opt, sched),) = self.optimizer_pairs(1)
        loss = self.captioner(wav, captions)
        self.guarded_step(loss, opt, self.trainable_parameters(), scheduler=sched, name="caption")
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True, batch_size=len(captions))

    # ----------------------------------------------------------------------------- eval
    def generate(self, wav: torch.Tensor, beam_size: int = 1) -> list[str]:
        """Captions of clips ``wav`` ``(B, T)``."""
        return self.captioner.generate(wav, self.max_len, beam_size, self.length_penalty)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        data = self._captioned(batch) if "wav" in batch else None
        if data is None:
            return
        wav, captions, ids, keep = data
        self.log("val/loss", self.captioner(wav, captions), on_epoch=True, sync_dist=True, batch_size=len(captions))
        n = min(self.val_captions, len(captions)) if batch_idx == 0 else 0
        if self.val_metrics:
            generated = self.generate(wav)
            self._collect(ids, self.references(batch, keep), generated)
        else:
            generated = self.generate(wav[:n]) if n else []
        if n:
            self.val_samples = [
                {"id": str(i), "reference": r, "generated": g} for i, r, g in zip(ids[:n], captions[:n], generated)
            ]
            self._log_samples()

    def _log_samples(self) -> None:
        lines = [f"{s['id']}: {s['generated']!r} (reference: {s['reference']!r})" for s in self.val_samples]
        log.info("captions at step %d:\n  %s", self.global_step, "\n  ".join(lines))
        experiment = getattr(self.logger, "experiment", None) if self._trainer is not None else None
        if experiment is not None and hasattr(experiment, "add_text"):
            experiment.add_text("val/captions", "\n\n".join(lines), self.global_step)

    def _collect(self, ids: list[str], references: list[list[str]], generated: list[str]) -> None:
        for key, values in zip(_RECORD_KEYS, (ids, references, generated), strict=True):
            self._records[key].extend(values)

    def _score(self, stage: str) -> list[dict[str, Any]]:
        """Gather every rank's records (each clip once), log the corpus metrics as ``{stage}/*``
        and return the records as one dict per clip. Every rank must call it (a collective)."""
        records = gather_records(self._records)
        self._records = {k: [] for k in _RECORD_KEYS}
        if not records["id"]:
            log.warning("%s: no captioned clip to score", stage)
            return []
        metrics = caption_metrics(records["generated"], records["references"])
        metrics["n_clips"] = float(len(records["id"]))
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=False)
        rows = zip(*(records[k] for k in _RECORD_KEYS), strict=True)
        return [{"id": str(i), "references": r, "generated": g} for i, r, g in rows]

    def on_validation_epoch_start(self) -> None:
        self._records = {k: [] for k in _RECORD_KEYS}

    def on_validation_epoch_end(self) -> None:
        if self.val_metrics:
            self._score("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        data = self._captioned(batch) if "wav" in batch else None
        if data is None:
            return
        wav, captions, ids, keep = data
        self.log("test/loss", self.captioner(wav, captions), on_epoch=True, sync_dist=True, batch_size=len(captions))
        self._collect(ids, self.references(batch, keep), self.generate(wav, self.test_beam_size))

    def on_test_epoch_start(self) -> None:
        self._records = {k: [] for k in _RECORD_KEYS}
        self.test_samples = []

    def on_test_epoch_end(self) -> None:
        self.test_samples = self._score("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Generated captions of a batch (beam search with ``test_beam_size``)."""
        return {"id": batch["id"], "caption": self.generate(batch["wav"], self.test_beam_size)}

    def configure_optimizers(self) -> Any:
        opt, sched = adamw_with_warmup(
            self.trainable_parameters(), self.lr, weight_decay=self.weight_decay, warmup_steps=self.warmup_steps
        )
        return [opt], [sched]
