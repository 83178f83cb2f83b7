"""`GANVocoderModule` (registered ``gan_vocoder``): adversarial training of any `Vocoder` generator
against a named set of waveform discriminators.

Every discriminator maps a waveform ``(B, T)`` to ``(logits, feature_maps)``: a list of logit
tensors (one per sub-discriminator) and a list of lists of intermediate activations (HiFi-GAN's
MPD / MSD, `tta.nn.discriminators.STFTPatchDiscriminator`; registry kind ``discriminator``). The
generator objective is ``mel_weight * L1(log-mel) + sum_d [adversarial_G(d) + fm_weight * FM(d)]``
and the discriminator objective ``sum_d adversarial_D(d)``, with the losses of
`tta.nn.gan_losses`. Optimisation is manual: a discriminator step, then a generator step (as
HiFi-GAN). Each discriminator is a submodule named by its key, so its state-dict entries are
``<name>.*`` (HiFi-GAN's ``mpd.*`` / ``msd.*``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tta.nn.gan_losses import adversarial_loss, feature_matching_loss
from tta.registry import register
from tta.training.base import TTAModule
from tta.training.schedule import adamw_with_warmup
from tta.vocoders.base import Vocoder

MEL_L1_WEIGHT = 45.0  # HiFi-GAN's weight of the mel L1 term
FEATURE_MATCHING_WEIGHT = 2.0  # HiFi-GAN's weight of the feature-matching term


def check_discriminators(owner: nn.Module, discriminators: Mapping[str, nn.Module]) -> list[str]:
    """The names of ``discriminators``; a ValueError/TypeError unless it is a non-empty mapping of
    identifier names (free as attributes of ``owner``) to `nn.Module`s with parameters."""
    who = type(owner).__name__
    if not isinstance(discriminators, Mapping):
        raise TypeError(f"{who}: discriminators must be a dict of name -> discriminator, "
                        f"got a {type(discriminators).__name__}")
    if not discriminators:
        raise ValueError(f"{who}: discriminators is empty; give at least one, e.g. {{'msd': MultiScaleDiscriminator()}}")
    taken = set(dir(owner))
    for name, disc in discriminators.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{who}: discriminator name {name!r} must be a Python identifier (it names a submodule)")
        if name in taken:
            raise ValueError(f"{who}: discriminator name {name!r} clashes with an attribute of {who}; rename it")
        if not isinstance(disc, nn.Module):
            raise TypeError(f"{who}: discriminator {name!r} is a {type(disc).__name__}, not an nn.Module "
                            "mapping a waveform to (logits, feature maps)")
        if not any(True for _ in disc.parameters()):
            raise ValueError(f"{who}: discriminator {name!r} ({type(disc).__name__}) has no parameters to train")
    return list(discriminators)


@register("module", "gan_vocoder")
class GANVocoderModule(TTAModule):
    """Trains a vocoder generator on ``(mel, wav)`` segments of an `AudioDataModule`.

    Args:
        generator: the generator, a `Vocoder` (its hop and mel count must match ``mel``).
        discriminators: ``{name: discriminator}``; losses are summed over all and logged per name.
        adversarial: adversarial loss pair of `tta.nn.gan_losses` (``"lsgan"`` or ``"hinge"``).
        mel: mel preset name or `MelConfig` dict (the generator's input and the mel loss).
        mel_weight: weight of the mel L1 term (45 in HiFi-GAN).
        fm_weight: weight of the feature-matching term (2 in HiFi-GAN).
        disc_start: training batches before the adversarial terms switch on.
        lr, betas, weight_decay, warmup_steps: AdamW of both optimizers (HiFi-GAN: 2e-4, (0.8, 0.99)).
    """

    discriminator_names: tuple[str, ...] = ()

    def __init__(
        self,
        generator: Vocoder,
        discriminators: dict[str, nn.Module],
        adversarial: str = "lsgan",
        mel: str | dict[str, Any] = "audioldm",
        mel_weight: float = MEL_L1_WEIGHT,
        fm_weight: float = FEATURE_MATCHING_WEIGHT,
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
        self.adversarial = adversarial_loss(adversarial)
        if generator.hop_length != self.mel_config.hop_length or generator.n_mels != self.mel_config.n_mels:
            raise ValueError(
                f"{type(self).__name__}: generator (hop {generator.hop_length}, {generator.n_mels} mels) does not "
                f"match mel front-end {self.mel_config.name!r} (hop {self.mel_config.hop_length}, "
                f"{self.mel_config.n_mels} mels)"
            )
        generator.set_mel_config(self.mel_config)
        self.generator = generator
        self.mel_weight = mel_weight
        self.fm_weight = fm_weight
        self.disc_start = disc_start
        self.lr, self.betas, self.weight_decay, self.warmup_steps = lr, tuple(betas), weight_decay, warmup_steps
        self.discriminator_names = tuple(check_discriminators(self, discriminators))
        for name in self.discriminator_names:
            self.add_module(name, discriminators[name])
        self.save_hyperparameters(ignore=["generator", "discriminators", *self.discriminator_names])

    @property
    def discriminators(self) -> dict[str, nn.Module]:
        """``{name: discriminator}`` in configuration order."""
        return {name: getattr(self, name) for name in self.discriminator_names}

    def _discriminator_parameters(self) -> list[nn.Parameter]:
        return [p for d in self.discriminators.values() for p in d.parameters()]

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
            fake = wav_hat.detach()
            per_disc = {name: self.adversarial.discriminator(d(wav)[0], d(fake)[0])
                        for name, d in self.discriminators.items()}
            d_loss = sum(per_disc.values())
            self.guarded_step(d_loss, opt_d, self._discriminator_parameters(), sched_d, name="disc")
            logs["disc"] = d_loss
            logs.update({f"disc_{name}": v for name, v in per_disc.items()})
        mel_loss = self._mel_l1(wav, wav_hat)
        g_loss = self.mel_weight * mel_loss
        if adversarial:
            for name, d in self.discriminators.items():
                with torch.no_grad():
                    real_fmaps = d(wav)[1]
                fake_logits, fake_fmaps = d(wav_hat)
                adv = self.adversarial.generator(fake_logits)
                fm = feature_matching_loss(real_fmaps, fake_fmaps, self.fm_weight)
                g_loss = g_loss + adv + fm
                logs[f"adv_{name}"], logs[f"fm_{name}"] = adv, fm
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
        opt_d, sched_d = adamw_with_warmup(self._discriminator_parameters(), self.lr, self.betas, self.weight_decay,
                                           self.warmup_steps)
        return [opt_g, opt_d], [sched_g, sched_d]

    def demo_outputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Waveforms and mels for the demo callback: reference and vocoded."""
        wav_hat = self.generator(batch["mel"])
        return {"reference": batch["wav"], "vocoded": wav_hat, "input": batch["mel"],
                "vocoded_mel": self.frontend(wav_hat)}
