"""`ClapCaptionModule` (registered ``clap_caption_trainer``): trains a `ClapCaptioner`.

The trained CLAP enters through the captioner (``clap_checkpoint``: a ``clap_trainer``
checkpoint rebuilt with `tta.training.loading.load_trained`; or ``clap``: a network) and stays
frozen; the mapper (and GPT2 with ``train_lm``) is trained with AdamW and a linear warm-up.

- training: the caption LM loss (`ClapCaptioner.forward`); clips whose caption is empty are
  dropped from the batch and counted (``empty_captions``), never trained on;
- validation: ``val/loss``, and the greedy captions of the first ``val_captions`` clips of the
  first batch, logged (INFO, and as text to a TensorBoard logger) and kept in ``val_samples``;
- test: ``test/loss`` and, from captions generated with ``test_beam_size``, per-clip
  ``test/bleu1`` (clipped unigram precision x brevity penalty), ``test/rougeL`` (LCS F-measure,
  beta 1.2 as in the COCO caption evaluation) and ``test/exact`` (normalised strings equal),
  each averaged over clips, against the clip's caption in the batch (one reference per clip);
- predict: ``{"id", "caption"}`` with generated captions.

Text normalisation for the metrics: lower case, punctuation removed, split on whitespace.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from typing import Any

import torch
from torch import nn

from tta.encoders.clap.captioner import ClapCaptioner
from tta.registry import register
from tta.training.base import TTAModule
from tta.training.schedule import adamw_with_warmup

log = logging.getLogger(__name__)

_PUNCT = re.compile(r"[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words of ``text`` without punctuation."""
    return _PUNCT.sub(" ", text.lower()).split()


def bleu1(candidate: str, reference: str) -> float:
    """Sentence BLEU-1: clipped unigram precision times the brevity penalty."""
    cand, ref = words(candidate), words(reference)
    if not cand:
        return 0.0
    ref_counts = Counter(ref)
    clipped = sum(min(n, ref_counts[w]) for w, n in Counter(cand).items())
    precision = clipped / len(cand)
    brevity = 1.0 if len(cand) > len(ref) else math.exp(1.0 - len(ref) / len(cand))
    return precision * brevity


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two word lists."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str, beta: float = 1.2) -> float:
    """ROUGE-L F-measure ``(1 + b^2) P R / (R + b^2 P)`` from the LCS of the word lists."""
    cand, ref = words(candidate), words(reference)
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(cand), lcs / len(ref)
    return (1 + beta**2) * p * r / (r + beta**2 * p)


def caption_scores(candidates: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-clip ``bleu1``, ``rougeL`` and ``exact`` of generated captions against references."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} generated captions but {len(references)} references")
    return {
        "bleu1": [bleu1(c, r) for c, r in zip(candidates, references)],
        "rougeL": [rouge_l(c, r) for c, r in zip(candidates, references)],
        "exact": [float(words(c) == words(r)) for c, r in zip(candidates, references)],
    }


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
        self.empty_captions = 0
        self.val_samples: list[dict[str, str]] = []
        self.test_samples: list[dict[str, str]] = []

    def ema_target(self) -> nn.Module:
        return self.captioner

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates (mapper, plus GPT2 with ``train_lm``)."""
        return [p for p in self.captioner.parameters() if p.requires_grad]

    def _captioned(self, batch: dict[str, Any]) -> tuple[torch.Tensor, list[str], list[str]] | None:
        """Clips with a non-empty caption: ``(wav, captions, ids)``; None when there is none."""
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
        return wav, [captions[i] for i in keep], [batch["id"][i] for i in keep]

    # ---------------------------------------------------------------------------- train
    def train_step(self, batch: dict[str, Any]) -> None:
        data = self._captioned(batch)
        if data is None:
            return
        wav, captions, _ = data
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
        wav, captions, ids = data
        self.log("val/loss", self.captioner(wav, captions), on_epoch=True, sync_dist=True, batch_size=len(captions))
        if batch_idx == 0 and self.val_captions > 0:
            n = min(self.val_captions, len(captions))
            generated = self.generate(wav[:n])
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

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        data = self._captioned(batch) if "wav" in batch else None
        if data is None:
            return
        wav, captions, ids = data
        n = len(captions)
        self.log("test/loss", self.captioner(wav, captions), on_epoch=True, sync_dist=True, batch_size=n)
        generated = self.generate(wav, self.test_beam_size)
        for name, values in caption_scores(generated, captions).items():
            self.log(f"test/{name}", sum(values) / n, on_epoch=True, sync_dist=True, batch_size=n)
        self.test_samples.extend(
            {"id": str(i), "reference": r, "generated": g} for i, r, g in zip(ids, captions, generated)
        )

    def on_test_epoch_start(self) -> None:
        self.test_samples = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Generated captions of a batch (beam search with ``test_beam_size``)."""
        return {"id": batch["id"], "caption": self.generate(batch["wav"], self.test_beam_size)}

    def configure_optimizers(self) -> Any:
        opt, sched = adamw_with_warmup(
            self.trainable_parameters(), self.lr, weight_decay=self.weight_decay, warmup_steps=self.warmup_steps
        )
        return [opt], [sched]
