"""`LatentDiffusion`: the pure (non-Lightning) AudioLDM / Re-AudioLDM model.

It composes the denoising UNet, a named set of conditioners (`ConditionedModel`) and the noise
process; the Lightning wrapper (`tta.generators.ldm.module`) trains it, the pipeline
(`tta.pipelines.ldm`) samples it.

Conditioners (`tta.generators.conditioning.Conditioner`) are submodules named by their keys, each
on a route of the UNet:

- ``"text"`` (optional; ``model.text`` is None without it, e.g. DreamAudio): CLAP text embedding
  of the prompt -> FiLM (`ClapTextFiLM`);
- ``"retrieval"`` (optional; ``model.retrieval`` is None without it): the k neighbours' features
  -> the ``"retrieval"`` cross-attention context (`RetrievalConditioner`); off or k = 0 gives
  plain AudioLDM;
- any other: a context named after it (``unet.context_dims[name]``), channels concatenated to
  the latents (``unet.in_channels`` = latent + concat channels) or reference latents for a
  reference path (``unet.reference_dims[name]``; passed as ``unet(..., reference={name: (R, present)})``).

The noise process (`tta.generators.noise`) owns the training target and the samplers: DDPM
(AudioLDM; eps or v) or rectified flow; the UNet sees its model timesteps (0..1000, larger is
noisier) either way.

Classifier-free guidance: during training each conditioner is dropped independently with its own
probability (``cfg_dropout`` sets those not given one); at sampling the unconditional branch drops
the conditioners named in ``guidance_drop`` (all by default).

Latents whose time/frequency sizes are not multiples of the UNet's downsampling factor are padded
with zeros before the UNet and cropped after it, so any duration can be trained and generated;
reference latents are padded at their end the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tta.generators.conditioning import ConditionedModel, Conditioner, Conditioning
from tta.generators.noise import DDPMProcess, NoiseProcess, guided
from tta.generators.noise.base import Reduction

log = logging.getLogger(__name__)

Inputs = Mapping[str, Any]


def condition_inputs(captions: Inputs | Sequence[str], neighbours: Sequence[Sequence[str]] | None = None,
                     film: torch.Tensor | None = None) -> dict[str, Any]:
    """The conditioners' inputs: ``captions`` if it is a mapping already, else
    ``{"captions", "neighbours", "film"}`` (the positional form of earlier releases)."""
    if isinstance(captions, Mapping):
        if neighbours is not None or film is not None:
            raise TypeError("give neighbours / film inside the inputs mapping, not beside it")
        return dict(captions)
    return {"captions": captions, "neighbours": neighbours, "film": film}


def _pad_to(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``x`` (..., H, W) zero-padded at the end of H and W to multiples of ``factor``."""
    ph, pw = (-x.shape[-2]) % factor, (-x.shape[-1]) % factor
    return F.pad(x, (0, pw, 0, ph)) if (ph or pw) else x


class LatentDiffusion(ConditionedModel):
    """UNet + conditioners + noise process.

    Args:
        unet: the denoiser ``unet(x, t, film=..., context=...)`` (`tta.nn.unet.UNetModel`).
        conditioners: ``{name: Conditioner}`` (e.g. ``{"text": ClapTextFiLM, "retrieval":
            RetrievalConditioner}``), registered as submodules ``<name>``; their routes and widths
            are checked against the UNet here.
        process: the noise process (`DDPMProcess`, AudioLDM's, by default; or `RectifiedFlow`).
        cfg_dropout: probability of dropping each condition during training for the conditioners
            not given their own (a float for all, or ``{name: p}`` with 0 for names left out).
    """

    optional_conditioners = ("text", "retrieval")

    def __init__(
        self,
        unet: nn.Module,
        conditioners: Mapping[str, Conditioner],
        process: NoiseProcess | None = None,
        cfg_dropout: float | dict[str, float] = 0.1,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.process = process if process is not None else DDPMProcess()
        self.attach_conditioners(conditioners, cfg_dropout)
        self.check_denoiser(unet)

    @property
    def factor(self) -> int:
        """The UNet's total downsampling (latent sizes are padded to a multiple of it)."""
        return int(getattr(self.unet, "downsample_factor", 1))

    # ------------------------------------------------------------------ conditions
    def conditioning(
        self,
        inputs: Inputs | Sequence[str],
        neighbours: Sequence[Sequence[str]] | None = None,
        drop: dict[str, torch.Tensor] | None = None,
        film: torch.Tensor | None = None,
    ) -> Conditioning:
        """The conditioning of a batch: ``inputs`` is the conditioners' inputs mapping, or the
        captions (with ``neighbours`` and ``film``, FiLM embeddings to use instead of the captions',
        e.g. AudioLDM's audio embeddings); ``drop[name]`` (bool (B,)) replaces rows by the null."""
        device = next(self.unet.parameters()).device
        return self.condition(condition_inputs(inputs, neighbours, film), drop, device)

    # ------------------------------------------------------------------ denoising
    @property
    def schedule(self) -> NoiseProcess:
        """The noise process (the name of earlier releases)."""
        return self.process

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """UNet output for noisy latents ``x`` (any size: padded to the UNet factor, then cropped)."""
        x = self.unet_input(x, cond)
        h, w = x.shape[-2:]
        f = self.factor
        kwargs = self.unet_kwargs(cond)
        if "reference" in kwargs:
            kwargs["reference"] = {name: (_pad_to(r, f), present) for name, (r, present) in kwargs["reference"].items()}
        out = self.unet(_pad_to(x, f), t, **kwargs)
        return out[..., :h, :w]

    def unet_input(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The latents with the concat conditioners' channels appended (same spatial size)."""
        if not cond.concat:
            return x
        for name, extra in cond.concat.items():
            if extra.shape[0] != x.shape[0] or extra.shape[2:] != x.shape[2:]:
                raise ValueError(f"concat conditioner {name!r} gives {tuple(extra.shape)}; the latents are "
                                 f"{tuple(x.shape)} (it needs the same batch and spatial size)")
        return torch.cat([x, *(c.to(x.dtype) for c in cond.concat.values())], dim=1)

    @staticmethod
    def unet_kwargs(cond: Conditioning) -> dict[str, Any]:
        """The UNet's keyword arguments for ``cond`` (``reference`` only when there is one)."""
        kwargs: dict[str, Any] = {"film": cond.film, "context": cond.context or None}
        if cond.reference:
            kwargs["reference"] = cond.reference
        return kwargs

    def loss(
        self,
        latents: torch.Tensor,
        inputs: Inputs | Sequence[str],
        neighbours: Sequence[Sequence[str]] | None = None,
        generator: torch.Generator | None = None,
        t: torch.Tensor | None = None,
        drop: dict[str, torch.Tensor] | None = None,
        film: torch.Tensor | None = None,
        reduction: Reduction = "mean",
    ) -> torch.Tensor:
        """Denoising loss on scaled latents with CFG dropout (``drop`` overrides the random masks);
        ``inputs``, ``neighbours``, ``film`` as in `conditioning`; ``reduction`` as the process's
        (``"per_sample"`` / ``"none"``: per clip, so a non-finite clip can be named and left out)."""
        if drop is None:
            drop = self.training_drop(latents.shape[0], generator)
        cond = self.conditioning(inputs, neighbours, drop, film)
        return self.process.loss(lambda x, tt: self.denoise(x, tt, cond), latents, generator=generator, t=t,
                                 reduction=reduction)

    @torch.no_grad()
    def sample(
        self,
        cond: Conditioning,
        shape: tuple[int, int, int],
        steps: int | None = None,
        sampler: str | None = None,
        guidance: float = 3.5,
        guidance_drop: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        init: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """Latents ``(B, *shape)`` for a batch conditioning (CFG with ``guidance``; its unconditional
        branch drops the conditioners in ``guidance_drop``, all by default); ``init`` /
        ``strength``: edit given latents; ``steps`` / ``sampler`` None: the process's defaults
        (`NoiseProcess.sample`)."""
        if guidance < 1.0:
            raise ValueError(f"guidance must be >= 1 (1 = no guidance), got {guidance}")
        batch = cond.batch_size
        device = next(self.unet.parameters()).device
        denoiser = guided(
            lambda x, t, c: self.denoise(x, t, c),
            cond,
            self.unconditional(cond, guidance_drop),
            guidance,
            lambda a, b: a.cat(b),
        )
        return self.process.sample(denoiser, (batch, *shape), steps=steps, sampler=sampler, generator=generator,
                                    device=device, noise=noise, init=init, strength=strength)
