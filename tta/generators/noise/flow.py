"""Rectified flow (DreamAudio eq. 5-6): a straight path from noise to data and its ODE samplers.

With ``z0 ~ N(0, I)`` the NOISE, ``z1`` the DATA and ``s = sigma_min``::

    z_l = (1 - (1 - s) l) z0 + l z1,        l in [0, 1]
    v   = dz_l/dl = z1 - (1 - s) z0          (the training target)

The network sees the model timestep ``t_model = (1 - l) * 1000`` (larger = noisier, like DDPM's
steps) and predicts ``v``. Sampling integrates ``dz/dl = v(z, l)`` from ``l = 0`` (noise) to
``l = 1`` (data) on a uniform grid with Euler or Heun (explicit trapezoid). Classifier-free
guidance is applied to the velocity by the caller (`tta.generators.noise.base.guided`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch

from tta.generators.noise.base import Denoiser, NoiseProcess, Reduction, reduce_mse
from tta.registry import register

log = logging.getLogger(__name__)

TimeSampling = Literal["uniform", "logit_normal"]


@register("process", "rectified_flow")
class RectifiedFlow(NoiseProcess):
    """The rectified-flow path, its velocity target and Euler/Heun samplers.

    Args:
        sigma_min: ``s``, the noise left at ``l = 1`` (``z_1 = s z0 + data``); in [0, 1).
        time_sampling: training times ``l``: ``"uniform"`` on [0, 1] or ``"logit_normal"``
            (``sigmoid(N(logit_mean, logit_std**2))``, concentrated on the middle of the path).
        logit_mean, logit_std: the normal of ``"logit_normal"``.
        default_steps: network-step intervals of `sample` when ``steps`` is not given.
    """

    samplers = ("euler", "heun")
    default_sampler = "euler"
    fast_sampler = "euler"

    def __init__(
        self,
        sigma_min: float = 1e-5,
        time_sampling: TimeSampling = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        default_steps: int = 25,
    ) -> None:
        super().__init__()
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
        if time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {time_sampling!r}")
        if not logit_std > 0.0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        if default_steps < 1:
            raise ValueError(f"default_steps must be >= 1, got {default_steps}")
        self.sigma_min = float(sigma_min)
        self.time_sampling: TimeSampling = time_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.default_steps = int(default_steps)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (stored in pipelines)."""
        return {
            "sigma_min": self.sigma_min,
            "time_sampling": self.time_sampling,
            "logit_mean": self.logit_mean,
            "logit_std": self.logit_std,
            "default_steps": self.default_steps,
        }

    def fixed_times(self, fractions: Sequence[float]) -> list[torch.Tensor]:
        """Path times ``l = 1 - f`` (float32 scalars) for noise fractions ``f`` in [0, 1]."""
        return [torch.tensor(1.0 - f, dtype=torch.float32) for f in self.check_fractions(fractions)]

    @staticmethod
    def model_time(l: torch.Tensor) -> torch.Tensor:
        """The network's timestep for path time ``l``: ``(1 - l) * 1000`` as float32."""
        return ((1.0 - l) * 1000.0).float()

    def sample_times(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times ``l`` (float32, CPU generator): uniform on [0, 1) or logit-normal."""
        if self.time_sampling == "uniform":
            return torch.rand(batch, generator=generator)
        return torch.sigmoid(torch.randn(batch, generator=generator) * self.logit_std + self.logit_mean)

    def _coef(self, l: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
        return (1.0 - (1.0 - self.sigma_min) * l).view(-1, *([1] * (ndim - 1))).to(dtype)

    def q_sample(self, x1: torch.Tensor, l: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``z_l = (1 - (1 - s) l) noise + l x1`` for times ``l`` (B,)."""
        lv = l.view(-1, *([1] * (x1.ndim - 1))).to(x1.dtype)
        return self._coef(l, x1.ndim, x1.dtype) * noise + lv * x1

    def target(self, x1: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity the network should output: ``x1 - (1 - s) noise`` (independent of ``l``)."""
        return x1 - (1.0 - self.sigma_min) * noise

    def loss(self, denoiser: Denoiser, x0: torch.Tensor, generator: torch.Generator | None = None,
             t: torch.Tensor | None = None, reduction: Reduction = "mean") -> torch.Tensor:
        """MSE of ``denoiser(z_l, (1 - l) * 1000)`` against the velocity target; ``x0`` is the
        DATA (``z1`` of the path) and ``t`` optional path times ``l`` ((B,) or a scalar)."""
        batch = x0.shape[0]
        l = self.sample_times(batch, generator) if t is None else t
        l = l.to(x0.device, torch.float32)
        if l.ndim == 0:  # one fixed time for the whole batch
            l = l.expand(batch)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        out = denoiser(self.q_sample(x0, l, noise), self.model_time(l))
        return reduce_mse(out, self.target(x0, noise), reduction)

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
        """Integrate ``dz/dl = denoiser(z, (1 - l) * 1000)`` from noise (``l = 0``) to ``l = 1``
        in ``steps`` uniform intervals with ``sampler`` (``"euler"``, ``"heun"``; Heun calls the
        network twice per interval) and return the data as float32.

        With ``init`` and ``strength`` < 1 (SDEdit): start at ``l0 = 1 - strength`` from
        ``z = (1 - (1 - s) l0) noise + l0 init`` and run ``max(1, round(steps * strength))``
        uniform intervals from ``l0`` to 1."""
        method = self.resolve_sampler(sampler)
        steps, z0 = self.start(shape, steps, strength, init, noise, generator)
        if init is None:
            l0, n = 0.0, steps
            z = z0
        else:
            l0, n = 1.0 - strength, max(1, round(steps * strength))
            z = (1.0 - (1.0 - self.sigma_min) * l0) * z0 + l0 * init.detach().float().cpu()
        z = z.to(device)
        grid = torch.linspace(l0, 1.0, n + 1, dtype=torch.float64).tolist()
        log.debug("rectified flow: %s, %d intervals from l=%.3f", method, n, l0)

        def velocity(x: torch.Tensor, l: float) -> torch.Tensor:
            t_model = torch.full((shape[0],), (1.0 - l) * 1000.0, device=device, dtype=torch.float32)
            return denoiser(x, t_model).float()

        for l, l_next in itertools.pairwise(grid):
            h = l_next - l
            v = velocity(z, l)
            if method == "euler":
                z = z + h * v
            else:  # Heun: Euler predictor, trapezoid corrector (the endpoint slope at l = 1 too)
                v_next = velocity(z + h * v, l_next)
                z = z + 0.5 * h * (v + v_next)
        return z.float()
