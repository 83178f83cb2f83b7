"""`VAEModule` (registered ``vae``): trains the mel `AutoencoderKL` with reconstruction, KL and an
optional patch-discriminator loss under manual optimization.

Loss (latent-diffusion convention, sums over elements divided by the batch size)::

    nll  = sum(|x - x_hat| / exp(logvar) + logvar) / B       (logvar: one learnable scalar)
    kl   = mean over the batch of KL(q(z|x) || N(0, I)) averaged over latent elements
    loss = nll + kl_weight * kl + disc_weight * lambda_adapt * (-mean(D(x_hat)))   after disc_start

The KL is averaged over latent elements (AudioLDM's convention, which is why its public VAE
config uses ``kl_weight: 1000``) while the reconstruction term is summed over mel elements.
``lambda_adapt`` balances the gradients of the nll and the adversarial term at the decoder's last
layer. The latent statistic used by diffusion models (``scale_factor = 1 / std(z)``, AudioLDM's
``scale_by_std``) is measured on every validation pass and stored in the checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import nn

from tta.generators.vae.codec import image_to_mel, mel_to_image
from tta.generators.vae.distribution import DiagonalGaussian
from tta.generators.vae.network import AutoencoderKL
from tta.nn.discriminators import NLayerDiscriminator
from tta.nn.gan_losses import hinge_d_loss, hinge_g_loss
from tta.registry import register
from tta.training.base import TTAModule, select_clips
from tta.training.schedule import WarmupCosine, adamw_with_warmup

log = logging.getLogger(__name__)


def autoencoder_gan_optimizers(module: Any, autoencoder_params: list[nn.Parameter], total_steps: int | None = None,
                               final_ratio: float = 0.0) -> Any:
    """``([opt_ae, opt_d], [sched_ae, sched_d])`` (AdamW with warm-up from the module's ``lr``,
    ``betas``, ``weight_decay``, ``warmup_steps``; with ``total_steps`` then a cosine decay to
    ``final_ratio``), or the autoencoder's pair alone when the module has no ``discriminator``
    (the VAE's and the VQGAN's optimisers)."""
    hp = (module.lr, module.betas, module.weight_decay, module.warmup_steps, total_steps, final_ratio)
    opt_ae, sched_ae = adamw_with_warmup(autoencoder_params, *hp)
    if module.discriminator is None:
        return [opt_ae], [sched_ae]
    opt_d, sched_d = adamw_with_warmup(module.discriminator.parameters(), *hp)
    return [opt_ae, opt_d], [sched_ae, sched_d]


def adaptive_gan_weight(
    nll: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    scale: float,
    min_weight: float = 0.0,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """LDM / taming's adaptive adversarial weight (detached)::

        scale * clamp(||d nll / d W|| / (||d g_loss / d W|| + 1e-4), min_weight, max_weight)

    with ``W`` the decoder's last layer weight: balances the two gradients at that layer. With
    ``min_weight == max_weight`` the weight is that constant times ``scale`` (no gradient taken).
    """
    if min_weight > max_weight:
        raise ValueError(f"adaptive_gan_weight: min_weight {min_weight} > max_weight {max_weight}")
    if min_weight == max_weight:
        return torch.full((), float(min_weight * scale), device=g_loss.device)
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4)
    return torch.clamp(w, min_weight, max_weight).detach() * scale


@register("module", "vae")
class VAEModule(TTAModule):
    """Trains a mel VAE. ``autoencoder`` and ``discriminator`` are networks given by config.

    Args:
        autoencoder: the KL autoencoder network.
        discriminator: optional PatchGAN; used from ``disc_start`` training batches on.
        mel: mel preset name or `MelConfig` dict (must match the datamodule's).
        kl_weight, disc_weight, disc_start: loss weights and discriminator start (in batches).
        lr, betas, weight_decay, warmup_steps: AdamW and its warm-up, shared by both optimizers.
        lr_decay: after the warm-up, ``constant`` (AudioLDM) or ``cosine``: down to
            ``final_lr_ratio * lr`` at ``trainer.max_steps`` (optimizer steps), so that a short run
            ends on settled weights (the demo VAE; docs/decisions.md).
    """

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        discriminator: NLayerDiscriminator | None = None,
        mel: str | dict[str, Any] = "audioldm",
        kl_weight: float = 1000.0,
        disc_weight: float = 0.5,
        disc_start: int = 50001,
        lr: float = 8.0e-6,
        betas: tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_decay: Literal["constant", "cosine"] = "constant",
        final_lr_ratio: float = 0.0,
        logvar_init: float = 0.0,
        ema_decay: float | None = None,
        grad_clip: float | None = 1.0,
        nan_max_skips: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__(mel=mel, ema_decay=ema_decay, grad_clip=grad_clip, nan_max_skips=nan_max_skips, seed=seed)
        self.save_hyperparameters(ignore=["autoencoder", "discriminator"])
        self.autoencoder = autoencoder
        self.discriminator = discriminator
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))
        self.kl_weight = kl_weight
        self.disc_weight = disc_weight
        self.disc_start = disc_start
        self.lr, self.betas, self.weight_decay, self.warmup_steps = lr, tuple(betas), weight_decay, warmup_steps
        if lr_decay not in ("constant", "cosine"):
            raise ValueError(f"lr_decay must be 'constant' or 'cosine', got {lr_decay!r}")
        self.lr_decay, self.final_lr_ratio = lr_decay, float(final_lr_ratio)
        self.register_buffer("scale_factor", torch.ones(()))
        self._latent_stats: list[torch.Tensor] = []

    def ema_target(self) -> nn.Module:
        return self.autoencoder

    # ------------------------------------------------------------ layout utils
    def _to_image(self, mel: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(B, n_mels, F) -> (B, 1, F', n_mels) padded to the downsample factor with the log floor."""
        return mel_to_image(mel, self.autoencoder.downsample_factor, self.mel_config.log_floor)

    @staticmethod
    def _to_mel(x: torch.Tensor, frames: int) -> torch.Tensor:
        return image_to_mel(x, frames)

    # ---------------------------------------------------------------- public API
    def encode(self, mel: torch.Tensor) -> DiagonalGaussian:
        """Log-mel ``(B, n_mels, frames)`` -> posterior over latents (unscaled)."""
        x, _ = self._to_image(mel)
        return self.autoencoder.encode(x)

    def decode(self, z: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """Latent -> log-mel ``(B, n_mels, frames)``."""
        x = self.autoencoder.decode(z)
        return self._to_mel(x, frames if frames is not None else x.shape[2])

    @torch.no_grad()
    def reconstruct(self, mel: torch.Tensor) -> torch.Tensor:
        """Encode (posterior mode) and decode a log-mel batch."""
        x, frames = self._to_image(mel)
        return self._to_mel(self.autoencoder(x, sample_posterior=False)[0], frames)

    # ------------------------------------------------------------------ losses
    def _losses(self, x: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussian) -> dict[str, torch.Tensor]:
        b = x.shape[0]
        rec = (x.float() - recon.float()).abs()
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / b
        kl = (posterior.kl().float() / posterior.mean[0].numel()).mean()
        return {"rec": rec.mean(), "nll": nll, "kl": kl}

    def _adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        return adaptive_gan_weight(nll, g_loss, self.autoencoder.last_layer_weight(), self.disc_weight)

    def disc_active(self) -> bool:
        return self.discriminator is not None and self.batches_trained >= self.disc_start

    # ------------------------------------------------------------------- steps
    def train_step(self, batch: dict[str, Any]) -> None:
        (opt_ae, sched_ae), (opt_d, sched_d) = self.optimizer_pairs(2)
        x, _ = self._to_image(batch["mel"])
        posterior = self.autoencoder.encode(x)
        eps = torch.randn(posterior.shape, generator=self.step_generator()).to(posterior.mean)
        recon = self.autoencoder.decode(posterior.mean + posterior.std * eps)
        per_clip = (x.float() - recon.float()).abs().flatten(1).mean(1) + posterior.kl().float()
        finite = self.record_nonfinite(per_clip, list(batch["id"]))  # NaN/Inf clips named (nonfinite.jsonl)
        if bool(finite.any()) and not bool(finite.all()):  # the others train alone (docs/training.md)
            return self.train_step(select_clips(batch, finite.tolist()))
        losses = self._losses(x, recon, posterior)
        loss = losses["nll"] + self.kl_weight * losses["kl"]
        if self.disc_active():
            g_loss = hinge_g_loss(self.discriminator(recon))
            weight = self._adaptive_weight(losses["nll"], g_loss)
            loss = loss + weight * g_loss
            losses["g_adv"] = g_loss
        ae_params = [p for p in self.autoencoder.parameters()] + [self.logvar]
        self.guarded_step(loss, opt_ae, ae_params, sched_ae, name="ae")
        if self.disc_active():
            d_loss = hinge_d_loss(self.discriminator(x.detach()).float(), self.discriminator(recon.detach()).float())
            self.guarded_step(d_loss, opt_d, list(self.discriminator.parameters()), sched_d, name="disc")
            losses["disc"] = d_loss
        losses["loss"] = loss
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, prog_bar=False, on_step=True)
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, logger=False)

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        if "mel" not in batch:
            return
        x, _ = self._to_image(batch["mel"])
        posterior = self.autoencoder.encode(x)
        recon = self.autoencoder.decode(posterior.mode())
        losses = self._losses(x, recon, posterior)
        if stage == "val":
            z = posterior.mode().float()
            self._latent_stats.append(torch.stack([z.mean(), z.pow(2).mean()]))
        self.log_dict({f"{stage}/{k}": v for k, v in losses.items()}, sync_dist=True, batch_size=x.shape[0])
        self.log(f"{stage}/rec_loss", losses["rec"], prog_bar=True, sync_dist=True, batch_size=x.shape[0])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Scaled latents (``z * scale_factor``, what a diffusion model trains on) per clip."""
        return {"id": batch["id"], "latent": self.encode(batch["mel"]).mode() * self.scale_factor}

    def on_validation_epoch_end(self) -> None:
        if not self._latent_stats:
            return
        stats = self.all_gather(torch.stack(self._latent_stats)).reshape(-1, 2).mean(0)
        self._latent_stats.clear()
        std = torch.sqrt(torch.clamp(stats[1] - stats[0] ** 2, min=1e-12))
        if not self.trainer.sanity_checking:
            self.scale_factor.fill_(float(1.0 / std))
        self.log("val/latent_std", std, sync_dist=False)

    def on_train_start(self) -> None:
        """A resumed cosine run keeps its checkpoint's schedule; with another ``max_steps`` (an
        extended run) the decay is re-aimed at the new end, with a warning."""
        if self.lr_decay != "cosine":
            return
        scheds = self.lr_schedulers()
        for sched in scheds if isinstance(scheds, list) else [scheds]:
            for schedule in sched.lr_lambdas:
                if isinstance(schedule, WarmupCosine) and schedule.total_steps != self.trainer.max_steps:
                    log.warning("the checkpoint's cosine learning rate decays over %d steps; trainer.max_steps is %d: "
                                "decaying to the new end from step %d on", schedule.total_steps,
                                self.trainer.max_steps, sched.last_epoch)
                    schedule.total_steps = self.trainer.max_steps

    def configure_optimizers(self) -> Any:
        total = None
        if self.lr_decay == "cosine":
            total = self.trainer.max_steps
            if total is None or total < 1:
                raise ValueError(f"lr_decay: cosine decays over trainer.max_steps, which must be set; got {total}")
            if total <= self.warmup_steps:  # a smoke run (tta demo --steps 2): nothing left to decay over
                log.warning("lr_decay: cosine: max_steps=%d is within the %d warm-up steps; no decay", total,
                            self.warmup_steps)
                total = None
        return autoencoder_gan_optimizers(self, [*self.autoencoder.parameters(), self.logvar], total,
                                          self.final_lr_ratio)

    def demo_outputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Mels for the demo callback: input and reconstruction."""
        return {"input": batch["mel"], "reconstruction": self.reconstruct(batch["mel"])}
