"""`LatentAudioGenerator`: the pure (non-Lightning) inference model of AudioLDM / Re-AudioLDM.

It composes the mel front-end, the latent codec (frozen VAE + scale) and the `LatentDiffusion`
(UNet, conditioners, noise process) and owns the sampling API, ``generate_mel``. The
LightningModule (`tta.generators.ldm.module.LatentDiffusionModule`) holds the same three
submodules under the same names and only trains them, so a ``latent_diffusion`` checkpoint's
state dict is also this model's; pipelines (`tta.pipelines.ldm`) sample this model.

``components()`` declares the parts a pipeline folder stores as separate files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tta.data.mel import MelConfig, MelFrontend
from tta.generators.ldm.model import LatentDiffusion
from tta.generators.vae.codec import LatentCodec


class LatentAudioGenerator(nn.Module):
    """Prompts (+ retrieved neighbours, + further conditioner inputs) -> log-mels.

    Args:
        frontend: the mel front-end of the data (and of the VAE).
        codec: the latent codec (VAE + latent scale).
        model: the latent diffusion model (UNet, conditioners, noise process).
    """

    def __init__(self, frontend: MelFrontend, codec: LatentCodec, model: LatentDiffusion) -> None:
        super().__init__()
        self.frontend, self.codec, self.model = frontend, codec, model

    @property
    def mel_config(self) -> MelConfig:
        return self.frontend.config

    @property
    def device(self) -> torch.device:
        return next(self.model.unet.parameters()).device

    def components(self) -> dict[str, nn.Module]:
        """The parts a pipeline folder stores as separate files (the rest goes to ``conditioners``)."""
        parts = {"unet": self.model.unet, "vae": self.codec}
        return parts if self.model.text is None else {**parts, "clap": self.model.text.clap}

    def frames_for(self, seconds: float) -> int:
        """Mel frames covering ``seconds`` of audio (the vocoded waveform is then cropped to it)."""
        if not seconds > 0:
            raise ValueError(f"duration must be positive, got {seconds}")
        return max(1, math.ceil(round(seconds * self.mel_config.sample_rate) / self.mel_config.hop_length))

    def query_neighbours(self, captions: Sequence[str],
                         exclude: Sequence[set[str]] | None = None) -> list[list[str]] | None:
        """The retrieval index's neighbours of each caption (None for a model that does not retrieve)."""
        retrieval = self.model.retrieval
        if retrieval is None:
            return None
        return retrieval.query_neighbours(self.model.text.embed(list(captions)), exclude=exclude)

    def audio_mels(self, wav: torch.Tensor, frames: int) -> torch.Tensor:
        """Log-mels ``(B, n_mels, frames)`` of waveforms ``(B, T)`` (cropped, or padded with the log floor)."""
        mel = self.frontend(wav.to(self.device))[..., :frames]
        if mel.shape[-1] < frames:
            mel = nn.functional.pad(mel, (0, frames - mel.shape[-1]), value=math.log(self.mel_config.log_floor))
        return mel

    @torch.no_grad()
    def generate_mel(self, captions: list[str], frames: int, steps: int | None = 50, sampler: str | None = None,
                     guidance: float = 3.5, seed: int = 0, neighbours: list[list[str]] | None = None,
                     noise: torch.Tensor | None = None, init_mel: torch.Tensor | None = None,
                     strength: float = 1.0, inputs: dict[str, Any] | None = None,
                     guidance_drop: Sequence[str] | None = None) -> torch.Tensor:
        """Log-mels ``(B, n_mels, frames)`` for ``captions``.

        Retrieval: the given ``neighbours``, or an index query with the prompts' CLAP text
        embeddings. ``noise``: the initial latents ``(B, *codec.latent_shape(frames))`` instead of
        the seeded draw; ``init_mel`` ``(B, n_mels, frames)`` with ``strength`` < 1: edit that audio
        towards the captions (AudioLDM's style transfer). ``sampler`` None: the noise process's
        default (DDIM for DDPM, Euler for flows); ``inputs``: further conditioner inputs (the keys
        an extra conditioner reads); ``guidance_drop``: the conditioners the unconditional branch
        drops (all by default).
        """
        if neighbours is None:
            neighbours = self.query_neighbours(captions)
        cond = self.model.conditioning({**(inputs or {}), "captions": captions, "neighbours": neighbours})
        g = torch.Generator().manual_seed(seed)
        shape = self.codec.latent_shape(frames)
        if noise is not None and tuple(noise.shape) != (len(captions), *shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(len(captions), *shape)}")
        init = None
        if init_mel is not None:
            expected = (len(captions), self.mel_config.n_mels, frames)
            if tuple(init_mel.shape) != expected:
                raise ValueError(f"init_mel has shape {tuple(init_mel.shape)}, expected {expected}")
            init = self.codec.encode(init_mel.to(self.device, torch.float32), sample=False)
        z = self.model.sample(cond, shape, steps=steps, sampler=sampler, guidance=guidance, guidance_drop=guidance_drop,
                              generator=g, noise=noise, init=init, strength=strength)
        return self.codec.decode(z.to(next(self.codec.parameters()).dtype), frames)
