"""`LatentDiffusion`: the pure (non-Lightning) AudioLDM / Re-AudioLDM model.

It composes the denoising UNet, the conditioners and the noise process; the Lightning
wrapper (`tta.generators.ldm.module`) trains it, the pipeline (`tta.pipelines.ldm`) samples it.

Conditions and their routes:

- ``"text"``: CLAP text embedding of the prompt -> FiLM (`ClapTextFiLM`);
- ``"retrieval"`` (optional): the k neighbours' features -> cross-attention context
  (`RetrievalConditioner`); off (None) or k = 0 gives plain AudioLDM.

The noise process (`tta.generators.noise`) owns the training target and the samplers: DDPM
(AudioLDM; eps or v) or rectified flow; the UNet sees its model timesteps (0..1000, larger is
noisier) either way.

Classifier-free guidance: during training each condition is dropped independently with its own
probability (``cfg_dropout``); at sampling the unconditional branch drops the conditions named
in ``guidance_drop`` (all by default).

Latents whose time/frequency sizes are not multiples of the UNet's downsampling factor are padded
with zeros before the UNet and cropped after it, so any duration can be trained and generated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tta.generators.ldm.conditioning import ClapTextFiLM, Conditioning, drop_mask
from tta.generators.ldm.retrieval import CONTEXT_NAME, RetrievalConditioner
from tta.generators.noise import DDPMProcess, NoiseProcess, guided

log = logging.getLogger(__name__)

CONDITIONS = ("text", "retrieval")


class LatentDiffusion(nn.Module):
    """UNet + conditioners + noise process.

    Args:
        unet: the denoiser ``unet(x, t, film=..., context=...)`` (`tta.nn.unet.UNetModel`).
        text: the FiLM conditioner (its width must equal the UNet's ``film_dim``).
        retrieval: Re-AudioLDM's retrieval conditioner, or None for plain AudioLDM.
        process: the noise process (`DDPMProcess`, AudioLDM's, by default; or `RectifiedFlow`).
        cfg_dropout: probability of dropping each condition during training (a float for all,
            or ``{"text": p, "retrieval": q}``).
    """

    def __init__(
        self,
        unet: nn.Module,
        text: ClapTextFiLM,
        retrieval: RetrievalConditioner | None = None,
        process: NoiseProcess | None = None,
        cfg_dropout: float | dict[str, float] = 0.1,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.text = text
        self.retrieval = retrieval
        self.process = process if process is not None else DDPMProcess()
        drops = cfg_dropout if isinstance(cfg_dropout, dict) else dict.fromkeys(CONDITIONS, float(cfg_dropout))
        unknown = set(drops) - set(CONDITIONS)
        if unknown:
            raise ValueError(f"cfg_dropout names unknown conditions {sorted(unknown)}; known: {CONDITIONS}")
        self.cfg_dropout = {c: float(drops.get(c, 0.0)) for c in CONDITIONS}
        film_dim = getattr(unet, "film_dim", None)
        if film_dim is not None and film_dim != text.dim:
            raise ValueError(f"the UNet's film_dim is {film_dim} but the text conditioner gives {text.dim}")
        ctx = dict(getattr(unet, "context_dims", None) or {})
        if retrieval is not None and ctx.get(CONTEXT_NAME) != retrieval.context_dim:
            raise ValueError(
                f"the retrieval conditioner projects to {retrieval.context_dim} but the UNet's "
                f"context_dims[{CONTEXT_NAME!r}] is {ctx.get(CONTEXT_NAME)}"
            )

    @property
    def factor(self) -> int:
        """The UNet's total downsampling (latent sizes are padded to a multiple of it)."""
        return int(getattr(self.unet, "downsample_factor", 1))

    # ------------------------------------------------------------------ conditions
    def conditioning(
        self,
        captions: Sequence[str],
        neighbours: Sequence[Sequence[str]] | None = None,
        drop: dict[str, torch.Tensor] | None = None,
        film: torch.Tensor | None = None,
    ) -> Conditioning:
        """The conditioning of a batch; ``drop[name]`` (bool (B,)) replaces rows by the null;
        ``film``: FiLM embeddings to use instead of the captions' (AudioLDM's audio embeddings)."""
        drop = drop or {}
        device = next(self.unet.parameters()).device
        film = self.text(captions, drop.get("text"), embeddings=film).to(device)
        context = {}
        if self.retrieval is not None:
            if neighbours is None:
                raise ValueError("this model retrieves: pass the neighbours of every clip")
            context[CONTEXT_NAME] = self.retrieval(neighbours, drop.get("retrieval"), device=device)
        return Conditioning(film, context)

    def unconditional(self, cond: Conditioning, drop: Sequence[str] = CONDITIONS) -> Conditioning:
        """``cond`` with the conditions in ``drop`` replaced by their nulls."""
        film = cond.film
        if "text" in drop and film is not None:
            film = self.text.null_embedding(film.shape[0]).to(film.device, film.dtype)
        context = dict(cond.context)
        if "retrieval" in drop and CONTEXT_NAME in context:
            seq, mask = context[CONTEXT_NAME]
            context[CONTEXT_NAME] = (seq, torch.zeros_like(mask))
        return Conditioning(film, context)

    # ------------------------------------------------------------------ denoising
    @property
    def schedule(self) -> NoiseProcess:
        """The noise process (the name of earlier releases)."""
        return self.process

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """UNet output for noisy latents ``x`` (any size: padded to the UNet factor, then cropped)."""
        h, w = x.shape[-2:]
        f = self.factor
        ph, pw = (-h) % f, (-w) % f
        xp = F.pad(x, (0, pw, 0, ph)) if (ph or pw) else x
        out = self.unet(xp, t, film=cond.film, context=cond.context or None)
        return out[..., :h, :w]

    def training_drop(self, batch: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Independent classifier-free-guidance dropout masks per condition."""
        return {c: drop_mask(batch, p, generator) for c, p in self.cfg_dropout.items()}

    def loss(
        self,
        latents: torch.Tensor,
        captions: Sequence[str],
        neighbours: Sequence[Sequence[str]] | None = None,
        generator: torch.Generator | None = None,
        t: torch.Tensor | None = None,
        drop: dict[str, torch.Tensor] | None = None,
        film: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoising loss on scaled latents with CFG dropout (``drop`` overrides the random masks;
        ``film`` replaces the captions' FiLM embeddings)."""
        if drop is None:
            drop = self.training_drop(latents.shape[0], generator)
        cond = self.conditioning(captions, neighbours, drop, film)
        return self.process.loss(lambda x, tt: self.denoise(x, tt, cond), latents, generator=generator, t=t)

    @torch.no_grad()
    def sample(
        self,
        cond: Conditioning,
        shape: tuple[int, int, int],
        steps: int | None = None,
        sampler: str | None = None,
        guidance: float = 3.5,
        guidance_drop: Sequence[str] = CONDITIONS,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        init: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """Latents ``(B, *shape)`` for a batch conditioning (CFG with ``guidance``); ``init`` /
        ``strength``: edit given latents; ``steps`` / ``sampler`` None: the process's defaults
        (`NoiseProcess.sample`)."""
        if guidance < 1.0:
            raise ValueError(f"guidance must be >= 1 (1 = no guidance), got {guidance}")
        batch = cond.film.shape[0] if cond.film is not None else len(next(iter(cond.context.values()))[0])
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
