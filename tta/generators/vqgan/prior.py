"""`VQGANPriorModule` (registered ``vqgan_prior``): trains the GPT2 prior over a frozen VQGAN's codes.

A training step ("Diverse and Vivid Sound Generation from Text Descriptions", Sec. 2.3): the
batch's log-mels -> the frozen VQGAN's code grid (eval mode, no gradients) -> the time-major
sequence (`SpectrogramVQGAN.indices_to_sequence`: all rows of column 0, then column 1, ...) ->
the caption's text prefix (`PriorTextFeatures`: "30 Feats", "1 Feat" or "No Feat") -> the prior's
cross-entropy on the code positions (eq. 6). Validation logs the same loss and the code accuracy
(argmax of each position's distribution vs the true code, teacher-forced).

The VQGAN comes from its ``tta fit`` checkpoint (``vqgan_checkpoint``: its own hyperparameters,
strict weights, the mel front-end checked against this module's), or is given as a network
(tests, pipeline folders). ``cache_codes`` memoises each training segment's codes
(`SegmentCache`, keyed by clip id and crop start): exact as long as the datamodule does not
augment the mels. The sampling API is the `CodePriorGenerator` (``generator``), which the
pipeline (`tta.pipelines.vqgan`) uses.

Optimiser: AdamW with SpecVQGAN's (minGPT's) split, weight decay on the weights of linear layers
only (not on biases, layer norms, embeddings or the null prefix), betas (0.9, 0.95), and a linear
warm-up.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from tta.encoders.base import TextEncoder
from tta.generators.conditioning.base import drop_mask
from tta.generators.vqgan.network import SpectrogramVQGAN
from tta.generators.vqgan.prior_generator import CodePriorGenerator
from tta.generators.vqgan.prior_text import PriorTextFeatures
from tta.nn.code_prior import GPT2CodePrior
from tta.registry import register
from tta.training.base import TTAModule
from tta.training.frozen_cache import SegmentCache, segment_keys
from tta.training.loading import load_trained_part
from tta.training.schedule import adamw_with_warmup

log = logging.getLogger(__name__)

__all__ = ["VQGANPriorModule", "decay_groups"]


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups of ``module``'s trainable parameters: weight decay on the ``weight``
    matrices of linear layers (``nn.Linear``, GPT2's ``Conv1D``), none on the rest (biases, norms,
    embeddings, the null prefix)."""
    decay, rest = [], []
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            if p.requires_grad:
                linear = name == "weight" and p.dim() == 2 and not isinstance(sub, (nn.Embedding, nn.LayerNorm))
                (decay if linear else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@register("module", "vqgan_prior")
class VQGANPriorModule(TTAModule):
    """GPT2 prior over a frozen VQGAN's codes, conditioned on text features.

    Args:
        prior: the `GPT2CodePrior` (its ``num_codes`` must be the VQGAN's codebook size, its
            ``feature_dim`` / ``prefix_length`` the text features' width / length).
        vqgan_checkpoint / vqgan: the frozen VQGAN: a ``vqgan`` checkpoint, or a network.
        text_encoder: the frozen text encoder (None for ``text_features="none"``).
        text_features: ``"sequence"`` (30 Feats), ``"pooled"`` (1 Feat) or ``"none"`` (No Feat).
        text_length: most tokens (and the prefix length of ``sequence``): 30 in the paper.
        text_memo: most captions whose text features are memoised (`PriorTextFeatures`; 0: none).
        mel: mel preset name or `MelConfig` dict (the VQGAN's and the datamodule's).
        top_k, top_p, temperature: sampling defaults: top-k (None: half the codebook, the paper's 512
            of 1024; ``num_codes`` keeps every code), top-p (None: off), temperature.
        lr, betas, weight_decay, warmup_steps: AdamW (SpecVQGAN: betas (0.9, 0.95), decay 0.01).
        cache_codes: memoise each training segment's codes (exact without mel augmentation).
        eval_vocoder: vocoder of `generate_for_eval` (``griffinlim``, ``universal`` or a checkpoint).
    """

    def __init__(
        self,
        prior: GPT2CodePrior,
        vqgan_checkpoint: str | None = None,
        vqgan: SpectrogramVQGAN | None = None,
        text_encoder: TextEncoder | None = None,
        text_features: str = "sequence",
        text_length: int = 30,
        text_memo: int = 0,
        mel: str | dict[str, Any] = "vqgan",
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        lr: float = 8.0e-5,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        cache_codes: bool = False,
        eval_vocoder: str = "griffinlim",
        ema_decay: float | None = None,
        grad_clip: float | None = 1.0,
        nan_max_skips: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__(mel=mel, ema_decay=ema_decay, grad_clip=grad_clip, nan_max_skips=nan_max_skips, seed=seed)
        self.save_hyperparameters(ignore=["prior", "vqgan", "text_encoder"])
        if not isinstance(prior, GPT2CodePrior):
            raise TypeError(f"VQGANPriorModule: prior must be a GPT2CodePrior, got {type(prior).__name__}")
        self.vqgan = self._build_vqgan(vqgan_checkpoint, vqgan)
        self.text = PriorTextFeatures(text_encoder, text_features, text_length, dim=prior.feature_dim, seed=seed,
                                      memo=text_memo)
        self.prior = prior
        top_k = max(1, prior.num_codes // 2) if top_k is None else top_k
        if not 1 <= top_k <= prior.num_codes:
            raise ValueError(f"top_k must be in [1, {prior.num_codes}] (num_codes) or None, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        sampling = {"top_k": top_k, "top_p": top_p, "temperature": float(temperature)}
        # not a submodule: its weights are this module's own (same names), checks the widths now
        self.__dict__["_generator"] = CodePriorGenerator(self.frontend, self.vqgan, self.text, self.prior, sampling)
        self.lr, self.betas, self.weight_decay, self.warmup_steps = lr, tuple(betas), weight_decay, warmup_steps
        self.cache_codes, self.eval_vocoder = bool(cache_codes), eval_vocoder
        self.__dict__["_codes_cache"] = SegmentCache()  # not in checkpoints
        self.__dict__["_eval_vocoder"] = None

    def _build_vqgan(self, path: str | None, vqgan: SpectrogramVQGAN | None) -> SpectrogramVQGAN:
        if (path is None) == (vqgan is None):
            raise ValueError("give exactly one of vqgan_checkpoint (a `vqgan` checkpoint) and vqgan (a network)")
        if path is not None:
            vq_module, vqgan = load_trained_part(path, "autoencoder", "vqgan")
            self.mel_config.check_compatible(vq_module.mel_config, f"this prior and the VQGAN of {path}")
        if getattr(vqgan, "latent_kind", None) != "discrete":
            where = f" in {path}" if path is not None else ""
            raise TypeError(f"the VQGAN{where} must be a discrete-latent autoencoder (SpectrogramVQGAN), got "
                            f"{type(vqgan).__name__}")  # fmt: skip
        return vqgan.requires_grad_(False).eval()

    @property
    def generator(self) -> CodePriorGenerator:
        """The pure inference model over this module's front-end, VQGAN, text prefix and prior (the
        same submodules: training moves it); it owns the sampling API (``generate_mel``)."""
        return self.__dict__["_generator"]

    def ema_target(self) -> nn.Module:
        return self.prior

    def train(self, mode: bool = True) -> VQGANPriorModule:
        """The VQGAN and the text encoder stay in eval mode (frozen)."""
        super().train(mode)
        self.vqgan.eval()
        return self

    # ---------------------------------------------------------------------- steps
    def batch_codes(self, batch: dict[str, Any]) -> torch.Tensor:
        """Time-major code sequences ``(B, N)`` of the batch's mels (from the cache when training
        with ``cache_codes``); refuses more codes than the prior reads."""
        mel, gen = batch["mel"], self.generator
        if self.cache_codes and self.training:
            codes = self._codes_cache.get(segment_keys(batch), lambda rows: gen.encode_codes(mel[rows]), self.device)
        else:
            codes = gen.encode_codes(mel)
        if codes.shape[1] > self.prior.max_codes:
            raise ValueError(
                f"the batch's {mel.shape[-1]}-frame mels give {codes.shape[1]} codes ({codes.shape[1] // gen.rows} "
                f"columns x {gen.rows} rows), more than prior.max_codes={self.prior.max_codes}: shorten "
                f"data.segment_seconds (at most {gen.max_duration:g} s) or raise max_codes"
            )
        return codes

    def train_step(self, batch: dict[str, Any]) -> None:
        codes = self.batch_codes(batch)
        feats, mask = self.text(batch["caption"])
        b = codes.shape[0]
        drop = drop_mask(b, self.prior.cfg_dropout, self.step_generator()) if self.prior.cfg_dropout > 0 else None
        loss, _ = self.prior.loss(codes, feats, mask, drop)
        (opt, sched), = self.optimizer_pairs(1)
        self.guarded_step(loss, opt, [p for p in self.prior.parameters() if p.requires_grad], sched)
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True, batch_size=b)

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        if "mel" not in batch:
            return
        codes = self.batch_codes(batch)
        feats, mask = self.text(batch["caption"])
        loss, logits = self.prior.loss(codes, feats, mask)
        accuracy = (logits.argmax(-1) == codes.to(logits.device)).float().mean()
        b = codes.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=b)
        self.log(f"{stage}/code_accuracy", accuracy, sync_dist=True, batch_size=b)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Generated codes ``(B, N)`` for the batch's captions, as many as its mels hold."""
        n = self.batch_codes(batch).shape[1]
        return {"id": batch["id"], "codes": self.generator.generate_codes(list(batch["caption"]), n,
                                                                          generator=torch.Generator().manual_seed(self.seed))}

    def configure_optimizers(self) -> Any:
        opt, sched = adamw_with_warmup(decay_groups(self.prior, self.weight_decay), self.lr, self.betas,
                                       self.weight_decay, self.warmup_steps)
        return [opt], [{"scheduler": sched, "interval": "step"}]

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate_for_eval(self, captions: list[str], ids: list[str], seconds: float) -> torch.Tensor:
        """Waveforms ``(B, T)`` for the ``eval_metrics`` callback (the module's sampling defaults)."""
        from tta.vocoders.factory import vocoder_spec

        if self.__dict__["_eval_vocoder"] is None:
            self.__dict__["_eval_vocoder"] = vocoder_spec(self.eval_vocoder, self.mel_config)[0]
        gen = self.generator
        mel = gen.generate_mel(list(captions), gen.frames_for(seconds), seed=self.seed)
        vocoder = self.__dict__["_eval_vocoder"].to(mel.device)
        return vocoder(mel).float()[..., : round(seconds * self.mel_config.sample_rate)]

    def demo_outputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """For the demo callback: the real mels, their code reconstructions and generations for their captions."""
        gen, mel = self.generator, batch["mel"]
        frames = mel.shape[-1]
        codes = self.batch_codes(batch)
        return {"input": mel, "codes": gen.decode_codes(codes, frames),
                "generated": gen.generate_mel(list(batch["caption"]), frames, seed=self.seed)}
