"""Spectrogram FID and MMKL with a tta-trained mel classifier standing in for SpecVQGAN's Melception
("Diverse and Vivid Sound Generation from Text Descriptions", Sec. 3.1).

- `MelClassifierEmbedder`: an `Embedder` over a ``mel_classifier`` checkpoint. Waveforms are
  analysed by the checkpoint's own mel front-end (``embed`` / ``classify``); log-mels of that
  front-end go in directly (``embed_mel`` / ``classify_mel``). Embedding: the classifier's pooled
  pre-logit features; logits: its head. ``describe()`` records the checkpoint's sha256.
- **Spectrogram FID**: the Fréchet distance between the Gaussians of the embeddings of generated
  and reference clips, `tta.metrics.fad.frechet_distance_sets` (SpecVQGAN's ``calculate_fid`` on
  Melception features), e.g. `FrechetAudioDistance` with this embedder.
- **MMKL** (`mmkl`, metric ``melception_mmkl``): SpecVQGAN's ``calculate_kl`` with the classifier's
  own activation. Every generated clip is compared with the reference(s) of its key (SpecVQGAN: the
  video id, several generated samples per reference allowed)::

      KL_g = reduce_{r: key(r) = key(g)} KL(p_r || q_g)        MMKL = mean_g KL_g

  ``KL`` is `tta.metrics.classifier.paired_kl`: ``softmax`` for a single-label classifier (SpecVQGAN's
  Melception), ``sigmoid`` for a multi-label one (the paper's sigmoid Melception: SpecVQGAN's
  formula with the softmax replaced by sigmoids, the per-class terms summed unnormalised), or
  ``bernoulli`` (the KL between the per-class Bernoulli distributions, summed). With one reference
  per key (SpecVQGAN, ``tta eval``) ``reduce`` does not matter; with several, ``max`` (default) or
  ``mean``.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tta.data.mel import MelFrontend
from tta.metrics.classifier import VARIANTS, Variant, paired_kl
from tta.metrics.embedders import Embedder, _check
from tta.metrics.pairing import IdMetric, IdMismatchError
from tta.registry import register
from tta.utils.files import file_sha256

__all__ = ["MelClassifierEmbedder", "MelceptionMMKL", "mmkl"]

Reduce = Literal["max", "mean"]


class MelClassifierEmbedder(Embedder):
    """A frozen `MelClassifierNet` (with its ``mel_config``, ``labels``, ``multi_label``, as
    `load_mel_classifier` returns it) as an evaluation embedder."""

    def __init__(self, net: nn.Module, weight_hash: str, checkpoint: str | None = None,
                 device: str | torch.device = "cpu") -> None:  # fmt: skip
        self.device = torch.device(device)
        self.model = net.eval().to(self.device)
        self.frontend = MelFrontend.from_config(net.mel_config).to(self.device)
        self.name = "mel_classifier"
        self.weight_hash, self.checkpoint = weight_hash, checkpoint
        self.sample_rate = int(net.mel_config.sample_rate)
        self.dim, self.num_classes = int(net.dim), int(net.num_classes)
        self.multilabel = bool(net.multi_label)
        self.class_names = list(net.labels)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu", use_ema: bool = False
                        ) -> MelClassifierEmbedder:  # fmt: skip
        """The classifier of a ``mel_classifier`` checkpoint; the file's sha256 is the weight hash."""
        from tta.encoders.mel_classifier import load_mel_classifier

        net = load_mel_classifier(path, use_ema=use_ema)
        return cls(net, weight_hash=file_sha256(path), checkpoint=Path(path).name, device=device)

    @property
    def kl_variant(self) -> Variant:
        """MMKL's KL: ``sigmoid`` for a multi-label classifier, ``softmax`` for a single-label one."""
        return "sigmoid" if self.multilabel else "softmax"

    @torch.no_grad()
    def embed_and_classify_mel(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``(B, dim)`` and logits ``(B, num_classes)`` of log-mels ``(B, n_mels, F)``."""
        with torch.autocast(device_type=self.device.type, enabled=False):
            emb = self.model.embedding(mel.to(self.device).float())
            return emb.float().cpu(), self.model.classify_embedding(emb).float().cpu()

    def mel(self, wav: torch.Tensor) -> torch.Tensor:
        """Log-mels of waveforms ``(B, T)`` at `sample_rate` (the classifier's front-end)."""
        return self.frontend(_check(wav, type(self).__name__).to(self.device).float())

    def embed_mel(self, mel: torch.Tensor) -> torch.Tensor:
        return self.embed_and_classify_mel(mel)[0]

    def classify_mel(self, mel: torch.Tensor) -> torch.Tensor:
        return self.embed_and_classify_mel(mel)[1]

    def embed(self, wav: torch.Tensor) -> torch.Tensor:
        return self.embed_mel(self.mel(wav))

    def classify(self, wav: torch.Tensor) -> torch.Tensor:
        return self.classify_mel(self.mel(wav))

    def embed_and_classify(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.embed_and_classify_mel(self.mel(wav))

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update({
            "source": f"tta mel_classifier checkpoint {self.checkpoint}", "labels": len(self.class_names),
            "front_end": self.frontend.config.to_dict(), "mmkl_kl": self.kl_variant,
            "clip_pooling": "mean over frequency, then mean + max over time of the last stage",
        })  # fmt: skip
        return out


def mmkl(gen_logits: torch.Tensor, gen_keys: Sequence[Hashable], ref_logits: torch.Tensor, ref_keys: Sequence[Hashable],
         variant: Variant = "sigmoid", reduce: Reduce = "max") -> torch.Tensor:  # fmt: skip
    """Per generated clip ``(N,)``: ``reduce`` over the references of its key of ``KL(p_ref || q_gen)``
    (float64; the MMKL is the mean). A generated key without a reference raises `IdMismatchError`."""
    if gen_logits.dim() != 2 or ref_logits.dim() != 2 or gen_logits.shape[1] != ref_logits.shape[1]:
        raise ValueError(f"mmkl: logits must be (N, C) and (M, C), got {tuple(gen_logits.shape)} and "
                         f"{tuple(ref_logits.shape)}")  # fmt: skip
    if len(gen_keys) != gen_logits.shape[0] or len(ref_keys) != ref_logits.shape[0]:
        raise ValueError(f"mmkl: {len(gen_keys)} / {len(ref_keys)} keys for {gen_logits.shape[0]} / "
                         f"{ref_logits.shape[0]} generated / reference clips")  # fmt: skip
    if variant not in VARIANTS or reduce not in ("max", "mean"):
        raise ValueError(f"mmkl: variant must be one of {VARIANTS} and reduce max or mean, got {variant!r}, {reduce!r}")
    refs: dict[Hashable, list[int]] = {}
    for j, key in enumerate(ref_keys):
        refs.setdefault(key, []).append(j)
    missing = sorted({str(k) for k in gen_keys if k not in refs})
    if missing:
        raise IdMismatchError(f"mmkl: {len(missing)} generated keys have no reference clip: {', '.join(missing[:10])}")
    out = []
    for i, key in enumerate(gen_keys):
        idx = refs[key]
        kl = paired_kl(ref_logits[idx], gen_logits[i : i + 1].expand(len(idx), -1), variant)
        out.append(kl.max() if reduce == "max" else kl.mean())
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


@register("metric", "melception_mmkl")
class MelceptionMMKL(IdMetric):
    """MMKL as a `torchmetrics.Metric` (see `mmkl`).

    ``update(logits, ids, keys=None, real=False)``: classifier logits ``(B, C)``; ``ids`` name the
    clips (repeats across DDP ranks count once), ``keys`` group generated clips with references
    (default: the ids, i.e. paired by id). ``compute()`` is the mean over generated clips.
    """

    higher_is_better = False
    is_differentiable = False

    def __init__(self, variant: Variant = "sigmoid", reduce: Reduce = "max", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if variant not in VARIANTS or reduce not in ("max", "mean"):
            raise ValueError(f"MelceptionMMKL: variant must be one of {VARIANTS} and reduce max or mean, got "
                             f"{variant!r}, {reduce!r}")  # fmt: skip
        self.variant, self.reduce = variant, reduce
        for side in ("gen", "ref"):
            self.add_state(f"{side}_logits", default=[], dist_reduce_fx="cat")
            self.add_state(f"{side}_ids", default=[], dist_reduce_fx="cat")
            self.add_state(f"{side}_keys", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, ids: list[str], keys: list[str] | None = None, real: bool = False) -> None:
        if ids is None or logits.dim() != 2:
            raise ValueError(f"MelceptionMMKL.update: needs logits (B, C) and their clip ids, got "
                             f"{tuple(logits.shape)} and {ids!r}")  # fmt: skip
        side = "ref" if real else "gen"
        getattr(self, f"{side}_logits").append(logits.detach().to(self.device, torch.float64))
        getattr(self, f"{side}_ids").append(self._hashes(ids, logits.shape[0], "logits"))
        getattr(self, f"{side}_keys").append(self._hashes(ids if keys is None else keys, logits.shape[0], "logits"))

    def _values(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not len(self.gen_logits) or not len(self.ref_logits):
            raise ValueError("MelceptionMMKL: needs both generated and reference logits")
        gen_ids, gen_keys, gen = self.unique(self.gen_ids, self.gen_keys, self.gen_logits)
        _, ref_keys, ref = self.unique(self.ref_ids, self.ref_keys, self.ref_logits)
        gen_keys, ref_keys = gen_keys.tolist(), ref_keys.tolist()
        missing = sorted({self.name_of(k) for k in set(gen_keys) - set(ref_keys)})
        if missing:
            raise IdMismatchError(f"MelceptionMMKL: {len(missing)} generated clips have no reference: "
                                  f"{', '.join(missing[:10])}")  # fmt: skip
        return gen_ids, mmkl(gen, gen_keys, ref, ref_keys, self.variant, self.reduce)

    def compute(self) -> torch.Tensor:
        return self._values()[1].mean()

    def per_item(self) -> tuple[list[str], torch.Tensor]:
        """Generated clip ids and their KL, synced over ranks."""
        with self.synced():
            gen_ids, values = self._values()
        return [self.name_of(h) for h in gen_ids.tolist()], values
