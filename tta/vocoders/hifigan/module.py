"""`HiFiGANModule` (registered ``hifigan``): GAN training of a HiFi-GAN generator against MPD + MSD
with mel L1 (x45), feature matching (x2) and least-squares adversarial losses, manual
optimization (discriminator step, then generator step, as the paper)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tta.registry import register
from tta.training.base import TTAModule
from tta.training.schedule import adamw_with_warmup
from tta.vocoders.hifigan.discriminators import (
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
)
from tta.vocoders.hifigan.generator import HiFiGANGenerator
from tta.vocoders.hifigan.losses import (
    MEL_L1_WEIGHT,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
)


@register("module", "hifigan")
class HiFiGANModule(TTAModule):
    """Trains a HiFi-GAN vocoder on ``(mel, wav)`` segments of an `AudioDataModule`.

    Args:
        generator: the generator network (its hop must equal the mel hop).
        mpd, msd: the discriminators.
        mel: mel preset name or `MelConfig` dict (the generator's input and the mel loss).
        mel_weight: weight of the mel L1 term (45 in the paper).
        disc_start: training batches before the adversarial terms switch on.
        lr, betas, weight_decay, warmup_steps: AdamW (paper: 2e-4, (0.8, 0.99)).
    """

    def __init__(
        self,
        generator: HiFiGANGenerator,
        mpd: MultiPeriodDiscriminator,
        msd: MultiScaleDiscriminator,
        mel: str | dict[str, Any] = "audioldm",
        mel_weight: float = MEL_L1_WEIGHT,
        disc_start: int = 0,
        lr: float = 2.0e-4,
        betas: tuple[float, float] = (0.8, 0.99),
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        ema_decay: float | None = None,
        grad_clip: float | None = 1000.0,
        nan_max_skips: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__(mel=mel, ema_decay=ema_decay, grad_clip=grad_clip, nan_max_skips=nan_max_skips, seed=seed)
        self.save_hyperparameters(ignore=["generator", "mpd", "msd"])
        if generator.hop_length != self.mel_config.hop_length or generator.n_mels != self.mel_config.n_mels:
            raise ValueError(
                f"HiFiGANModule: generator (hop {generator.hop_length}, {generator.n_mels} mels) does not match "
                f"mel front-end {self.mel_config.name!r} (hop {self.mel_config.hop_length}, {self.mel_config.n_mels} mels)"
            )
        generator.set_mel_config(self.mel_config)
        self.generator = generator
        self.mpd = mpd
        self.msd = msd
        self.mel_weight = mel_weight
        self.disc_start = disc_start
        self.lr, self.betas, self.weight_decay, self.warmup_steps = lr, tuple(betas), weight_decay, warmup_steps

    def ema_target(self) -> nn.Module:
        return self.generator

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.generator(mel)

    def _mel_l1(self, wav: torch.Tensor, wav_hat: torch.Tensor) -> torch.Tensor:
        n = min(wav.shape[-1], wav_hat.shape[-1])
        return F.l1_loss(self.frontend(wav_hat[..., :n]), self.frontend(wav[..., :n]))

    def train_step(self, batch: dict[str, Any]) -> None:
        (opt_g, sched_g), (opt_d, sched_d) = self.optimizer_pairs(2)
        mel, wav = batch["mel"], batch["wav"]
        wav_hat = self.generator(mel)
        adversarial = self.batches_trained >= self.disc_start
        logs: dict[str, torch.Tensor] = {}
        if adversarial:
            d_loss = sum(
                discriminator_loss(d(wav)[0], d(wav_hat.detach())[0]) for d in (self.mpd, self.msd)
            )
            d_params = list(self.mpd.parameters()) + list(self.msd.parameters())
            self.guarded_step(d_loss, opt_d, d_params, sched_d, name="disc")
            logs["disc"] = d_loss
        mel_loss = self._mel_l1(wav, wav_hat)
        g_loss = self.mel_weight * mel_loss
        if adversarial:
            for d in (self.mpd, self.msd):
                real_logits, real_fmaps = d(wav)
                fake_logits, fake_fmaps = d(wav_hat)
                g_loss = g_loss + generator_adversarial_loss(fake_logits) + feature_matching_loss(real_fmaps, fake_fmaps)
        self.guarded_step(g_loss, opt_g, list(self.generator.parameters()), sched_g, name="gen")
        logs.update({"mel_l1": mel_loss, "gen": g_loss})
        self.log_dict({f"train/{k}": v.detach() for k, v in logs.items()}, on_step=True)
        self.log("loss", g_loss.detach(), prog_bar=True, on_step=True, logger=False)

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        if "mel" not in batch:
            return
        wav_hat = self.generator(batch["mel"])
        self.log(f"{stage}/mel_l1", self._mel_l1(batch["wav"], wav_hat), prog_bar=True, sync_dist=True,
                 batch_size=batch["mel"].shape[0])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Vocoded waveforms of the batch's mels."""
        return {"id": batch["id"], "wav": self.generator(batch["mel"])}

    def configure_optimizers(self) -> Any:
        opt_g, sched_g = adamw_with_warmup(self.generator.parameters(), self.lr, self.betas, self.weight_decay,
                                           self.warmup_steps)
        opt_d, sched_d = adamw_with_warmup(list(self.mpd.parameters()) + list(self.msd.parameters()), self.lr,
                                           self.betas, self.weight_decay, self.warmup_steps)
        return [opt_g, opt_d], [sched_g, sched_d]

    def demo_outputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Waveforms and mels for the demo callback: reference and vocoded."""
        wav_hat = self.generator(batch["mel"])
        return {"reference": batch["wav"], "vocoded": wav_hat, "input": batch["mel"],
                "vocoded_mel": self.frontend(wav_hat)}
