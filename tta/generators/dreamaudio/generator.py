"""`DreamAudioGenerator`: the pure inference model of DreamAudio (prompt + K reference concepts).

A `LatentAudioGenerator` (front-end, frozen VAE codec, `LatentDiffusion` with the MRC UNet) that
also turns reference audio into the conditioners' inputs: waveforms -> log-mels (the generator's
front-end, each reference padded/cropped to ``reference_seconds``) -> VAE posterior means (scaled
latents; absent references are zeros). The training module (`tta.generators.dreamaudio.module`)
calls the same methods, so references are encoded identically in training and at generation.

Guidance (``guidance_drop``) drops the prompt (``"prompt"``), the references (``"references"``:
the reference latents *and* their captions) or both (``"both"``, the default), or any list of
conditioner names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tta.data.audio import pad_or_crop
from tta.data.mel import MelFrontend
from tta.generators.dreamaudio.conditioning import (
    LATENT_SIZE,
    PROMPT,
    REF_CAPTIONS,
    REF_LATENTS,
    REF_PRESENT,
    REFCAP,
    REFERENCES,
)
from tta.generators.ldm.generator import LatentAudioGenerator
from tta.generators.ldm.model import LatentDiffusion
from tta.generators.vae.codec import LatentCodec

__all__ = ["GUIDANCE_DROPS", "DreamAudioGenerator"]

#: ``guidance_drop`` shorthands -> the conditioners the unconditional branch drops (None: all)
GUIDANCE_DROPS: dict[str, tuple[str, ...] | None] = {
    "prompt": (PROMPT,), "references": (REFERENCES, REFCAP), "both": None,
}


class DreamAudioGenerator(LatentAudioGenerator):
    """Prompts + references -> log-mels.

    Args:
        frontend, codec, model: as `LatentAudioGenerator`.
        num_references: K, the references per sample the model was trained with (fewer are
            padded with absent ones; more are refused: fine-tune a `ReferenceAlignment` for them).
        reference_seconds: the length every reference clip is padded/cropped to.
    """

    def __init__(self, frontend: MelFrontend, codec: LatentCodec, model: LatentDiffusion, num_references: int,
                 reference_seconds: float) -> None:
        super().__init__(frontend, codec, model)
        if num_references < 1 or not reference_seconds > 0:
            raise ValueError(f"num_references must be >= 1 and reference_seconds > 0, got {num_references}, "
                             f"{reference_seconds}")
        self.num_references = int(num_references)
        self.reference_seconds = float(reference_seconds)

    @property
    def reference_samples(self) -> int:
        """Samples of one reference clip."""
        return round(self.reference_seconds * self.mel_config.sample_rate)

    @property
    def reference_frames(self) -> int:
        """Mel frames of one reference clip."""
        return self.frames_for(self.reference_seconds)

    # ------------------------------------------------------------------ references
    def reference_mels(self, wav: torch.Tensor) -> torch.Tensor:
        """Log-mels ``(B, K, n_mels, reference_frames)`` of reference waveforms ``(B, K, T)``
        (each padded/cropped to ``reference_seconds``)."""
        if wav.dim() != 3:
            raise ValueError(f"reference waveforms must be (B, K, T), got {tuple(wav.shape)}")
        b, k = wav.shape[:2]
        flat = pad_or_crop(wav.reshape(b * k, -1).float(), self.reference_samples)
        return self.audio_mels(flat, self.reference_frames).reshape(b, k, self.mel_config.n_mels, -1)

    def no_references(self, batch: int) -> dict[str, Any]:
        """The conditioner inputs of ``batch`` samples without references (a general item)."""
        shape = (batch, self.num_references, *self.codec.latent_shape(self.reference_frames))
        return {REF_LATENTS: torch.zeros(shape, device=self.device),
                REF_PRESENT: torch.zeros(batch, self.num_references, dtype=torch.bool, device=self.device),
                REF_CAPTIONS: [[""] * self.num_references for _ in range(batch)]}

    def reference_inputs(self, mels: torch.Tensor, present: torch.Tensor,
                         captions: Sequence[Sequence[str]]) -> dict[str, Any]:
        """The conditioner inputs of reference log-mels ``(B, K', n_mels, frames)`` with ``present``
        ``(B, K')`` and ``captions`` (B lists of K'), K' <= K padded to K with absent references."""
        b, k = present.shape
        if mels.dim() != 4 or tuple(mels.shape[:2]) != (b, k) or present.dtype != torch.bool:
            raise ValueError(f"reference mels must be (B, K, n_mels, frames) with a bool present (B, K); got "
                             f"{tuple(mels.shape)} and {present.dtype} {tuple(present.shape)}")
        if k > self.num_references:
            raise ValueError(f"{k} references given; this model was trained with {self.num_references} "
                             "(fine-tune a reference_align layer for more)")
        if len(captions) != b or any(len(row) != k for row in captions):
            raise ValueError(f"reference captions must be {b} lists of {k}, got lengths {[len(r) for r in captions]}")
        out = self.no_references(b)
        present = present.to(self.device)
        if present.any():
            z = self.codec.encode(mels.reshape(b * k, *mels.shape[2:]).to(self.device, torch.float32), sample=False)
            z = z.reshape(b, k, *z.shape[1:]) * present[:, :, None, None, None]
            if z.shape[2:] != out[REF_LATENTS].shape[2:]:
                raise ValueError(f"reference mels of {mels.shape[-1]} frames give latents {tuple(z.shape[2:])}; "
                                 f"this model's references are {self.reference_frames} frames ({self.reference_seconds} s)")
            out[REF_LATENTS][:, :k] = z
        out[REF_PRESENT][:, :k] = present
        out[REF_CAPTIONS] = [[*row, *[""] * (self.num_references - k)] for row in captions]
        return out

    def encode_references(self, wav: torch.Tensor, present: torch.Tensor,
                          captions: Sequence[Sequence[str]]) -> dict[str, Any]:
        """`reference_inputs` of reference waveforms ``(B, K', T)`` at the front-end's sample rate."""
        return self.reference_inputs(self.reference_mels(wav), present, captions)

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def guidance_names(drop: str | Sequence[str] | None) -> list[str] | None:
        """Conditioner names for a ``guidance_drop`` (a `GUIDANCE_DROPS` shorthand, or names)."""
        if drop is None:
            return None
        if isinstance(drop, str):
            if drop not in GUIDANCE_DROPS:
                raise ValueError(f"guidance_drop {drop!r}: give one of {sorted(GUIDANCE_DROPS)} or conditioner names")
            names = GUIDANCE_DROPS[drop]
            return None if names is None else list(names)
        return list(drop)

    @torch.no_grad()
    def generate_mel(self, captions: list[str], frames: int, steps: int | None = 50, sampler: str | None = None,
                     guidance: float = 2.0, seed: int = 0, *, references: dict[str, Any] | None = None,
                     guidance_drop: str | Sequence[str] | None = "both", inputs: dict[str, Any] | None = None,
                     **kwargs: Any) -> torch.Tensor:
        """Log-mels ``(B, n_mels, frames)`` for ``captions`` customised by ``references`` (the
        inputs `encode_references` / `reference_inputs` return, one row per caption; None and no
        reference entries in ``inputs``: no references). Other arguments as
        `LatentAudioGenerator.generate_mel` (CFG 2.0 by default, the paper's)."""
        inputs = dict(inputs or {})
        if references is not None:
            inputs.update(references)
        elif REF_LATENTS not in inputs:
            inputs.update(self.no_references(len(captions)))
        inputs[LATENT_SIZE] = self.codec.latent_shape(frames)[1:]
        return super().generate_mel(captions, frames, steps=steps, sampler=sampler, guidance=guidance, seed=seed,
                                    inputs=inputs, guidance_drop=self.guidance_names(guidance_drop), **kwargs)
