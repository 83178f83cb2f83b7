"""The interface every noise process (DDPM, rectified flow) implements, and classifier-free guidance.

A noise process owns the forward corruption of data, the training target of the network and the
samplers that invert it. The network is always called as ``denoiser(x_t, t_model)`` with
``t_model`` a tensor ``(B,)`` of *model timesteps* on a 0..1000 scale where larger means noisier
(DDPM: the integer step; rectified flow: ``(1 - l) * 1000``), so one UNet serves every process.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

#: a denoiser: (noisy latents, model timesteps (B,) on a 0..1000 scale, larger = noisier) -> model output
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: how a training loss is reduced: ``"mean"`` a scalar (the batch MSE), ``"per_sample"`` one MSE per
#: sample ``(B,)``, ``"none"`` the squared errors ``(B, ...)`` (as torch's ``reduction="none"``)
Reduction = Literal["mean", "per_sample", "none"]
REDUCTIONS: tuple[str, ...] = ("mean", "per_sample", "none")


def reduce_mse(out: torch.Tensor, target: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Float32 MSE of ``out`` against ``target`` reduced as ``reduction`` (`Reduction`).

    ``"mean"`` is ``F.mse_loss`` itself; the mean of ``"none"`` equals it bit for bit (one reduction
    over the same squared errors); ``"per_sample"`` averages each sample's errors (its mean equals
    ``"mean"`` up to float rounding: every sample has the same number of elements)."""
    if reduction == "mean":
        return F.mse_loss(out.float(), target.float())
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    errors = F.mse_loss(out.float(), target.float(), reduction="none")
    return errors if reduction == "none" else errors.flatten(1).mean(1)


class NoiseProcess(nn.Module, metaclass=abc.ABCMeta):
    """A forward noise process with its training loss and its samplers.

    Subclasses set `samplers` (the sampler names `sample` accepts), `default_sampler`, `fast_sampler`,
    `default_steps`, and register themselves with ``tta.registry.register("process", name)``
    (which sets ``registry_name``).
    """

    samplers: tuple[str, ...] = ()
    default_sampler: str = ""
    #: the sampler that needs the fewest network calls for usable samples (evaluation during training)
    fast_sampler: str = ""
    default_steps: int = 1
    registry_name: str

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able): ``type(p)(**p.config())`` rebuilds the process."""

    @abc.abstractmethod
    def loss(self, denoiser: Denoiser, x0: torch.Tensor, generator: torch.Generator | None = None,
             t: torch.Tensor | None = None, reduction: Reduction = "mean") -> torch.Tensor:
        """MSE of ``denoiser(x_t, t_model)`` against the training target at random times (or the
        given process-native times ``t``, shape ``(B,)`` or a scalar for the whole batch), reduced
        as ``reduction`` (`reduce_mse`: a scalar, one loss per sample ``(B,)`` so a non-finite
        sample can be named and left out, or the squared errors).

        Times and noise are drawn on the CPU from ``generator`` (noise as float32, then moved to
        ``x0``'s device and dtype), so a seed gives the same loss on every device, whatever the
        reduction."""

    @abc.abstractmethod
    def fixed_times(self, fractions: Sequence[float]) -> list[torch.Tensor]:
        """Process-native scalar times at the given noise fractions in [0, 1] (1 = pure noise),
        for validation losses at fixed noise levels (pass one as ``t`` to `loss`)."""

    @abc.abstractmethod
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
        """Generate data of ``shape`` from noise drawn on the CPU from ``generator`` (or the given
        ``noise``), so the result does not depend on ``device``.

        ``steps=None`` uses `default_steps`, ``sampler=None`` `default_sampler`. With ``init``
        (data of ``shape``) and ``strength`` < 1, SDEdit-style editing: ``init`` is noised
        ``strength`` of the way towards pure noise and only that part of the trajectory runs."""

    @staticmethod
    def check_fractions(fractions: Sequence[float]) -> list[float]:
        """The fractions as floats; ValueError for any outside [0, 1]."""
        out = [float(f) for f in fractions]
        bad = [f for f in out if not 0.0 <= f <= 1.0]
        if bad:
            raise ValueError(f"noise fractions must lie in [0, 1], got {bad}")
        return out

    @staticmethod
    def check_sample_args(shape: tuple[int, ...], steps: int, strength: float, init: torch.Tensor | None) -> None:
        """ValueError for ``steps`` < 1, ``strength`` outside (0, 1], ``strength`` < 1 without
        ``init``, or ``init`` of a shape other than ``shape``."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if init is None and strength != 1.0:
            raise ValueError("strength < 1 edits given latents: pass init")
        if init is not None and tuple(init.shape) != tuple(shape):
            raise ValueError(f"init latents have shape {tuple(init.shape)}, expected {tuple(shape)}")

    def start(self, shape: tuple[int, ...], steps: int | None, strength: float, init: torch.Tensor | None,
              noise: torch.Tensor | None, generator: torch.Generator | None) -> tuple[int, torch.Tensor]:
        """What every `sample` begins with: the step count (`default_steps` for None), the
        arguments checked, and the starting noise (float32, CPU): ``noise`` (shape checked) or a
        draw from ``generator``, so a seed gives the same result on every device."""
        steps = self.default_steps if steps is None else steps
        self.check_sample_args(shape, steps, strength, init)
        if noise is not None and tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        z0 = torch.randn(shape, generator=generator) if noise is None else noise.detach().float().cpu().clone()
        return steps, z0

    def resolve_sampler(self, sampler: str | None) -> str:
        """``sampler`` or `default_sampler` when None; ValueError listing `samplers` if unknown."""
        name = self.default_sampler if sampler is None else sampler
        if name not in self.samplers:
            raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(self.samplers)}")
        return name


def guided(
    model: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    cond: Any,
    uncond: Any,
    scale: float,
    concat: Callable[[Any, Any], Any],
) -> Denoiser:
    """Classifier-free guidance around ``model(x, t, conditioning)``: ``u + scale * (c - u)``.

    The conditional and the unconditional branch run in one batch; ``concat(cond, uncond)``
    stacks the two conditionings along the batch. Scale 1 skips the unconditional branch (the
    result is exactly the conditional output). Works for any output: eps, v or a flow velocity.
    """
    if scale == 1.0:
        return lambda x, t: model(x, t, cond)
    both = concat(cond, uncond)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(torch.cat([x, x]), torch.cat([t, t]), both)
        c, u = out.chunk(2)
        return u + scale * (c - u)

    return denoise
