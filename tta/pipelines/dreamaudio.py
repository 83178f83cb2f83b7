"""`DreamAudioPipeline`: customized generation from a prompt and reference (audio, caption) pairs.

``pipe("a monster is fighting with a minion", references=[("monster.wav", "a monster roars"),
("minion.wav", "a minion talks")])`` returns one waveform per prompt. A reference's audio is a
file path (read and resampled) or a 1-D tensor at the pipeline's sample rate; every reference is
padded/cropped to the model's ``reference_seconds``, encoded by the model's VAE and given to the
MRC UNet with its caption. ``references`` is one list for every prompt, or one list per prompt
(lists may be shorter than the model's K: the rest are absent; None: no references).
``guidance_drop`` picks guidance's unconditional branch: ``"both"`` (default: no prompt and no
references), ``"prompt"`` or ``"references"``. Defaults: the process's sampler and steps (rectified
flow: Euler, 25), CFG 2.0 (the paper's).

Everything else (folders, vocoding, candidates, saving) is `TextToAudioPipeline`'s. For a CLI,
`parse_references` turns ``PATH=CAPTION`` strings into the ``references`` argument.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tta.generators.dreamaudio.conditioning import REF_CAPTIONS
from tta.generators.dreamaudio.generator import DreamAudioGenerator
from tta.pipelines.ldm import TextToAudioPipeline
from tta.registry import register
from tta.utils.errors import UsageError

__all__ = ["DREAMAUDIO_GUIDANCE", "DreamAudioPipeline", "parse_references"]

#: the paper's classifier-free guidance scale
DREAMAUDIO_GUIDANCE = 2.0

AudioLike = str | os.PathLike | torch.Tensor
ReferenceList = Sequence[tuple[AudioLike, str]]


def parse_references(values: Sequence[str]) -> list[tuple[str, str]]:
    """``["PATH=CAPTION", ...]`` (e.g. ``--ref monster.wav="a monster roars"``) as ``[(PATH, CAPTION)]``;
    `UsageError` naming the value when the path or the caption is empty or the file is missing."""
    out = []
    for value in values:
        path, sep, caption = value.partition("=")
        if not sep or not path.strip() or not caption.strip():
            raise UsageError(f"--ref {value!r}: expected PATH=CAPTION (e.g. dog.wav=\"a dog barks\")")
        if not Path(path).is_file():
            raise UsageError(f"--ref {value!r}: no such audio file {path}")
        out.append((path, caption.strip()))
    return out


@register("pipeline", "dreamaudio_pipeline")
class DreamAudioPipeline(TextToAudioPipeline):
    """Prompts + references -> waveforms for a `DreamAudioGenerator` (see the module docstring)."""

    module_kind = "dreamaudio"
    generator: DreamAudioGenerator

    def sample(self, prompts: list[str], frames: int, *, references: Any = None,
               conditioner_inputs: dict[str, Any] | None = None, **kwargs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        inputs = {**(conditioner_inputs or {}), **self.reference_inputs(references, len(prompts))}
        mel, extras = super().sample(prompts, frames, conditioner_inputs=inputs, **kwargs)
        captions = [[c for c in row if c] for row in inputs[REF_CAPTIONS]]
        extras["settings"] = {**extras.get("settings", {}), "references": captions,
                              "guidance_drop": kwargs.get("guidance_drop") or "both"}
        return mel, extras

    def reference_inputs(self, references: Any, batch: int) -> dict[str, Any]:
        """The conditioner inputs of ``references`` for ``batch`` prompts (see the module docstring)."""
        gen = self.generator
        if references is None:
            return gen.no_references(batch)
        rows = _per_prompt(references, batch)
        k = max(len(row) for row in rows)
        if k == 0:
            return gen.no_references(batch)
        wav = torch.zeros(batch, k, gen.reference_samples)
        present = torch.zeros(batch, k, dtype=torch.bool)
        captions = [[""] * k for _ in range(batch)]
        for i, row in enumerate(rows):
            for j, (audio, caption) in enumerate(row):
                if not isinstance(caption, str) or not caption.strip():
                    raise UsageError(f"references[{j}] of prompt {i}: the caption must be a non-empty string")
                wav[i, j] = self._reference_audio(audio, gen.reference_samples, f"references[{j}] of prompt {i}")
                present[i, j], captions[i][j] = True, caption
        return gen.encode_references(wav, present, captions)

    def _reference_audio(self, audio: AudioLike, samples: int, what: str) -> torch.Tensor:
        from tta.data.audio import load_audio, pad_or_crop

        if isinstance(audio, (str, os.PathLike)):
            wav, _ = load_audio(audio, target_sr=self.sample_rate)
        elif torch.is_tensor(audio) and audio.dim() == 1 and audio.numel() > 0:
            wav = audio.float().cpu()
        else:
            raise UsageError(f"{what}: the audio must be a file path or a non-empty 1-D tensor at "
                             f"{self.sample_rate} Hz, got {type(audio).__name__}")
        return pad_or_crop(wav, samples)

    def default_rerank_clap(self) -> nn.Module | None:
        return None  # DreamAudio has no CLAP: re-ranking candidates needs rerank_clap

    @classmethod
    def sampling_defaults(cls, generator: nn.Module, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """`TextToAudioPipeline.sampling_defaults` with CFG 2.0 (the paper's) unless ``given``."""
        own = {**super().sampling_defaults(generator), "guidance": DREAMAUDIO_GUIDANCE}
        return {**own, **{k: v for k, v in (given or {}).items() if v is not None}}


def _per_prompt(references: Any, batch: int) -> list[list[tuple[AudioLike, str]]]:
    """One list of (audio, caption) per prompt: a flat list is shared by every prompt."""
    if not isinstance(references, (list, tuple)):
        raise UsageError(f"references must be a list of (audio, caption) pairs, got {type(references).__name__}")
    if not references or _is_pair(references[0]):
        shared = [_pair(r, j) for j, r in enumerate(references)]
        return [shared] * batch
    if len(references) != batch:
        raise UsageError(f"references: {len(references)} lists given for {batch} prompts (one list per prompt, "
                         "or one list of (audio, caption) pairs for all)")
    return [[_pair(r, j) for j, r in enumerate(row)] for row in references]


def _is_pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], str)


def _pair(value: Any, j: int) -> tuple[AudioLike, str]:
    if not _is_pair(value):
        raise UsageError(f"references[{j}]: expected an (audio, caption) pair, got {value!r:.80}")
    return value[0], value[1]
