"""GAN losses, one definition each: LSGAN, hinge, vanilla (non-saturating BCE), feature matching.

Every adversarial loss takes the logits of one discriminator either as a single tensor (the
VAE's PatchGAN) or as a list with one tensor per sub-discriminator (HiFi-GAN's MPD / MSD) and
sums its per-tensor terms. The real logits / feature maps of the discriminator losses come from
real data; pass logits of the *detached* generated data to a discriminator loss.

`adversarial_loss(name)` gives the (discriminator, generator) pair a training module selects by
name (``lsgan`` for HiFi-GAN, ``hinge`` for MelGAN / the LDM autoencoders).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "ADVERSARIAL_LOSSES",
    "AdversarialLoss",
    "adversarial_loss",
    "feature_matching_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "lsgan_d_loss",
    "lsgan_g_loss",
    "vanilla_d_loss",
]

Logits = torch.Tensor | Sequence[torch.Tensor]


def _as_list(logits: Logits, what: str) -> list[torch.Tensor]:
    out = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    if not out:
        raise ValueError(f"{what}: no logits given")
    return out


def _pairs(real: Logits, fake: Logits, what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    real_l, fake_l = _as_list(real, what), _as_list(fake, what)
    if len(real_l) != len(fake_l):
        raise ValueError(f"{what}: got {len(real_l)} real and {len(fake_l)} generated entries")
    return [(r.float(), f.float()) for r, f in zip(real_l, fake_l)]


def lsgan_d_loss(real_logits: Logits, fake_logits: Logits) -> torch.Tensor:
    """Least-squares discriminator loss ``sum_d mean((1 - D(real))^2) + mean(D(fake)^2)``."""
    terms = [torch.mean((1.0 - r) ** 2) + torch.mean(f**2) for r, f in _pairs(real_logits, fake_logits, "lsgan_d_loss")]
    return torch.stack(terms).sum()


def lsgan_g_loss(fake_logits: Logits) -> torch.Tensor:
    """Least-squares generator loss ``sum_d mean((1 - D(fake))^2)``."""
    return torch.stack([torch.mean((1.0 - f.float()) ** 2) for f in _as_list(fake_logits, "lsgan_g_loss")]).sum()


def hinge_d_loss(real_logits: Logits, fake_logits: Logits) -> torch.Tensor:
    """Hinge discriminator loss ``sum_d 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``."""
    terms = [0.5 * (F.relu(1.0 - r).mean() + F.relu(1.0 + f).mean())
             for r, f in _pairs(real_logits, fake_logits, "hinge_d_loss")]
    return torch.stack(terms).sum()


def vanilla_d_loss(real_logits: Logits, fake_logits: Logits) -> torch.Tensor:
    """Non-saturating BCE discriminator loss ``sum_d 0.5 * (mean(softplus(-real)) + mean(softplus(fake)))``."""
    terms = [0.5 * (F.softplus(-r).mean() + F.softplus(f).mean())
             for r, f in _pairs(real_logits, fake_logits, "vanilla_d_loss")]
    return torch.stack(terms).sum()


def hinge_g_loss(fake_logits: Logits) -> torch.Tensor:
    """Generator loss ``sum_d -mean(D(fake))`` (used with the hinge and, in LDM, the vanilla loss)."""
    return torch.stack([-f.float().mean() for f in _as_list(fake_logits, "hinge_g_loss")]).sum()


def feature_matching_loss(
    real_fmaps: Sequence[Sequence[torch.Tensor]],
    fake_fmaps: Sequence[Sequence[torch.Tensor]],
    weight: float = 1.0,
) -> torch.Tensor:
    """``weight * sum_d sum_l mean|real_l - fake_l|`` over every sub-discriminator and layer.

    The real feature maps are detached: only the generator gets gradients from this term.
    """
    if len(real_fmaps) != len(fake_fmaps):
        raise ValueError(f"feature_matching_loss: got {len(real_fmaps)} real and {len(fake_fmaps)} generated entries")
    terms = []
    for real_d, fake_d in zip(real_fmaps, fake_fmaps):
        if len(real_d) != len(fake_d):
            raise ValueError(f"feature_matching_loss (layers): got {len(real_d)} real and {len(fake_d)} generated")
        for r, f in zip(real_d, fake_d):
            terms.append(torch.mean(torch.abs(r.detach().float() - f.float())))
    if not terms:
        raise ValueError("feature_matching_loss: no feature maps given")
    return weight * torch.stack(terms).sum()


@dataclass(frozen=True)
class AdversarialLoss:
    """A named pair: ``discriminator(real_logits, fake_logits)`` and ``generator(fake_logits)``."""

    name: str
    discriminator: Callable[[Logits, Logits], torch.Tensor]
    generator: Callable[[Logits], torch.Tensor]


ADVERSARIAL_LOSSES: dict[str, AdversarialLoss] = {
    "lsgan": AdversarialLoss("lsgan", lsgan_d_loss, lsgan_g_loss),
    "hinge": AdversarialLoss("hinge", hinge_d_loss, hinge_g_loss),
}


def adversarial_loss(name: str | AdversarialLoss) -> AdversarialLoss:
    """The `AdversarialLoss` called ``name`` (an `AdversarialLoss` is returned unchanged)."""
    if isinstance(name, AdversarialLoss):
        return name
    try:
        return ADVERSARIAL_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown adversarial loss {name!r}; choose one of {', '.join(sorted(ADVERSARIAL_LOSSES))}"
        ) from None
