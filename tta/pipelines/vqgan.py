"""`VQGANPipeline`: inference of the text-to-sound VQGAN (``vqgan_prior`` models).

Prompt -> text prefix -> codes drawn by the GPT2 prior -> frozen VQGAN decoder -> log-mel ->
vocoder (MelGAN in the paper; any vocoder on the same mels, `check_composition` refuses others).
Vocoding, candidate re-ranking, output checks, saving and the folder format are the `Pipeline`
base's (`tta.pipelines.base`). A folder stores the components the generator declares
(``prior``, ``vqgan``, ``text_encoder``; the No-Feat vector in ``conditioners``); its model config
names the VQGAN network instead of its checkpoint, while a text encoder's local folder (or CLAP
checkpoint) stays referenced by path, as in the other pipelines.

Sampling options: ``top_k``, ``top_p``, ``temperature`` (defaults: the module's, the paper's top-k
512), ``guidance`` (classifier-free guidance scale; 1 = off, the default; other values need a prior
trained with ``cfg_dropout > 0``), ``sampler`` ``"top_k"`` (draw) or ``"greedy"`` (argmax).
**Steps**: the prior draws one code per step and the number of codes follows from the duration
(`CodePriorGenerator.codes_for`), so ``steps`` is refused, never reinterpreted; the generation's
``settings`` record the codes drawn as ``steps``. **Duration**: default the longest clip the prior
was trained for (``max_duration``: 10 s in the paper config); longer is refused naming that bound.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tta.generators.vqgan.prior_generator import CodePriorGenerator
from tta.pipelines.base import DEFAULTS, Generation, Pipeline
from tta.pipelines.ldm import component_network
from tta.registry import register
from tta.utils.errors import UsageError, check_float, check_int

log = logging.getLogger(__name__)

__all__ = ["SAMPLERS", "VQGANPipeline"]

#: the VQGAN pipeline's samplers: a draw after temperature / top-k / top-p, or the argmax
SAMPLERS = ("top_k", "greedy")


def _no_steps(steps: Any) -> None:
    if steps is not None:
        raise UsageError(f"steps={steps}: the VQGAN pipeline has no sampling steps to choose; its prior draws one "
                         "code per step and the number of codes follows from the duration: leave steps out")


def _check_sampler(sampler: Any) -> None:
    if sampler is not None and sampler not in SAMPLERS:
        raise UsageError(f"sampler {sampler!r}: the VQGAN pipeline samples codes with {' or '.join(SAMPLERS)} "
                         "(a draw after temperature / top-k / top-p, or the argmax); the diffusion samplers do not apply")


def check_sampling(top_k: Any = None, top_p: Any = None, temperature: Any = None) -> dict[str, Any]:
    """The given code-sampling options, checked (`UsageError` naming a bad one); None values dropped."""
    out: dict[str, Any] = {}
    if top_k is not None:
        out["top_k"] = check_int("top_k", top_k)
    if top_p is not None:
        out["top_p"] = check_float("top_p", top_p, low=0.0, low_open=True, high=1.0)
    if temperature is not None:
        out["temperature"] = check_float("temperature", temperature, low=0.0, low_open=True)
    return out


@register("pipeline", "vqgan_pipeline")
class VQGANPipeline(Pipeline):
    """Prompts -> waveforms for a `CodePriorGenerator` (see the module docstring).

    ``generate(prompts, duration=None, guidance=None, seed=0, sampler=None, candidates=None,
    allow_silent=False, top_k=None, top_p=None, temperature=None)``; ``steps`` must be None.
    """

    module_kind = "vqgan_prior"
    generator: CodePriorGenerator

    @torch.no_grad()
    def generate(self, prompts: str | list[str], duration: float | None = None, steps: int | None = None,
                 guidance: float | None = None, seed: int | Sequence[int] = 0, sampler: str | None = None,
                 candidates: int | None = None, allow_silent: bool = False, **inputs: Any) -> Generation:
        """`Pipeline.generate` with the number of codes for ``duration`` as its steps (``steps``
        refused; ``duration`` None: the pipeline's default)."""
        _no_steps(steps)
        _check_sampler(sampler)
        duration = self.defaults["duration"] if duration is None else duration
        codes = self.generator.codes_for(self.frames_for(self.check_duration(duration)))
        return super().generate(prompts, duration, steps=codes, guidance=guidance, seed=seed, sampler=sampler,
                                candidates=candidates, allow_silent=allow_silent, **inputs)

    def __call__(self, prompts: str | list[str], duration: float | None = None, **kwargs: Any) -> list[torch.Tensor]:
        """Waveforms (one 1-D tensor per prompt) at `sample_rate`."""
        return list(self.generate(prompts, duration, **kwargs).wav)

    def sample(self, prompts: list[str], frames: int, *, steps: int, sampler: str, guidance: float,
               seed: int | list[int], candidates: int, duration: float, top_k: int | None = None,
               top_p: float | None = None, temperature: float | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        gen, n = self.generator, candidates
        _check_sampler(sampler)
        if steps != gen.codes_for(frames):
            raise ValueError(f"steps {steps} != the {gen.codes_for(frames)} codes of {frames} frames")
        if isinstance(seed, list):  # each prompt's candidates drawn from its own generator, in order
            per_prompt = [torch.Generator().manual_seed(s) for s in seed]
            gens: Any = [g for g in per_prompt for _ in range(n)]
        else:
            gens = torch.Generator().manual_seed(seed)
        given = check_sampling(top_k, top_p, temperature)
        opts = gen.sampling_options(**{**{k: self.defaults.get(k) for k in ("top_k", "top_p", "temperature")}, **given})
        codes = gen.generate_codes([p for p in prompts for _ in range(n)], steps, generator=gens, guidance=guidance,
                                   greedy=sampler == "greedy", **opts)
        return gen.decode_codes(codes, frames), {"settings": {**opts, "codes": steps}}

    @classmethod
    def sampling_defaults(cls, generator: nn.Module, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """``given`` over the generator's code-sampling defaults, CFG off (1.0), sampler ``top_k``,
        duration = max_duration = the longest clip the prior reads; ``steps`` is refused."""
        given = {k: v for k, v in (given or {}).items() if v is not None}
        _no_steps(given.get("steps"))
        _check_sampler(given.get("sampler"))
        check_sampling(given.get("top_k"), given.get("top_p"), given.get("temperature"))
        longest = round(generator.max_duration, 6)
        own = {k: v for k, v in DEFAULTS.items() if k != "steps"}
        own.update(sampler="top_k", guidance=1.0, duration=longest, max_duration=longest, **generator.sampling)
        return {**own, **given}

    @classmethod
    def portable_config(cls, config: dict[str, Any], module: nn.Module) -> dict[str, Any]:
        """The ``model`` config with ``vqgan_checkpoint`` replaced by the VQGAN network's config."""
        init = dict(config["init_args"])
        path = init.pop("vqgan_checkpoint", None)
        if path:
            init["vqgan"] = component_network(path, "autoencoder")
        return {"class_path": config["class_path"], "init_args": init}
