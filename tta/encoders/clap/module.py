"""`CLAPModule` (registered ``clap_trainer``): contrastive audio-text pretraining (MS-CLAP 2023).

- symmetric cross-entropy over the audio x text similarity matrix with a learnable temperature;
  embeddings of all DDP ranks are gathered *with gradients*, so every rank sees the global batch
  of negatives;
- Adam + reduce-on-plateau on the validation loss (the paper's optimiser);
- validation/test: text->audio and audio->text R@1, R@10, mAP@10 over the whole split with
  *every* caption of every clip (the AudioCaps / Clotho protocol: 5 per test clip); test also
  reports zero-shot classification from class-name prompts (softmax accuracy on single-label
  clips, sigmoid mAP over all clips). Under DDP the per-clip records of all ranks are gathered and
  de-duplicated by clip id (the sampler's padding repeats clips), so every metric covers each clip
  of the split exactly once.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from tta.encoders.clap.network import CLAP, clip_loss
from tta.metrics.retrieval import (
    caption_retrieval_metrics,
    retrieval_metrics,
    zero_shot_accuracy,
    zero_shot_multilabel_map,
)
from tta.registry import register
from tta.training.base import TTAModule
from tta.training.gather import gather_records

log = logging.getLogger(__name__)


def label_prompt(label: str, template: str) -> str:
    """Class-name prompt: ``template.format("dog bark")`` for label ``dog_bark``."""
    return template.format(label.replace("_", " "))


@register("module", "clap_trainer")
class CLAPModule(TTAModule):
    """Trains a `CLAP` network on (waveform, caption) batches of an `AudioDataModule`.

    Args:
        clap: the CLAP network.
        mel: the datamodule's mel preset; its sample rate must be the audio encoder's.
        lr: Adam learning rate (paper: 1e-3); reduce-on-plateau by ``plateau_factor`` (0.1) with
            ``plateau_patience`` (15) validation epochs.
        zero_shot_template: prompt for zero-shot classification.
    """

    def __init__(
        self,
        clap: CLAP,
        mel: str | dict[str, Any] = "msclap",
        lr: float = 1.0e-3,
        weight_decay: float = 0.0,
        plateau_patience: int = 15,
        plateau_factor: float = 0.1,
        zero_shot_template: str = "this is the sound of {}",
        ema_decay: float | None = None,
        grad_clip: float | None = 1.0,
        nan_max_skips: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__(mel=mel, ema_decay=ema_decay, grad_clip=grad_clip, nan_max_skips=nan_max_skips, seed=seed)
        self.save_hyperparameters(ignore=["clap"])
        self.require_sample_rate(clap.sample_rate, "the audio encoder")
        self.clap = clap
        self.lr, self.weight_decay = lr, weight_decay
        self.plateau_patience, self.plateau_factor = plateau_patience, plateau_factor
        self.zero_shot_template = zero_shot_template
        self._eval: dict[str, list[Any]] = {}

    def ema_target(self) -> nn.Module:
        return self.clap

    def _gather(self, x: torch.Tensor, sync_grads: bool) -> torch.Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        return self.all_gather(x, sync_grads=sync_grads).reshape(-1, *x.shape[1:])

    # ------------------------------------------------------------------ train
    def contrastive_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """`clip_loss` of this rank's clips against the clips of every rank, and the global batch size.

        The gather keeps the autograd graph (its backward sums every rank's gradient for this rank's
        embeddings), so after DDP averages the weight gradients over ranks they equal the gradients
        of the same loss over the global batch in one process (`tests/test_clap_ddp.py`)."""
        audio, text = self.clap(batch["wav"], batch["caption"])
        audio, text = self._gather(audio, True), self._gather(text, True)
        return clip_loss(audio, text, self.clap.logit_scale), audio.shape[0]

    def train_step(self, batch: dict[str, Any]) -> None:
        (opt, _), = self.optimizer_pairs(1)
        loss, global_batch = self.contrastive_loss(batch)
        params = [p for p in self.clap.parameters() if p.requires_grad]
        if self.guarded_step(loss, opt, params, name="clap"):
            self.clap.clamp_logit_scale()
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True, batch_size=global_batch)
        self.log("train/temperature", 1.0 / self.clap.logit_scale.detach().exp(), on_step=True)

    # ------------------------------------------------------------------- eval
    def _collect(self, batch: dict[str, Any]) -> None:
        if "wav" not in batch:
            return
        audio = self.clap.embed_audio(batch["wav"])
        # every caption of each clip, the batch's own caption among them (embedded once)
        all_captions = [list(c) if one in c else [*c, one]
                        for c, one in zip(batch.get("captions", [[]] * len(batch["caption"])), batch["caption"])]
        flat = [c for caps in all_captions for c in caps]
        caption_emb = self.clap.embed_text(flat).float().split([len(c) for c in all_captions])
        text = torch.stack([emb[caps.index(one)] for emb, caps, one in zip(caption_emb, all_captions,
                                                                          batch["caption"])])
        store = self._eval
        store.setdefault("id", []).extend(batch["id"])
        store.setdefault("audio", []).extend(audio.float())
        store.setdefault("text", []).extend(text.float())
        store.setdefault("captions", []).extend(caption_emb)
        store.setdefault("labels", []).extend(batch.get("labels", [[] for _ in batch["caption"]]))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch)

    def evaluate(self, audio: torch.Tensor, text: torch.Tensor, captions: torch.Tensor | None = None,
                 owners: list[int] | None = None) -> dict[str, float]:
        """Loss of paired embeddings (row i of ``audio`` and ``text`` is one clip) and retrieval
        metrics: over every caption when ``captions`` (M, D) with their clip ``owners`` are given
        (`caption_retrieval_metrics`), else over the pairs."""
        out = {"loss": float(clip_loss(audio, text, self.clap.logit_scale))}
        if captions is not None:
            if owners is None:
                raise ValueError("CLAPModule.evaluate: captions given without their owners (clip index per caption)")
            out.update(caption_retrieval_metrics(audio, captions, owners))
            return out
        sim = audio @ text.T
        pairs = [{i} for i in range(audio.shape[0])]
        out.update({f"t2a_{k}": v for k, v in retrieval_metrics(sim.T, pairs).items()})
        out.update({f"a2t_{k}": v for k, v in retrieval_metrics(sim, pairs).items()})
        return out

    @torch.no_grad()
    def zero_shot(self, audio: torch.Tensor, labels: list[list[str]]) -> dict[str, float]:
        """Zero-shot scores from prompts of the class names present in ``labels``."""
        classes = sorted({c for ls in labels for c in ls})
        if not classes:
            return {}
        prompts = [label_prompt(c, self.zero_shot_template) for c in classes]
        class_text = self.clap.embed_text(prompts).float()
        index = {c: i for i, c in enumerate(classes)}
        single = [i for i, ls in enumerate(labels) if len(ls) == 1]
        out = {}
        if single:
            targets = torch.tensor([index[labels[i][0]] for i in single], device=audio.device)
            out["zero_shot_acc"] = zero_shot_accuracy(audio[single], class_text, targets)
        multi = torch.zeros(len(labels), len(classes), device=audio.device)
        for i, ls in enumerate(labels):
            for c in ls:
                multi[i, index[c]] = 1.0
        out["zero_shot_mAP"] = zero_shot_multilabel_map(audio, class_text, multi)
        return out

    def _finish(self, stage: str) -> dict[str, float]:
        store, self._eval = self._eval, {}
        empty: dict[str, list[Any]] = {"id": [], "audio": [], "text": [], "captions": [], "labels": []}
        store = gather_records(store or empty)  # every rank's clips, each once (a collective: every rank calls it)
        if not store["id"]:
            return {}
        device = self.device
        audio, text = torch.stack(store["audio"]).to(device), torch.stack(store["text"]).to(device)
        owners = [i for i, caps in enumerate(store["captions"]) for _ in range(caps.shape[0])]
        metrics = self.evaluate(audio, text, torch.cat(store["captions"]).to(device), owners)
        metrics["n_clips"], metrics["n_captions"] = float(len(store["id"])), float(len(owners))
        if stage == "test":
            metrics.update(self.zero_shot(audio, store["labels"]))
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=False)
        return metrics

    def on_validation_epoch_end(self) -> None:
        metrics = self._finish("val")
        (_, sched), = self.optimizer_pairs(1)
        if metrics and sched is not None and not self.trainer.sanity_checking:
            sched.step(metrics["loss"])

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Normalised audio and caption embeddings of a batch (used by ``tta index build``)."""
        audio, text = self.clap(batch["wav"], batch["caption"])
        return {"id": batch["id"], "caption": batch["caption"], "audio": audio, "text": text}

    def configure_optimizers(self) -> Any:
        params = [p for p in self.clap.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=self.plateau_factor, patience=self.plateau_patience
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/loss"}}
