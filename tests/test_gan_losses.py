"""GAN losses of `tta.nn.gan_losses` on hand-made logits (one definition for the VAE and the vocoders)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tta.nn.gan_losses import (
    adversarial_loss,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    lsgan_d_loss,
    lsgan_g_loss,
    vanilla_d_loss,
)


def test_hinge_and_vanilla_on_hand_made_logits() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1.0))
    # perfect discriminator -> zero hinge loss
    assert hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -1.0)).item() == 0.0
    expected = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected.item())
    assert vanilla_d_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2.0))
    assert hinge_g_loss(fake).item() == pytest.approx(1.0 / 3.0)
    # a list of sub-discriminator logits sums the per-tensor terms
    assert hinge_d_loss([real, real], [fake, fake]).item() == pytest.approx(2 * hinge_d_loss(real, fake).item())
    assert hinge_g_loss([fake, -fake]).item() == pytest.approx(0.0)


def test_lsgan_losses_exact_values() -> None:
    real = [torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0]])]
    fake = [torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0]])]
    # D: (0 + (0+4)/2) + (1 + 1) = 4
    assert lsgan_d_loss(real, fake).item() == pytest.approx(4.0)
    # G: ((1 + 1)/2) + 0 = 1
    assert lsgan_g_loss(fake).item() == pytest.approx(1.0)
    fm_real = [[torch.zeros(1, 2, 3), torch.ones(1, 4)], [torch.zeros(2)]]
    fm_fake = [[torch.ones(1, 2, 3), torch.ones(1, 4)], [torch.full((2,), 3.0)]]
    assert feature_matching_loss(fm_real, fm_fake).item() == pytest.approx(1 + 0 + 3)
    assert feature_matching_loss(fm_real, fm_fake, weight=2.0).item() == pytest.approx(2.0 * (1 + 0 + 3))
    with pytest.raises(ValueError, match="1 real and 2 generated"):
        lsgan_d_loss(real[:1], fake)
    with pytest.raises(ValueError, match="no logits"):
        lsgan_g_loss([])
    with pytest.raises(ValueError, match="no feature maps"):
        feature_matching_loss([[]], [[]])


def test_feature_matching_does_not_backprop_into_real_features() -> None:
    real = torch.ones(3, requires_grad=True)
    fake = torch.zeros(3, requires_grad=True)
    feature_matching_loss([[real * 2]], [[fake * 2]]).backward()
    assert real.grad is None and fake.grad is not None


def test_adversarial_loss_by_name() -> None:
    assert adversarial_loss("lsgan").discriminator is lsgan_d_loss
    hinge = adversarial_loss("hinge")
    assert (hinge.discriminator, hinge.generator) == (hinge_d_loss, hinge_g_loss)
    assert adversarial_loss(hinge) is hinge
    with pytest.raises(ValueError, match="unknown adversarial loss 'wgan'; choose one of hinge, lsgan"):
        adversarial_loss("wgan")
