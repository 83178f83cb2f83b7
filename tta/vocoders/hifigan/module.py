"""`HiFiGANModule` (registered ``hifigan``): `GANVocoderModule` with HiFi-GAN's discriminators
``{"mpd": MultiPeriodDiscriminator, "msd": MultiScaleDiscriminator}``, least-squares adversarial
losses, feature matching (x2) and mel L1 (x45), as the paper.

Its constructor and state-dict keys (``generator.*``, ``mpd.*``, ``msd.*``) are those of the
HiFi-GAN module before `GANVocoderModule` existed, so its configs and checkpoints are unchanged.
"""

from __future__ import annotations

from typing import Any

from tta.registry import register
from tta.vocoders.gan import FEATURE_MATCHING_WEIGHT, MEL_L1_WEIGHT, GANVocoderModule
from tta.vocoders.hifigan.discriminators import (
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
)
from tta.vocoders.hifigan.generator import HiFiGANGenerator


@register("module", "hifigan")
class HiFiGANModule(GANVocoderModule):
    """Trains a HiFi-GAN vocoder on ``(mel, wav)`` segments of an `AudioDataModule`.

    Args:
        generator: the generator network (its hop must equal the mel hop).
        mpd, msd: the discriminators.
        mel, mel_weight, disc_start, lr, betas, ...: as `GANVocoderModule`.
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
        super().__init__(generator, {"mpd": mpd, "msd": msd}, adversarial="lsgan", mel=mel, mel_weight=mel_weight,
                         fm_weight=FEATURE_MATCHING_WEIGHT, disc_start=disc_start, lr=lr, betas=betas,
                         weight_decay=weight_decay, warmup_steps=warmup_steps, ema_decay=ema_decay,
                         grad_clip=grad_clip, nan_max_skips=nan_max_skips, seed=seed)
