"""HiFi-GAN losses (least-squares GAN + feature matching).

The generator objective of the paper is::

    L_G = generator_adversarial_loss(mpd) + generator_adversarial_loss(msd)
          + feature_matching_loss(mpd) + feature_matching_loss(msd)      # weight 2 included
          + MEL_L1_WEIGHT * L1(log-mel(real), log-mel(generated))

and the discriminator objective ``discriminator_loss(mpd) + discriminator_loss(msd)``. The mel
L1 term is the LightningModule's job (it owns the `MelFrontend`); its weight is exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MEL_L1_WEIGHT = 45.0
FEATURE_MATCHING_WEIGHT = 2.0
ADVERSARIAL_WEIGHT = 1.0


def _check_same_length(a: Sequence, b: Sequence, what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{what}: got {len(a)} real and {len(b)} generated entries")


def feature_matching_loss(
    real_fmaps: Sequence[Sequence[torch.Tensor]],
    fake_fmaps: Sequence[Sequence[torch.Tensor]],
    weight: float = FEATURE_MATCHING_WEIGHT,
) -> torch.Tensor:
    """``weight * sum_d sum_l mean|real_l - fake_l|`` over every sub-discriminator and layer.

    The real feature maps are detached: only the generator gets gradients from this term.
    """
    _check_same_length(real_fmaps, fake_fmaps, "feature_matching_loss")
    terms = []
    for real_d, fake_d in zip(real_fmaps, fake_fmaps):
        _check_same_length(real_d, fake_d, "feature_matching_loss (layers)")
        for r, f in zip(real_d, fake_d):
            terms.append(torch.mean(torch.abs(r.detach().float() - f.float())))
    if not terms:
        raise ValueError("feature_matching_loss: no feature maps given")
    return weight * torch.stack(terms).sum()


def discriminator_loss(real_logits: Sequence[torch.Tensor], fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """LSGAN discriminator loss ``sum_d mean((1 - D(real))^2) + mean(D(fake)^2)``.

    Pass logits computed on the *detached* generated waveform.
    """
    _check_same_length(real_logits, fake_logits, "discriminator_loss")
    if not real_logits:
        raise ValueError("discriminator_loss: no logits given")
    terms = [torch.mean((1.0 - r.float()) ** 2) + torch.mean(f.float() ** 2) for r, f in zip(real_logits, fake_logits)]
    return torch.stack(terms).sum()


def generator_adversarial_loss(fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """LSGAN generator loss ``sum_d mean((1 - D(fake))^2)``."""
    if not fake_logits:
        raise ValueError("generator_adversarial_loss: no logits given")
    return torch.stack([torch.mean((1.0 - f.float()) ** 2) for f in fake_logits]).sum()
