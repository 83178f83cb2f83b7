"""`VQGANModule` (registered ``vqgan``): trains the `SpectrogramVQGAN` under manual optimization.

Loss (the paper's eq. 4, as SpecVQGAN / taming-transformers compute it)::

    nll  = mean|x - x_hat|                   (``rec_loss: l1``; ``l2``: mean (x - x_hat)^2, eq. 3 as printed)
         + perceptual_weight * P(x, x_hat)   (when a perceptual network is given)
    loss = nll + codebook_weight * vq_loss + lambda * g_loss        (the adversarial term from disc_start)
    d    = hinge(D(x), D(x_hat))                                     (from disc_start)

``vq_loss`` is the quantizer's eq. 3 codebook + commitment loss (`tta.nn.quantize`),
``g_loss = -mean(D(x_hat))`` (hinge) on the PatchGAN's logits, and ``lambda`` the adaptive weight of
`tta.generators.vae.module.adaptive_gan_weight` clamped to ``adaptive_weight_range`` and scaled by
``disc_weight`` (SpecVQGAN clamps it to [1, 1], i.e. ``lambda = disc_weight``). Before
``disc_start`` training batches neither the adversarial term nor the discriminator is trained (the
paper zeroes the adversarial loss in the initial stage).

Perceptual term ``P`` ("learned perceptual audio patch similarity"): ``perceptual`` is any frozen
``nn.Module`` mapping mels ``(B, 1, n_mels, frames)`` to a list of feature maps ``(B, C_s, H_s,
W_s)``; ``P = mean_b sum_s mean_{h,w} sum_c (phi_s(x) - phi_s(x_hat))^2`` with the features
unit-normalised over channels first (LPIPS-style, ``perceptual_normalize``). The tta mel classifier
(`tta.encoders.mel_classifier`) plugs in by ``perceptual_checkpoint``: its multi-scale features,
loaded frozen from its checkpoint, on the same mel front-end.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from tta.generators.vae.codec import image_to_mel, mel_to_image
from tta.generators.vae.module import adaptive_gan_weight, autoencoder_gan_optimizers
from tta.generators.vqgan.network import SpectrogramVQGAN
from tta.metrics.spectrogram import normalize_log_mel, spectrogram_psnr
from tta.nn.discriminators import NLayerDiscriminator
from tta.nn.gan_losses import adversarial_loss
from tta.nn.quantize import code_statistics
from tta.registry import register
from tta.training.base import TTAModule

log = logging.getLogger(__name__)

__all__ = ["VQGANModule", "feature_distance"]


def feature_distance(real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor], normalize: bool = True) -> torch.Tensor:
    """Multi-scale feature distance ``mean_b sum_s mean_{h,w} sum_c (a - b)^2`` (eq. 4's last term).

    ``real`` / ``fake``: one feature map ``(B, C_s, ...)`` per scale; with ``normalize`` each
    position's feature vector is scaled to unit l2 norm over channels first (LPIPS). The real
    features are detached.
    """
    if len(real) != len(fake) or not real:
        raise ValueError(f"feature_distance: got {len(real)} real and {len(fake)} generated feature maps")
    total = None
    for r, f in zip(real, fake):
        if r.shape != f.shape or r.dim() < 3:
            raise ValueError(f"feature_distance: feature maps must match and be (B, C, ...), got {tuple(r.shape)} "
                             f"and {tuple(f.shape)}")  # fmt: skip
        r, f = r.detach().float(), f.float()
        if normalize:
            r = r / (r.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        d = (r - f).pow(2).sum(1).flatten(1).mean(1)  # (B,)
        total = d if total is None else total + d
    return total.mean()


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode (no codebook statistics or EMA updates), then restore its mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@register("module", "vqgan")
class VQGANModule(TTAModule):
    """Trains a spectrogram VQGAN; networks given by config.

    Args:
        autoencoder: the `SpectrogramVQGAN`.
        discriminator: optional PatchGAN on the mel image; used from ``disc_start`` batches on.
        perceptual: optional frozen network, mels ``(B, 1, n_mels, frames)`` -> list of feature maps.
        mel: mel preset name or `MelConfig` dict (must match the datamodule's).
        rec_loss: ``l1`` (SpecVQGAN's code) or ``l2`` (eq. 3 as printed).
        codebook_weight: weight of the quantizer's loss.
        perceptual_weight: weight of ``P``; None: 1.0 with a perceptual network, 0 without (a
            positive weight without a network is an error).
        perceptual_normalize: unit-normalise features over channels before the distance.
        perceptual_checkpoint: a ``mel_classifier`` checkpoint whose features are ``perceptual``
            (instead of giving the network); its mel front-end must be this module's.
        adversarial: ``hinge`` or ``lsgan`` (`tta.nn.gan_losses`).
        disc_weight, disc_start, adaptive_weight_range: adversarial weight (see the module docstring).
        lr, betas, weight_decay, warmup_steps: AdamW and its warm-up, shared by both optimizers.
    """

    def __init__(
        self,
        autoencoder: SpectrogramVQGAN,
        discriminator: NLayerDiscriminator | None = None,
        perceptual: nn.Module | None = None,
        mel: str | dict[str, Any] = "vqgan",
        rec_loss: Literal["l1", "l2"] = "l1",
        codebook_weight: float = 1.0,
        perceptual_weight: float | None = None,
        perceptual_normalize: bool = True,
        perceptual_checkpoint: str | None = None,
        adversarial: str = "hinge",
        disc_weight: float = 0.8,
        disc_start: int = 30001,
        adaptive_weight_range: tuple[float, float] = (0.0, 1.0e4),
        lr: float = 4.5e-6,
        betas: tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        ema_decay: float | None = None,
        grad_clip: float | None = 1.0,
        nan_max_skips: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__(mel=mel, ema_decay=ema_decay, grad_clip=grad_clip, nan_max_skips=nan_max_skips, seed=seed)
        self.save_hyperparameters(ignore=["autoencoder", "discriminator", "perceptual"])
        if getattr(autoencoder, "latent_kind", None) != "discrete":
            raise TypeError(f"VQGANModule: autoencoder must be a discrete-latent autoencoder such as "
                            f"SpectrogramVQGAN, got {type(autoencoder).__name__}")  # fmt: skip
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"VQGANModule: rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        if perceptual_checkpoint is not None:
            perceptual = self._perceptual_from(perceptual_checkpoint, perceptual)
        if perceptual_weight is None:
            perceptual_weight = 1.0 if perceptual is not None else 0.0
        if perceptual_weight < 0 or (perceptual_weight > 0 and perceptual is None):
            raise ValueError(f"VQGANModule: perceptual_weight={perceptual_weight} needs a perceptual network "
                             "(model.init_args.perceptual); set it to 0 or give the network")  # fmt: skip
        lo, hi = (float(v) for v in adaptive_weight_range)
        if not 0.0 <= lo <= hi:
            raise ValueError(f"VQGANModule: adaptive_weight_range must satisfy 0 <= min <= max, got {adaptive_weight_range}")
        self.autoencoder = autoencoder
        self.discriminator = discriminator
        self.perceptual = perceptual.requires_grad_(False).eval() if perceptual is not None else None
        self.rec_loss, self.codebook_weight = rec_loss, float(codebook_weight)
        self.perceptual_weight, self.perceptual_normalize = float(perceptual_weight), bool(perceptual_normalize)
        self.adversarial = adversarial_loss(adversarial)
        self.disc_weight, self.disc_start, self.adaptive_weight_range = float(disc_weight), int(disc_start), (lo, hi)
        self.lr, self.betas, self.weight_decay, self.warmup_steps = lr, tuple(betas), weight_decay, warmup_steps
        self._val_counts: torch.Tensor | None = None

    def ema_target(self) -> nn.Module:
        return self.autoencoder

    def _perceptual_from(self, path: str, given: nn.Module | None) -> nn.Module:
        """The features of the mel classifier in checkpoint ``path``; its mel front-end must be this module's."""
        from tta.encoders.mel_classifier import load_mel_classifier
        from tta.nn.mel_classifier import MelClassifierFeatures

        if given is not None:
            raise ValueError("VQGANModule: give at most one of perceptual (a network) and perceptual_checkpoint")
        net = load_mel_classifier(path)
        self.mel_config.check_compatible(net.mel_config, f"this VQGAN and the mel classifier of {path}")
        return MelClassifierFeatures(net)

    def train(self, mode: bool = True) -> VQGANModule:
        """The perceptual network stays in eval mode (it is frozen)."""
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.eval()
        return self

    # ------------------------------------------------------------ layout utils
    def _to_image(self, mel: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(B, n_mels, F) -> (B, 1, F', n_mels) padded to the downsample factor with the log floor."""
        return mel_to_image(mel, self.autoencoder.downsample_factor, self.mel_config.log_floor)

    # ---------------------------------------------------------------- public API
    @torch.no_grad()
    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel ``(B, n_mels, frames)`` -> code indices ``(B, ceil(frames/f), n_mels/f)``."""
        with _eval_mode(self.autoencoder):
            return self.autoencoder.encode(self._to_image(mel)[0])[1]

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """Code grid ``(B, h, w)`` -> log-mel ``(B, n_mels, frames)``."""
        return image_to_mel(self.autoencoder.decode_indices(indices), frames)

    @torch.no_grad()
    def reconstruct(self, mel: torch.Tensor) -> torch.Tensor:
        """Encode, quantize and decode a log-mel batch."""
        x, frames = self._to_image(mel)
        with _eval_mode(self.autoencoder):
            return image_to_mel(self.autoencoder(x)[0], frames)

    # ------------------------------------------------------------------ losses
    def _losses(self, x: torch.Tensor, recon: torch.Tensor, vq_loss: torch.Tensor) -> dict[str, torch.Tensor]:
        diff = x.float() - recon.float()
        rec = diff.abs().mean() if self.rec_loss == "l1" else diff.pow(2).mean()
        out = {"rec": rec, "vq": vq_loss.float(), "nll": rec}
        if self.perceptual is not None and self.perceptual_weight > 0:
            # the perceptual network reads (B, 1, n_mels, frames); the autoencoder image is (B, 1, frames, n_mels)
            p = feature_distance(self.perceptual(x.transpose(2, 3)), self.perceptual(recon.transpose(2, 3)),
                                 self.perceptual_normalize)
            out["perceptual"] = p
            out["nll"] = rec + self.perceptual_weight * p
        return out

    def disc_active(self) -> bool:
        return self.discriminator is not None and self.batches_trained >= self.disc_start

    # ------------------------------------------------------------------- steps
    def train_step(self, batch: dict[str, Any]) -> None:
        (opt_ae, sched_ae), (opt_d, sched_d) = self.optimizer_pairs(2)
        x, _ = self._to_image(batch["mel"])
        recon, vq_loss, info = self.autoencoder(x)
        losses = self._losses(x, recon, vq_loss)
        loss = losses["nll"] + self.codebook_weight * losses["vq"]
        if self.disc_active():
            g_loss = self.adversarial.generator(self.discriminator(recon))
            lo, hi = self.adaptive_weight_range
            weight = adaptive_gan_weight(losses["nll"], g_loss, self.autoencoder.last_layer_weight(),
                                         self.disc_weight, lo, hi)
            loss = loss + weight * g_loss
            losses["g_adv"], losses["adaptive_weight"] = g_loss, weight
        self.guarded_step(loss, opt_ae, list(self.autoencoder.parameters()), sched_ae, name="ae")
        if self.disc_active():
            d_loss = self.adversarial.discriminator(self.discriminator(x.detach()), self.discriminator(recon.detach()))
            self.guarded_step(d_loss, opt_d, list(self.discriminator.parameters()), sched_d, name="disc")
            losses["disc"] = d_loss
        losses.update(loss=loss, perplexity=info["perplexity"], usage=info["usage"])
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, prog_bar=False, on_step=True)
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, logger=False)

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        if "mel" not in batch:
            return
        x, frames = self._to_image(batch["mel"])
        recon, vq_loss, info = self.autoencoder(x)
        losses = self._losses(x, recon, vq_loss)
        mel_hat = image_to_mel(recon, frames)
        losses["psnr"] = spectrogram_psnr(normalize_log_mel(batch["mel"]), normalize_log_mel(mel_hat)).mean().float()
        losses.update(perplexity=info["perplexity"], usage=info["usage"])
        counts = info["counts"].detach()
        self._val_counts = counts if self._val_counts is None else self._val_counts + counts
        b = x.shape[0]
        self.log_dict({f"{stage}/{k}": v for k, v in losses.items()}, sync_dist=True, batch_size=b)
        self.log(f"{stage}/rec_loss", losses["rec"], prog_bar=True, sync_dist=True, batch_size=b)

    def _log_epoch_usage(self, stage: str) -> None:
        """Codebook usage and perplexity over the whole epoch's codes (counts summed over ranks)."""
        if self._val_counts is None:
            return
        counts, self._val_counts = self._val_counts, None
        if self._trainer is not None:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        stats = code_statistics(counts)
        self.log(f"{stage}/codebook_usage", stats["usage"], sync_dist=False)
        self.log(f"{stage}/codebook_perplexity", stats["perplexity"], sync_dist=False)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_usage("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_usage("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Code indices ``(B, frames/f, n_mels/f)`` per clip (the prior's training data)."""
        return {"id": batch["id"], "indices": self.encode(batch["mel"])}

    def configure_optimizers(self) -> Any:
        return autoencoder_gan_optimizers(self, list(self.autoencoder.parameters()))

    def demo_outputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Mels for the demo callback: input and reconstruction."""
        return {"input": batch["mel"], "reconstruction": self.reconstruct(batch["mel"])}
