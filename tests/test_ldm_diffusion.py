"""The diffusion process and samplers: exact schedule values, DDIM against a hand-written
reference, DDPM/DPM-Solver determinism, classifier-free guidance algebra."""

from __future__ import annotations

import math

import pytest
import torch

from tta.generators.ldm.diffusion import DiffusionSchedule, guided


def test_schedule_matches_audioldm_and_diffusers() -> None:
    from diffusers import DDPMScheduler

    s = DiffusionSchedule()
    assert s.betas[0].item() == pytest.approx(0.0015, rel=1e-6)
    assert s.betas[-1].item() == pytest.approx(0.0195, rel=1e-6)
    # LDM's "linear" = sqrt-spaced: the midpoint beta is ((sqrt(a) + sqrt(b)) / 2) ** 2, not (a + b) / 2
    mid = s.betas.double()[0] ** 0.5 + (s.betas.double()[-1] ** 0.5 - s.betas.double()[0] ** 0.5) * 500 / 999
    assert s.betas[500].item() == pytest.approx(mid.item() ** 2, rel=1e-5)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear")
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)


def test_bad_schedule_arguments() -> None:
    with pytest.raises(ValueError, match="beta_schedule"):
        DiffusionSchedule(beta_schedule="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta_start < beta_end"):
        DiffusionSchedule(beta_start=0.02, beta_end=0.01)
    with pytest.raises(ValueError, match="objective"):
        DiffusionSchedule(objective="x0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown sampler"):
        DiffusionSchedule().make_scheduler("euler")


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_target_recovers_clean_latent(objective: str) -> None:
    s = DiffusionSchedule(objective=objective)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    xt = s.q_sample(x0, t, noise)
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    out = s.target(x0, t, noise)
    x0_hat = (xt - (1 - a).sqrt() * out) / a.sqrt() if objective == "eps" else a.sqrt() * xt - (1 - a).sqrt() * out
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)


def _reference_ddim(denoise, x: torch.Tensor, ac: torch.Tensor, steps: int) -> torch.Tensor:
    """DDIM (eta 0) written from the paper: 'leading' spacing with offset 1, final alpha = ac[0]."""
    ratio = 1000 // steps
    ts = [t + 1 for t in range(0, 1000, ratio)][::-1]
    for t in ts:
        a_t = ac[t].double()
        a_prev = ac[t - ratio].double() if t - ratio >= 0 else ac[0].double()
        eps = denoise(x, torch.full((x.shape[0],), t)).double()
        x0 = (x.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).float()
    return x


def test_ddim_equals_reference_and_closed_form() -> None:
    s = DiffusionSchedule()
    ac = s.alphas_cumprod
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))

    # eps = 0: DDIM telescopes to x_T * sqrt(ac[0] / ac[first timestep])
    out = s.sample(lambda x, t: torch.zeros_like(x), tuple(noise.shape), steps=10, noise=noise)
    torch.testing.assert_close(out, noise * math.sqrt(ac[0].item() / ac[901].item()), rtol=1e-5, atol=1e-6)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # a t-dependent linear "network"
        return 0.3 * x + 0.001 * t.view(-1, 1, 1, 1).float()

    ours = s.sample(denoise, tuple(noise.shape), steps=20, noise=noise)
    torch.testing.assert_close(ours, _reference_ddim(denoise, noise, ac, 20), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmsolver++"])
def test_samplers_are_deterministic_per_seed(sampler: str) -> None:
    s = DiffusionSchedule()

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x

    def run(seed: int) -> torch.Tensor:
        return s.sample(denoise, (2, 2, 4, 4), steps=8, sampler=sampler, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.isfinite(a).all()


def test_steps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="steps"):
        DiffusionSchedule().sample(lambda x, t: x, (1, 1, 2, 2), steps=0)


def test_guidance_algebra() -> None:
    def model(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return x * cond.view(-1, 1)

    x, t = torch.randn(3, 5), torch.zeros(3, dtype=torch.long)
    cond, uncond = torch.full((3,), 2.0), torch.full((3,), 0.5)
    cat = lambda a, b: torch.cat([a, b])
    torch.testing.assert_close(guided(model, cond, uncond, 1.0, cat)(x, t), model(x, t, cond))
    expected = model(x, t, uncond) + 3.5 * (model(x, t, cond) - model(x, t, uncond))
    torch.testing.assert_close(guided(model, cond, uncond, 3.5, cat)(x, t), expected)


def test_loss_is_mse_to_the_noise_for_an_oracle() -> None:
    s = DiffusionSchedule()
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    t = s.sample_timesteps(3, g2)
    noise = torch.randn(x0.shape, generator=g2)

    def oracle(xt: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:  # inverts q_sample with the true x0
        a = s.alphas_cumprod[tt].view(-1, 1, 1, 1)
        return (xt - a.sqrt() * x0) / (1 - a).sqrt()

    assert s.loss(oracle, x0, generator=g1).item() < 1e-8
    assert s.loss(lambda xt, tt: torch.zeros_like(xt), x0, generator=torch.Generator().manual_seed(5)).item() == \
        pytest.approx(noise.pow(2).mean().item(), rel=1e-5)
    del t


def test_editing_given_latents_starts_part_way_exactly() -> None:
    """SDEdit (AudioLDM's style transfer): noise ``init`` to the timestep ``strength`` of the way up
    and run only the last ``round(steps * strength)`` steps. With eps = 0, DDIM telescopes."""
    s = DiffusionSchedule()
    ac = s.alphas_cumprod
    g = torch.Generator().manual_seed(2)
    init, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    calls: list[int] = []

    def zero_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    out = s.sample(zero_eps, tuple(init.shape), steps=10, noise=noise, init=init, strength=0.3)
    assert calls == [201, 101, 1]  # DDIM timesteps 901, 801, ..., 1: the last 3
    a = ac[201].item()
    expected = (math.sqrt(a) * init + math.sqrt(1 - a) * noise) * math.sqrt(ac[0].item() / a)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for sampler in ("ddpm", "dpmsolver++"):
        calls.clear()
        edited = s.sample(zero_eps, tuple(init.shape), steps=10, sampler=sampler, noise=noise, init=init,
                          strength=0.5, generator=torch.Generator().manual_seed(0))
        assert len(calls) == 5 and torch.isfinite(edited).all()
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        s.sample(zero_eps, tuple(init.shape), steps=10, init=init, strength=0.0)
    with pytest.raises(ValueError, match="pass init"):
        s.sample(zero_eps, tuple(init.shape), steps=10, strength=0.5)
    with pytest.raises(ValueError, match="init latents have shape"):
        s.sample(zero_eps, (1, 3, 4, 4), steps=10, init=init, strength=0.5)
