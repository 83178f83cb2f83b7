"""`MelClassifierModule` (registered module ``mel_classifier``): trains a `MelClassifierNet` on the
labels of any manifest, and `load_mel_classifier` gives the frozen network back from a checkpoint.

The classifier stands in for SpecVQGAN's "Melception": its multi-scale features are the VQGAN's
perceptual loss (`VQGANModule(perceptual_checkpoint=...)`), its embedding and logits give the
spectrogram FID and MMKL of ``tta eval --melception`` (`tta.metrics.melception`). It lives here,
beside the other audio models, because both the generators and the evaluation use it.

- ``multi_label: true``: BCE-with-logits over the label vocabulary, multi-hot targets (AudioSet, and
  the paper's Melception retrained with sigmoids); ``false``: softmax cross-entropy, every clip
  carrying exactly one label (VGGSound, SpecVQGAN's Melception).
- Label vocabulary: ``labels`` as given, or (``labels: null``) the sorted labels of the
  datamodule's training split, found when fitting starts. Either way it must hold the network's
  ``num_classes`` labels; it is saved in the checkpoint (``checkpoint["tta"]["labels"]``) and a
  resumed or reloaded module checks it. A clip with no label, or a label outside the vocabulary,
  is refused by id.
- Logged: ``train/loss``; over the whole validation / test split (every rank's clips, each once)
  ``val/loss``, ``val/acc`` (the top-scoring class is one of the clip's labels) and ``val/mAP``
  (macro average precision over the classes with a positive clip).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tta.metrics.retrieval import zero_shot_multilabel_map
from tta.nn.mel_classifier import MelClassifierNet
from tta.registry import register
from tta.training.base import TTAModule
from tta.training.gather import gather_records
from tta.training.schedule import adamw_with_warmup

log = logging.getLogger(__name__)

__all__ = ["MelClassifierModule", "classification_metrics", "load_mel_classifier"]


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``acc`` (top-1 class among the clip's labels) and ``mAP`` of logits ``(N, C)`` against
    multi-hot targets ``(N, C)``."""
    logits, targets = logits.detach().float().cpu(), targets.detach().float().cpu()
    hit = targets.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
    # average precision only depends on the ranking of each class's scores: logits @ I ranks as the logits
    ap = zero_shot_multilabel_map(logits, torch.eye(logits.shape[1]), targets)
    return {"acc": float(hit.float().mean()), "mAP": ap}


@register("module", "mel_classifier")
class MelClassifierModule(TTAModule):
    """Trains a mel classifier on the ``labels`` of `AudioDataModule` batches.

    Args:
        classifier: the `MelClassifierNet` (its ``n_mels`` must be the mel preset's).
        labels: the label vocabulary (class index order); None: the sorted labels of the training
            split.
        multi_label: BCE over sigmoids (True) or softmax cross-entropy (False).
        mel: mel preset name or `MelConfig` dict (must match the datamodule's).
        lr, betas, weight_decay, warmup_steps: AdamW and its linear warm-up.
    """

    def __init__(
        self,
        classifier: MelClassifierNet,
        labels: list[str] | None = None,
        multi_label: bool = True,
        mel: str | dict[str, Any] = "vqgan",
        lr: float = 1.0e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        ema_decay: float | None = None,
        grad_clip: float | None = 5.0,
        nan_max_skips: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__(mel=mel, ema_decay=ema_decay, grad_clip=grad_clip, nan_max_skips=nan_max_skips, seed=seed)
        self.save_hyperparameters(ignore=["classifier"])
        if classifier.n_mels != self.mel_config.n_mels:
            raise ValueError(f"MelClassifierModule: the classifier takes {classifier.n_mels} mel bins but mel preset "
                             f"{self.mel_config.name!r} has {self.mel_config.n_mels}")  # fmt: skip
        self.classifier = classifier
        self.multi_label = bool(multi_label)
        self.labels: list[str] | None = None
        if labels is not None:
            self._set_labels(list(labels), "model.init_args.labels")
        self.lr, self.betas, self.weight_decay, self.warmup_steps = lr, tuple(betas), weight_decay, warmup_steps
        self._eval: dict[str, list[Any]] = {}

    def ema_target(self) -> nn.Module:
        return self.classifier

    # ------------------------------------------------------------------ labels
    def _set_labels(self, labels: list[str], source: str) -> None:
        if len(set(labels)) != len(labels) or not all(isinstance(x, str) and x for x in labels):
            raise ValueError(f"MelClassifierModule: {source} must be distinct non-empty strings")
        if len(labels) != self.classifier.num_classes:
            raise ValueError(f"MelClassifierModule: {source} holds {len(labels)} labels but the classifier has "
                             f"num_classes={self.classifier.num_classes}; first labels: {labels[:5]}")  # fmt: skip
        if self.labels is not None and labels != self.labels:
            diff = sorted(set(labels) ^ set(self.labels))[:5] or "(same labels, different order)"
            raise ValueError(f"MelClassifierModule: the label vocabulary of {source} differs from this module's: {diff}")
        self.labels = labels
        self._index = {name: i for i, name in enumerate(labels)}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit" or self.labels is not None:
            return
        datasets = getattr(self.trainer.datamodule, "datasets", None) if self._trainer is not None else None
        if not datasets or "train" not in datasets:
            raise ValueError("MelClassifierModule: labels=None takes the vocabulary from the `audio` datamodule's "
                             "training split; give model.init_args.labels with another datamodule")  # fmt: skip
        vocab = sorted({label for item in datasets["train"].items for label in item.labels})
        self._set_labels(vocab, "the training split's labels")
        self.hparams["labels"] = vocab
        log.info("mel classifier: %d labels from the training split", len(vocab))

    def targets(self, labels: list[list[str]], ids: list[str]) -> torch.Tensor:
        """Multi-hot ``(B, C)`` targets of the clips' labels; a clip without a label, with a label
        outside the vocabulary, or (single-label) with several labels is refused by id."""
        if self.labels is None:
            raise ValueError("MelClassifierModule: no label vocabulary (labels=None is resolved when fitting "
                             "starts, or restored from a checkpoint)")  # fmt: skip
        out = torch.zeros(len(labels), len(self.labels), device=self.device)
        for row, (clip_labels, clip) in enumerate(zip(labels, ids)):
            unknown = [x for x in clip_labels if x not in self._index]
            if not clip_labels or unknown or (not self.multi_label and len(clip_labels) != 1):
                why = (f"labels {unknown} are not in the vocabulary of {len(self.labels)}" if unknown else
                       "carries no label" if not clip_labels else
                       f"carries {len(clip_labels)} labels but multi_label=false needs exactly one")  # fmt: skip
                raise ValueError(f"MelClassifierModule: clip {clip!r} {why}")
            out[row, [self._index[x] for x in clip_labels]] = 1.0
        return out

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """BCE-with-logits (multi-label) or cross-entropy on the single label."""
        logits = logits.float()
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, targets)
        return F.cross_entropy(logits, targets.argmax(dim=1))

    # ------------------------------------------------------------------- steps
    def train_step(self, batch: dict[str, Any]) -> None:
        (opt, sched), = self.optimizer_pairs(1)
        targets = self.targets(batch["labels"], batch["id"])
        loss = self.loss(self.classifier(batch["mel"]), targets)
        self.guarded_step(loss, opt, list(self.classifier.parameters()), sched, name="classifier")
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True, batch_size=targets.shape[0])

    def _collect(self, batch: dict[str, Any]) -> None:
        if "mel" not in batch:
            return
        targets = self.targets(batch["labels"], batch["id"])
        store = self._eval
        store.setdefault("id", []).extend(batch["id"])
        store.setdefault("logits", []).extend(self.classifier(batch["mel"]).float())
        store.setdefault("targets", []).extend(targets)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch)

    def _finish(self, stage: str) -> None:
        store, self._eval = self._eval, {}
        store = gather_records(store or {"id": [], "logits": [], "targets": []})  # a collective: every rank calls it
        if not store["id"]:
            return
        logits, targets = torch.stack(store["logits"]).to(self.device), torch.stack(store["targets"]).to(self.device)
        metrics = {"loss": float(self.loss(logits, targets)), **classification_metrics(logits, targets),
                   "n_clips": float(len(store["id"]))}  # fmt: skip
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=False)
        self.log(f"{stage}/acc_bar", metrics["acc"], prog_bar=True, logger=False, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Per clip: the embedding ``(B, D)`` and the logits ``(B, C)``."""
        emb = self.classifier.embedding(batch["mel"])
        return {"id": batch["id"], "embedding": emb, "logits": self.classifier.classify_embedding(emb)}

    def configure_optimizers(self) -> Any:
        opt, sched = adamw_with_warmup(self.classifier.parameters(), self.lr, self.betas, self.weight_decay,
                                       self.warmup_steps)  # fmt: skip
        return [opt], [sched]

    # -------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["tta"]["labels"] = list(self.labels) if self.labels is not None else None
        checkpoint["tta"]["multi_label"] = self.multi_label

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        labels = checkpoint["tta"].get("labels")
        if labels is None:
            raise KeyError("mel classifier checkpoint holds no label vocabulary (checkpoint['tta']['labels'])")
        self._set_labels(list(labels), "the checkpoint")


def load_mel_classifier(path: str | os.PathLike, use_ema: bool = False) -> MelClassifierNet:
    """The `MelClassifierNet` of a ``mel_classifier`` checkpoint written by ``tta fit``: rebuilt from
    the checkpoint's own config, weights loaded strictly, in eval mode and frozen. The network
    carries the module's ``mel_config``, ``labels`` and ``multi_label`` as attributes."""
    from tta.training.loading import load_trained_part

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"mel classifier checkpoint not found: {path}")
    module, net = load_trained_part(path, "classifier", "mel classifier (mel_classifier)", use_ema=use_ema)
    if not isinstance(module, MelClassifierModule):
        raise TypeError(f"{path} is a {type(module).__name__} checkpoint, not a mel classifier (mel_classifier) one")
    net.mel_config, net.labels, net.multi_label = module.mel_config, list(module.labels), module.multi_label
    return net.requires_grad_(False).eval()
