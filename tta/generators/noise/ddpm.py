"""The DDPM forward process, its training target and the samplers (DDPM, DDIM, DPM-Solver++).

One `DDPMProcess` holds the betas; samplers are diffusers' schedulers configured from it, so
training and every sampler agree on ``alphas_cumprod`` by construction.

AudioLDM's "linear" schedule is latent-diffusion's ``linspace(sqrt(beta_start), sqrt(beta_end))**2``,
which diffusers calls ``"scaled_linear"``; that is the default here (betas 0.0015 -> 0.0195,
1000 steps). ``"linear"`` (betas spaced linearly) is available for other models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from tta.generators.noise.base import Denoiser, NoiseProcess, Reduction, reduce_mse
from tta.registry import register

Objective = Literal["eps", "v"]
SAMPLERS = ("ddim", "ddpm", "dpmsolver++")


@register("process", "ddpm")
class DDPMProcess(NoiseProcess):
    """Betas and the derived ``alphas_cumprod`` (buffers, so they follow the module's device).

    The model timestep is the integer DDPM step ``t`` in ``[0, T)``.

    Args:
        num_train_timesteps: T (1000 in AudioLDM).
        beta_start, beta_end: the first and last beta.
        beta_schedule: ``"scaled_linear"`` (LDM/AudioLDM "linear") or ``"linear"``.
        objective: what the network predicts: ``"eps"`` (AudioLDM) or ``"v"``.
    """

    samplers = SAMPLERS
    default_sampler = "ddim"
    fast_sampler = "dpmsolver++"
    default_steps = 200

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0015,
        beta_end: float = 0.0195,
        beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear",
        objective: Objective = "eps",
    ) -> None:
        super().__init__()
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if not 0.0 < beta_start < beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
        if objective not in ("eps", "v"):
            raise ValueError(f"objective must be 'eps' or 'v', got {objective!r}")
        n = num_train_timesteps
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
        else:
            raise ValueError(f"beta_schedule must be 'scaled_linear' or 'linear', got {beta_schedule!r}")
        self.num_train_timesteps = n
        self.beta_start, self.beta_end, self.beta_schedule = beta_start, beta_end, beta_schedule
        self.objective: Objective = objective
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, 0).float(), persistent=False)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (stored in pipelines)."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "objective": self.objective,
        }

    def fixed_times(self, fractions: Sequence[float]) -> list[torch.Tensor]:
        """Integer steps ``round(f * (T - 1))`` (long scalars) for noise fractions ``f`` in [0, 1]."""
        last = self.num_train_timesteps - 1
        return [torch.tensor(round(f * last), dtype=torch.long) for f in self.check_fractions(fractions)]

    def _coefs(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod.to(t.device)[t].view(-1, *([1] * (ndim - 1)))
        return a.sqrt(), (1.0 - a).sqrt()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise``."""
        sa, s1a = self._coefs(t, x0.ndim)
        return sa.to(x0.dtype) * x0 + s1a.to(x0.dtype) * noise

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network should output at ``x_t``: ``noise`` (eps) or ``v = sqrt(a) noise - sqrt(1-a) x0``."""
        if self.objective == "eps":
            return noise
        sa, s1a = self._coefs(t, x0.ndim)
        return sa.to(x0.dtype) * noise - s1a.to(x0.dtype) * x0

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform integer timesteps in ``[0, T)`` (CPU generator, then moved by the caller)."""
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator)

    def loss(self, denoiser: Denoiser, x0: torch.Tensor, generator: torch.Generator | None = None,
             t: torch.Tensor | None = None, reduction: Reduction = "mean") -> torch.Tensor:
        """Mean-squared error of the network output against `target` at random (or given) timesteps."""
        if t is None:
            t = self.sample_timesteps(x0.shape[0], generator)
        t = t.to(x0.device)
        if t.ndim == 0:  # one fixed timestep for the whole batch
            t = t.expand(x0.shape[0])
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        out = denoiser(self.q_sample(x0, t, noise), t)
        return reduce_mse(out, self.target(x0, t, noise), reduction)

    def make_scheduler(self, sampler: str = "ddim") -> Any:
        """A diffusers scheduler with exactly this schedule: ``"ddim"`` (eta 0), ``"ddpm"`` or
        ``"dpmsolver++"`` (2nd-order multistep)."""
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

        common = {
            "num_train_timesteps": self.num_train_timesteps,
            "trained_betas": self.betas.double().cpu().numpy(),
            "prediction_type": "epsilon" if self.objective == "eps" else "v_prediction",
        }
        if sampler == "ddim":
            return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        if sampler == "ddpm":
            return DDPMScheduler(**common, clip_sample=False, variance_type="fixed_small")
        if sampler in ("dpmsolver++", "dpmsolver", "dpm"):
            return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        shape: tuple[int, ...],
        steps: int | None = None,
        sampler: str | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        noise: torch.Tensor | None = None,
        init: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """Run ``sampler`` (default DDIM) for ``steps`` (default 200) from Gaussian noise of
        ``shape`` (drawn from the CPU ``generator``, so the result is identical on every device)
        and return ``x_0``.

        With ``init`` (latents of ``shape``), SDEdit-style editing as AudioLDM's style transfer:
        ``init`` is noised to the timestep ``strength`` of the way up the schedule and only the
        last ``round(steps * strength)`` (at least 1) steps run; ``strength`` 1 starts from noise
        at the first timestep."""
        steps, eps = self.start(shape, steps, strength, init, noise, generator)
        scheduler = self.make_scheduler(self.default_sampler if sampler is None else sampler)
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps
        if init is None:
            x = (eps * scheduler.init_noise_sigma).to(device)
        else:
            start = min(steps - round(steps * strength), steps - 1)
            timesteps = timesteps[start:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start * scheduler.order)
            x = scheduler.add_noise(init.detach().float().cpu(), eps.float(), timesteps[:1]).to(device)
        for t in timesteps:
            t_batch = torch.full((shape[0],), int(t), device=device, dtype=torch.long)
            out = denoiser(scheduler.scale_model_input(x, t), t_batch)
            # DDPM draws its step noise from the CPU generator (diffusers moves it to the device)
            x = scheduler.step(out.float(), t, x, generator=generator, return_dict=False)[0]
        return x
