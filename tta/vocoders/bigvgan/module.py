"""`BigVGANModule` (registered ``bigvgan``): `GANVocoderModule` with BigVGAN's discriminators
``{"mpd": MultiPeriodDiscriminator, "mrd": MultiResolutionDiscriminator}`` and its v1 recipe.

Defaults from NVIDIA/BigVGAN v2.4 (``train.py``, ``loss.py``, ``configs/bigvgan_*.json``) and the
paper (Lee et al., 2023, Sec. 4): least-squares adversarial losses, feature matching x2
(``loss.feature_loss`` returns ``2 * sum``), single-resolution mel L1 x45 (``lambda_melloss``
defaults to 45 in ``train.py``), AdamW ``lr = 1e-4``, ``betas = (0.8, 0.99)`` (``learning_rate``,
``adam_b1``, ``adam_b2`` of every config), torch's default AdamW weight decay 0.01, gradient
clipping at 1000 (``clip_grad_norm`` default).

Not reproduced (docs/bigvgan.md): v2's multi-scale mel loss (x15) and CQT discriminator
(``use_multiscale_melloss``, ``use_cqtd_instead_of_mrd``), and the exponential learning-rate
decay (``lr_decay`` 0.9999996 per step in v2, a factor 0.67 after a million steps).
"""

from __future__ import annotations

from typing import Any

from tta.registry import register
from tta.vocoders.bigvgan.discriminators import MultiResolutionDiscriminator
from tta.vocoders.bigvgan.generator import BigVGANGenerator
from tta.vocoders.gan import FEATURE_MATCHING_WEIGHT, MEL_L1_WEIGHT, GANVocoderModule
from tta.vocoders.hifigan.discriminators import MultiPeriodDiscriminator

BIGVGAN_LR = 1.0e-4
BIGVGAN_BETAS = (0.8, 0.99)


@register("module", "bigvgan")
class BigVGANModule(GANVocoderModule):
    """Trains a BigVGAN generator on ``(mel, wav)`` segments of an `AudioDataModule`.

    State-dict keys: ``generator.*``, ``mpd.*``, ``mrd.*``.

    Args:
        generator: the BigVGAN generator (its hop and mel count must match ``mel``).
        mpd: HiFi-GAN's multi-period discriminator (``hifigan_mpd``; BigVGAN's ``mpd_reshapes``
            are its default periods 2, 3, 5, 7, 11).
        mrd: the multi-resolution discriminator (``bigvgan_mrd``).
        mel, mel_weight, fm_weight, disc_start, lr, betas, ...: as `GANVocoderModule`, with
            BigVGAN's defaults.
    """

    def __init__(
        self,
        generator: BigVGANGenerator,
        mpd: MultiPeriodDiscriminator,
        mrd: MultiResolutionDiscriminator,
        mel: str | dict[str, Any] = "audioldm",
        mel_weight: float = MEL_L1_WEIGHT,
        fm_weight: float = FEATURE_MATCHING_WEIGHT,
        disc_start: int = 0,
        lr: float = BIGVGAN_LR,
        betas: tuple[float, float] = BIGVGAN_BETAS,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        ema_decay: float | None = None,
        grad_clip: float | None = 1000.0,
        nan_max_skips: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__(generator, {"mpd": mpd, "mrd": mrd}, adversarial="lsgan", mel=mel, mel_weight=mel_weight,
                         fm_weight=fm_weight, disc_start=disc_start, lr=lr, betas=betas,
                         weight_decay=weight_decay, warmup_steps=warmup_steps, ema_decay=ema_decay,
                         grad_clip=grad_clip, nan_max_skips=nan_max_skips, seed=seed)
