"""Noise processes behind one interface: rectified flow against closed forms (single-point and
Gaussian data), solver convergence orders, its training target and times, SDEdit editing;
DDPMProcess as the former DiffusionSchedule; config round trips and registry names."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tta import registry
from tta.generators.ldm.diffusion import DiffusionSchedule
from tta.generators.noise import DDPMProcess, NoiseProcess, RectifiedFlow, guided

S = 1e-5  # the default sigma_min


def _path_time(t_model: torch.Tensor) -> torch.Tensor:
    """Path time l from the model timestep t_model = (1 - l) * 1000."""
    return 1.0 - t_model.double() / 1000.0


def _point_field(x1: torch.Tensor, s: float):
    """Exact velocity field of the flow when the data is the single point x1:
    v(z, l) = (x1 - (1 - s) z) / (1 - (1 - s) l). Its trajectories are the conditional paths
    z_l = (1 - (1 - s) l) z0 + l x1, so from noise z0 every ODE solution ends at x1 + s z0."""
    def v(z: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        l = _path_time(t_model).view(-1, *([1] * (z.ndim - 1)))
        return ((x1.double() - (1 - s) * z.double()) / (1 - (1 - s) * l)).float()
    return v


def _gauss_field(mu: float, sig: float, s: float):
    """Exact marginal velocity for data x1 ~ N(mu, sig^2 I): with z = a z0 + l x1,
    a = 1 - (1 - s) l, z ~ N(l mu, V), V = a^2 + l^2 sig^2, Gaussian conditioning gives
    E[x1|z] = mu + l sig^2 (z - l mu) / V and E[z0|z] = a (z - l mu) / V, so
    v = E[x1|z] - (1 - s) E[z0|z] = mu + (l sig^2 - (1 - s) a) (z - l mu) / V."""
    def v_at(z: torch.Tensor, l: torch.Tensor | float) -> torch.Tensor:
        a = 1 - (1 - s) * l
        var = a * a + l * l * sig * sig
        return mu + (l * sig * sig - (1 - s) * a) * (z - l * mu) / var

    def denoiser(z: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        l = _path_time(t_model).view(-1, *([1] * (z.ndim - 1)))
        return v_at(z.double(), l).float()
    return v_at, denoiser


def test_single_point_field_is_reached_exactly() -> None:
    x1 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    z0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    # one Euler step from l = 0: z0 + v(z0, 0) = z0 + x1 - (1 - s) z0 = x1 + s z0 (exact: the
    # trajectory is a straight line, so Euler is exact for any step count)
    out = RectifiedFlow().sample(_point_field(x1, S), tuple(x1.shape), steps=1, noise=z0)
    torch.testing.assert_close(out, x1 + S * z0, rtol=0, atol=1e-6)
    assert out.dtype == torch.float32
    out = RectifiedFlow().sample(_point_field(x1, S), tuple(x1.shape), steps=7, noise=z0)
    torch.testing.assert_close(out, x1 + S * z0, rtol=0, atol=1e-5)
    # Heun evaluates the field at l = 1 where its denominator is s: use a larger s for float32
    s = 0.1
    out = RectifiedFlow(sigma_min=s).sample(_point_field(x1, s), tuple(x1.shape), steps=3, sampler="heun", noise=z0)
    torch.testing.assert_close(out, x1 + s * z0, rtol=0, atol=1e-5)


def test_gaussian_data_convergence_orders() -> None:
    # sig = 1 makes the marginal paths almost straight (Heun superconverges); sig = 3 is generic
    mu, sig = 0.5, 3.0
    v_at, denoiser = _gauss_field(mu, sig, S)
    z0 = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    # reference: RK4 with 4096 steps in float64 ...
    z, n = z0.double(), 4096
    for i in range(n):
        l, h = i / n, 1 / n
        k1 = v_at(z, l)
        k2 = v_at(z + h / 2 * k1, l + h / 2)
        k3 = v_at(z + h / 2 * k2, l + h / 2)
        k4 = v_at(z + h * k3, l + h)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    # ... agrees with the closed form: the flow maps z0 to l mu + sqrt(V(l)) z0, V(1) = s^2 + sig^2
    torch.testing.assert_close(z, mu + math.sqrt(S**2 + sig**2) * z0.double(), rtol=0, atol=1e-9)
    flow = RectifiedFlow()

    def err(sampler: str, steps: int) -> float:
        out = flow.sample(denoiser, tuple(z0.shape), steps=steps, sampler=sampler, noise=z0)
        return (out.double() - z).abs().max().item()

    for n in (8, 16):  # measured: Heun 4.42, 4.25; Euler 1.91, 1.95
        heun = err("heun", n) / err("heun", 2 * n)
        euler = err("euler", n) / err("euler", 2 * n)
        assert 3.0 < heun < 5.0, (n, heun)
        assert 1.6 < euler < 2.4, (n, euler)


def test_loss_target_and_model_times() -> None:
    flow = RectifiedFlow()
    x1 = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(7)  # replicate the draws of `loss`: times, then noise
    l, z0 = flow.sample_times(5, g), torch.randn(x1.shape, generator=g)
    seen: dict[str, torch.Tensor] = {}

    def oracle(zt: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        seen["zt"], seen["t"] = zt, t_model
        return x1 - (1 - S) * z0

    assert flow.loss(oracle, x1, generator=torch.Generator().manual_seed(7)).item() == 0.0
    lv = l.view(-1, 1, 1)
    torch.testing.assert_close(seen["zt"], (1 - (1 - S) * lv) * z0 + lv * x1)
    assert seen["t"].dtype == torch.float32 and seen["t"].shape == (5,)
    assert ((seen["t"] >= 0) & (seen["t"] <= 1000)).all()
    torch.testing.assert_close(seen["t"], (1 - l) * 1000)
    # a zero velocity costs E|x1 - (1 - s) z0|^2 (exactly, for these draws)
    zero = flow.loss(lambda z, t: torch.zeros_like(z), x1, generator=torch.Generator().manual_seed(7))
    assert zero.item() == pytest.approx((x1 - (1 - S) * z0).pow(2).mean().item(), rel=1e-6)
    # a fixed scalar time applies to the whole batch
    flow.loss(oracle, x1, t=flow.fixed_times([0.25])[0])
    torch.testing.assert_close(seen["t"], torch.full((5,), 250.0))


def test_logit_normal_times_concentrate_in_the_middle() -> None:
    n = 20000
    uni = RectifiedFlow().sample_times(n, torch.Generator().manual_seed(0))
    lgn = RectifiedFlow(time_sampling="logit_normal").sample_times(n, torch.Generator().manual_seed(0))
    assert ((lgn > 0) & (lgn < 1)).all() and ((uni >= 0) & (uni < 1)).all()
    assert abs(lgn.mean().item() - 0.5) < 0.01
    assert lgn.std().item() < 0.8 * uni.std().item()  # ~0.21 against 1/sqrt(12) ~ 0.29
    assert ((lgn - 0.5).abs() < 0.25).float().mean() > 0.6 > ((uni - 0.5).abs() < 0.25).float().mean()


def test_guidance_algebra() -> None:
    def model(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return x * cond.view(-1, 1) + t.view(-1, 1)

    x, t = torch.randn(3, 5), torch.full((3,), 420.0)
    cond, uncond = torch.full((3,), 2.0), torch.full((3,), 0.5)
    cat = lambda a, b: torch.cat([a, b])
    assert torch.equal(guided(model, cond, uncond, 1.0, cat)(x, t), model(x, t, cond))
    c, u = model(x, t, cond), model(x, t, uncond)
    torch.testing.assert_close(guided(model, cond, uncond, 3.5, cat)(x, t), u + 3.5 * (c - u))


@pytest.mark.parametrize("sampler,per_step", [("euler", 1), ("heun", 2)])
def test_strength_editing(sampler: str, per_step: int) -> None:
    s = 0.1 if sampler == "heun" else S
    g = torch.Generator().manual_seed(4)
    x1, noise = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    field, calls = _point_field(x1, s), []

    def counted(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t[0].item())
        return field(z, t)

    # starting from init = x1 at l0 = 0.5 puts z on the conditional path of `noise`: ends at x1 + s noise
    out = RectifiedFlow(sigma_min=s).sample(counted, tuple(x1.shape), steps=10, sampler=sampler, noise=noise,
                                            init=x1, strength=0.5)
    torch.testing.assert_close(out, x1 + s * noise, rtol=0, atol=1e-5)
    assert len(calls) == 5 * per_step and calls[0] == pytest.approx(500.0)
    calls.clear()
    RectifiedFlow().sample(counted, tuple(x1.shape), steps=10, sampler=sampler, init=x1, strength=0.33)
    assert len(calls) == round(10 * 0.33) * per_step
    calls.clear()
    RectifiedFlow().sample(counted, tuple(x1.shape), steps=10, sampler=sampler, init=x1, strength=0.01)
    assert len(calls) == per_step  # at least one interval


def test_flow_argument_errors() -> None:
    flow, shape = RectifiedFlow(), (1, 2, 2)
    zero = lambda z, t: torch.zeros_like(z)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        flow.sample(zero, shape, steps=0)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        flow.sample(zero, shape, init=torch.zeros(shape), strength=1.5)
    with pytest.raises(ValueError, match="pass init"):
        flow.sample(zero, shape, strength=0.5)
    with pytest.raises(ValueError, match=r"init latents have shape \(2, 2, 2\), expected \(1, 2, 2\)"):
        flow.sample(zero, shape, init=torch.zeros(2, 2, 2), strength=0.5)
    with pytest.raises(ValueError, match="unknown sampler 'ddim'; choose one of euler, heun"):
        flow.sample(zero, shape, sampler="ddim")
    with pytest.raises(ValueError, match="time_sampling"):
        RectifiedFlow(time_sampling="cosmic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="noise fractions"):
        flow.fixed_times([1.5])


def test_flow_defaults_and_determinism() -> None:
    flow, calls = RectifiedFlow(default_steps=6), []
    assert flow.samplers == ("euler", "heun") and flow.default_sampler == "euler"
    denoise = lambda z, t: calls.append(1) or 0.5 * z
    a = flow.sample(denoise, (2, 3), generator=torch.Generator().manual_seed(0))
    assert len(calls) == 6
    assert torch.equal(a, flow.sample(denoise, (2, 3), generator=torch.Generator().manual_seed(0)))
    assert not torch.allclose(a, flow.sample(denoise, (2, 3), generator=torch.Generator().manual_seed(1)))
    assert [t.item() for t in flow.fixed_times([0.05, 0.5, 0.95])] == pytest.approx([0.95, 0.5, 0.05])


def test_ddpm_process_is_the_diffusion_schedule() -> None:
    assert DiffusionSchedule is DDPMProcess and issubclass(DDPMProcess, NoiseProcess)
    p = DDPMProcess()
    assert p.samplers == ("ddim", "ddpm", "dpmsolver++") and p.default_sampler == "ddim"
    times = p.fixed_times([0.05, 0.5, 0.95])
    assert [t.item() for t in times] == [50, 500, 949] and all(t.dtype == torch.long for t in times)
    x0 = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    net = lambda x, t: 0.3 * x + 1e-3 * t.view(-1, 1, 1).float()
    a = DDPMProcess(objective="v").loss(net, x0, generator=torch.Generator().manual_seed(1))
    b = DiffusionSchedule(objective="v").loss(net, x0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    seen = []
    p.loss(lambda x, t: seen.append(t) or x, x0, t=times[1])
    assert torch.equal(seen[0], torch.full((3,), 500))
    # sampler=None means DDIM
    noise = torch.randn(1, 2, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(p.sample(net, (1, 2, 4), steps=5, noise=noise),
                       p.sample(net, (1, 2, 4), steps=5, sampler="ddim", noise=noise))


@pytest.mark.parametrize("process", [DDPMProcess(beta_schedule="linear", objective="v"),
                                     RectifiedFlow(sigma_min=1e-3, time_sampling="logit_normal", logit_std=0.8)])
def test_config_round_trip_and_registry(process: NoiseProcess) -> None:
    cfg = json.loads(json.dumps(process.config()))
    rebuilt = registry.get(process.registry_name, kind="process")(**cfg)
    assert type(rebuilt) is type(process) and rebuilt.config() == process.config()
    x0 = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0))
    net = lambda x, t: 0.2 * x + 1e-3 * t.view(-1, 1, 1).float()
    assert torch.equal(process.loss(net, x0, generator=torch.Generator().manual_seed(9)),
                       type(process)(**process.config()).loss(net, x0, generator=torch.Generator().manual_seed(9)))


def test_registry_names() -> None:
    assert registry.get("ddpm") is DDPMProcess
    assert registry.get("rectified_flow", kind="process") is RectifiedFlow
    assert registry.resolve("rectified_flow") == "tta.generators.noise.flow.RectifiedFlow"
