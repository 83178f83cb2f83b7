"""`MelGANModule` (registered ``melgan``): `GANVocoderModule` with MelGAN's multi-scale
discriminator ``{"msd": MelGANMultiScaleDiscriminator}``, hinge adversarial losses and feature
matching (``lambda_feat = 10``) weighted as the official code: each (scale, layer) L1 term times
``4 / (n_layers + 1) / num_scales``. The paper has no mel loss (``mel_weight = 0``; the mel L1 is
still logged, as upstream); a positive ``mel_weight`` adds HiFi-GAN's mel L1 term. Adam, lr 1e-4,
betas (0.5, 0.9), no weight decay (AdamW with ``weight_decay = 0`` is Adam), no gradient clipping.
"""

from __future__ import annotations

from typing import Any

from tta.registry import register
from tta.vocoders.gan import GANVocoderModule
from tta.vocoders.melgan.discriminators import MelGANMultiScaleDiscriminator
from tta.vocoders.melgan.generator import MelGANGenerator

LAMBDA_FEAT = 10.0  # MelGAN's feature-matching weight (upstream scripts/train.py --lambda_feat)


@register("module", "melgan")
class MelGANModule(GANVocoderModule):
    """Trains a MelGAN vocoder on ``(mel, wav)`` segments of an `AudioDataModule`.

    Args:
        generator: the generator (its hop must equal the mel hop).
        msd: the multi-scale discriminator; its ``feature_matching_scale`` weights each layer.
        mel: mel preset name or `MelConfig` dict.
        mel_weight: weight of an optional mel L1 term (0: the paper).
        fm_weight: ``lambda_feat`` (10 in the paper); the attribute ``fm_weight`` holds it times
            ``msd.feature_matching_scale`` (upstream's per-layer and per-scale weights, one constant).
        disc_start, lr, betas, weight_decay, warmup_steps, ...: as `GANVocoderModule`.
    """

    def __init__(
        self,
        generator: MelGANGenerator,
        msd: MelGANMultiScaleDiscriminator,
        mel: str | dict[str, Any] = "demo",
        mel_weight: float = 0.0,
        fm_weight: float = LAMBDA_FEAT,
        disc_start: int = 0,
        lr: float = 1.0e-4,
        betas: tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        ema_decay: float | None = None,
        grad_clip: float | None = None,
        nan_max_skips: int = 10,
        seed: int = 0,
    ) -> None:
        if not isinstance(msd, MelGANMultiScaleDiscriminator):
            raise TypeError(f"MelGANModule: msd must be a MelGANMultiScaleDiscriminator, got {type(msd).__name__}")
        super().__init__(generator, {"msd": msd}, adversarial="hinge", mel=mel, mel_weight=mel_weight,
                         fm_weight=fm_weight * msd.feature_matching_scale, disc_start=disc_start, lr=lr, betas=betas,
                         weight_decay=weight_decay, warmup_steps=warmup_steps, ema_decay=ema_decay,
                         grad_clip=grad_clip, nan_max_skips=nan_max_skips, seed=seed)
