"""`DreamAudioModule` (registered ``dreamaudio``): trains DreamAudio (paper Sec. III).

A `LatentDiffusionModule` without CLAP FiLM (``clap`` None) whose conditioners are DreamAudio's:

- ``prompt``: Flan-T5 token states of the target caption (``text_token_context``, fixed length 50);
- ``refcap``: the K reference captions' Flan-T5 states concatenated (`ReferenceCaptions`; built
  without an encoder it shares the prompt's);
- ``references``: the K reference latents R (`ReferenceLatents`; route ``reference`` for the MRC
  UNet, ``concat`` for the plain-UNet variant).

The batch's references (``reference_wav`` ``(B, K, T)``, ``reference_present`` ``(B, K)``,
``reference_captions``; served by the ``reference_audio`` datamodule, `tta.data.references`) are
turned into log-mels, augmented in training (content masking ``reference_mask_p`` = 10 %, the
masked span set to the log floor, i.e. silence; dropping ``reference_drop_p`` = 40 %, latents and
captions together; `tta.data.customize_augment`), and encoded by the frozen VAE (posterior mean)
here, in the module: the conditioners only read the resulting inputs. Cached T5 states of the
reference captions in the batch (the datamodule's ``text_cache``: ``reference_t5_tokens`` /
``reference_t5_mask``) go to `ReferenceCaptions` instead of running the frozen T5; they are checked
against its encoder at fit start (`check_cached_conditions`). The objective defaults to
rectified flow (`RectifiedFlow`); give ``process: {class_path: ddpm}`` for the DDPM variant.
Every other argument is `LatentDiffusionModule`'s.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from tta.data.customize_augment import MASK_SPAN, drop_references, mask_reference_content
from tta.generators.conditioning import Conditioner
from tta.generators.conditioning.base import check_probability
from tta.generators.dreamaudio.conditioning import (
    LATENT_SIZE,
    REF_CACHED_TOKENS,
    REFERENCES,
    ReferenceLatents,
    share_text_encoder,
)
from tta.generators.dreamaudio.generator import DreamAudioGenerator
from tta.generators.ldm.module import LatentDiffusionModule
from tta.generators.ldm.shard_conditions import REF_T5_MASK_KEY, REF_T5_TOKENS_KEY, cached_tokens
from tta.generators.noise import NoiseProcess, RectifiedFlow
from tta.registry import register

log = logging.getLogger(__name__)

#: batch entries of a reference batch (`tta.data.references`)
BATCH_KEYS = ("reference_wav", "reference_present", "reference_captions")


@register("module", "dreamaudio")
class DreamAudioModule(LatentDiffusionModule):
    """DreamAudio: a latent rectified flow over a UNet conditioned on a prompt and K references.

    Args:
        unet: the velocity network (`tta.nn.mrc_unet.MRCUNet`, or a `UNetModel` with
            ``in_channels`` = 2 x latent channels for the concat variant).
        conditioners: ``{"prompt", "refcap", "references", ...}`` (see the module docstring); a
            ``references`` conditioner (`ReferenceLatents`) is required.
        num_references: K (the datamodule's must agree; the paper: 3).
        reference_seconds: length of each reference clip (padded/cropped; the datamodule's must agree).
        reference_mask_p, reference_drop_p, reference_mask_span: the training augmentation of the
            references (paper III-E: 10 % masking, 40 % dropping; docs/dreamaudio_data.md).
        process: the noise process (default: rectified flow, s = 1e-5).
        **kwargs: `LatentDiffusionModule`'s (``vae_checkpoint``, ``lr``, ``warmup_steps``, ...).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        conditioners: dict[str, Conditioner],
        num_references: int = 3,
        reference_seconds: float = 10.24,
        reference_mask_p: float = 0.1,
        reference_drop_p: float = 0.4,
        reference_mask_span: tuple[float, float] = MASK_SPAN,
        process: NoiseProcess | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(conditioners.get(REFERENCES), ReferenceLatents):
            raise TypeError(f"DreamAudioModule needs a {REFERENCES!r} conditioner of class reference_latents "
                            f"(the reference latents); got {sorted(conditioners)}")
        share_text_encoder(conditioners)
        process = process if process is not None else RectifiedFlow()
        super().__init__(unet=unet, conditioners=conditioners, process=process, **kwargs)
        if self.model.text is not None:
            raise ValueError("DreamAudio has no CLAP FiLM: leave clap / clap_checkpoint out")
        if num_references < 1 or not reference_seconds > 0:
            raise ValueError(f"num_references must be >= 1 and reference_seconds > 0, got {num_references}, "
                             f"{reference_seconds}")
        self.num_references, self.reference_seconds = int(num_references), float(reference_seconds)
        self.reference_mask_p = check_probability(reference_mask_p, "reference_mask_p")
        self.reference_drop_p = check_probability(reference_drop_p, "reference_drop_p")
        self.reference_mask_span = (float(reference_mask_span[0]), float(reference_mask_span[1]))

    @property
    def generator(self) -> DreamAudioGenerator:
        """The pure inference model (same submodules as this module; see `LatentDiffusionModule`)."""
        gen = self.__dict__.get("_generator")
        if gen is None:
            gen = self.__dict__["_generator"] = DreamAudioGenerator(
                self.frontend, self.codec, self.model, self.num_references, self.reference_seconds)
        return gen

    def on_fit_start(self) -> None:
        """Refuse a datamodule serving another K or reference length than this model's."""
        super().on_fit_start()
        dm = getattr(self.trainer, "datamodule", None)
        for attr in ("num_references", "reference_seconds"):
            theirs = getattr(dm, attr, None)
            if theirs is not None and not math.isclose(float(theirs), float(getattr(self, attr))):
                raise ValueError(f"the datamodule's {attr} is {theirs} but the model's is {getattr(self, attr)}; "
                                 "give both the same value")

    # ---------------------------------------------------------------------- inputs
    def reference_batch_inputs(self, batch: dict[str, Any], augment: bool,
                               generator: torch.Generator | None = None) -> dict[str, Any]:
        """The conditioners' reference inputs of a batch (augmented when ``augment``)."""
        missing = [key for key in BATCH_KEYS if key not in batch]
        if missing:
            raise KeyError(f"DreamAudio batches need {list(BATCH_KEYS)}; this one lacks {missing}: use the "
                           "reference_audio datamodule (tta.data.references)")
        gen = self.generator
        mels, present = gen.reference_mels(batch["reference_wav"]), batch["reference_present"].to(self.device)
        if augment:
            silence = math.log(self.mel_config.log_floor)
            mels, _ = mask_reference_content(mels, present, self.reference_mask_p, generator,
                                             self.reference_mask_span, value=silence)
            mels, present, _ = drop_references(mels, present, self.reference_drop_p, generator, value=silence)
        return gen.reference_inputs(mels, present, batch["reference_captions"])

    def condition_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`LatentDiffusionModule.condition_inputs` plus the references (augmented in training), the
        reference captions' cached token states when the batch carries them, and the latents' size."""
        inputs = super().condition_inputs(batch)
        inputs.update(self.reference_batch_inputs(batch, self.training, self.step_generator(salt=1)))
        tokens = cached_tokens(batch, REF_T5_TOKENS_KEY, REF_T5_MASK_KEY)
        if tokens is not None:
            inputs[REF_CACHED_TOKENS] = tokens
        inputs[LATENT_SIZE] = self.codec.latent_shape(batch["mel"].shape[-1])[1:]
        return inputs

    def demo_outputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """For the demo callback: the real mels and generations with the batch's references."""
        refs = self.reference_batch_inputs(batch, augment=False)
        gen = self.generator.generate_mel(list(batch["caption"]), batch["mel"].shape[-1], steps=25, references=refs)
        return {"input": batch["mel"], "generated": gen}
