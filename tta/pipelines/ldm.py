"""`TextToAudioPipeline`: inference of AudioLDM / Re-AudioLDM (``latent_diffusion`` models).

It samples the pure `LatentAudioGenerator` (conditioning, retrieval, noise process, VAE decoding)
and adds AudioLDM's style transfer (``init_audio`` / ``strength``); vocoding, candidate
re-ranking, output checks, saving and the pipeline folder format are the `Pipeline` base's
(`tta.pipelines.base`). A folder stores the components the generator declares (``unet``,
``vae``, ``clap``) and ``conditioners`` (the prompt's null embedding, retrieval projections);
the model config in it names every network (component checkpoints replaced by their configs),
and config entries listed in ``relative_paths`` (e.g. the text encoder folder an importer copied
in) are resolved against the folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tta.generators.ldm.generator import LatentAudioGenerator
from tta.pipelines.base import (
    DEFAULTS,
    Generation,
    Pipeline,
    export_pipeline,
    load_pipeline,
    write_components,
)
from tta.registry import register

log = logging.getLogger(__name__)

__all__ = ["DEFAULTS", "Generation", "TextToAudioPipeline", "export_pipeline", "load_pipeline",
           "self_contained_model_config", "write_components"]


@register("pipeline", "latent_diffusion_pipeline")
class TextToAudioPipeline(Pipeline):
    """Prompts -> waveforms for a `LatentAudioGenerator`.

    ``generate(prompts, duration, steps, guidance, seed, sampler, candidates, allow_silent,
    noise=None, init_audio=None, strength=1.0)`` (`Pipeline.generate`): ``noise`` the initial
    latents ``(len(prompts) * candidates, C, h, w)`` instead of the seeded draw (e.g. to reproduce
    another implementation's run); ``init_audio`` ``(T,)`` (for every prompt) or
    ``(len(prompts), T)`` at `sample_rate`, padded/cropped to ``duration``, with ``strength`` in
    (0, 1): AudioLDM's style transfer, that audio re-generated towards the prompts (small strength
    keeps more of it). ``conditioner_inputs``: what further conditioners read, one entry per prompt
    (lists or batch-first tensors; repeated for the candidates). ``guidance_drop``: the
    conditioners guidance's unconditional branch drops (default all). ``rerank_clap`` defaults to the model's own CLAP, which must then have an
    audio tower (imported public AudioLDM pipelines have only the text tower: give a full CLAP).
    """

    module_kind = "latent_diffusion"
    generator: LatentAudioGenerator

    def sample(self, prompts: list[str], frames: int, *, steps: int, sampler: str, guidance: float,
               seed: int | list[int], candidates: int, duration: float, noise: torch.Tensor | None = None,
               init_audio: torch.Tensor | None = None, strength: float = 1.0,
               conditioner_inputs: dict[str, Any] | None = None,
               guidance_drop: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
        gen, n = self.generator, candidates
        if isinstance(seed, list):
            noise = self.seeded_noise(seed, n, frames) if noise is None else noise
            seed = seed[0]  # only the stochastic ddpm sampler's step noise still comes from the batch's seed
        neighbours = gen.query_neighbours(prompts)
        expanded = [p for p in prompts for _ in range(n)]
        expanded_nb = None if neighbours is None else [nb for nb in neighbours for _ in range(n)]
        init_mel = None if init_audio is None else self._init_mel(init_audio, len(prompts), n, duration, frames)
        mel = gen.generate_mel(expanded, frames, steps=steps, sampler=sampler, guidance=guidance, seed=seed,
                               neighbours=expanded_nb, noise=noise, init_mel=init_mel, strength=strength,
                               inputs=_per_candidate(conditioner_inputs or {}, len(prompts), n),
                               guidance_drop=guidance_drop)
        return mel, {"neighbours": neighbours, "settings": {"strength": strength}}

    def seeded_noise(self, seeds: list[int], candidates: int, frames: int) -> torch.Tensor:
        """Initial latents ``(len(seeds) * candidates, *latent_shape)``: each prompt's candidates
        drawn (CPU, float32) from its own seed, as a batch of that prompt alone would draw them."""
        shape = (candidates, *self.generator.codec.latent_shape(frames))
        return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])

    def default_rerank_clap(self) -> nn.Module | None:
        text = self.generator.model.text
        return None if text is None else text.clap

    @classmethod
    def sampling_defaults(cls, generator: nn.Module, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """``given`` over the noise process's sampler / steps (DDPM: DDIM 200, AudioLDM's;
        rectified flow: its own) over `DEFAULTS`."""
        process = generator.model.process
        own = {"sampler": process.default_sampler, "steps": process.default_steps}
        return {**DEFAULTS, **own, **{k: v for k, v in (given or {}).items() if v is not None}}

    @classmethod
    def portable_config(cls, config: dict[str, Any], module: nn.Module) -> dict[str, Any]:
        return self_contained_model_config(config, module)

    @classmethod
    def folder_extras(cls, module: nn.Module) -> dict[str, Any]:
        retrieval = module.model.retrieval
        return {"retrieval": None if retrieval is None else {
            "index": retrieval.index_dir, "features": retrieval.features_dir, "k": retrieval.k, "mode": retrieval.mode}}

    def _init_mel(self, audio: torch.Tensor, batch: int, n: int, duration: float, frames: int) -> torch.Tensor:
        """Log-mels ``(batch * n, n_mels, frames)`` of the audio to edit."""
        from tta.data.audio import pad_or_crop

        wav = audio.float()[None] if audio.dim() == 1 else audio.float()
        if wav.dim() != 2 or wav.shape[0] not in (1, batch):
            raise ValueError(f"init_audio must be (T,) or ({batch}, T) for {batch} prompts, got {tuple(audio.shape)}")
        wav = pad_or_crop(wav, round(duration * self.sample_rate)).expand(batch, -1)
        return self.generator.audio_mels(wav, frames).repeat_interleave(n, dim=0)


def _per_candidate(inputs: dict[str, Any], batch: int, n: int) -> dict[str, Any]:
    """Per-prompt conditioner inputs repeated for each prompt's ``n`` candidates."""
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if len(value) != batch:
            raise ValueError(f"conditioner_inputs[{key!r}] has {len(value)} entries for {batch} prompts")
        out[key] = (value.repeat_interleave(n, dim=0) if torch.is_tensor(value)
                    else [v for v in value for _ in range(n)])
    return out


# ------------------------------------------------------------------------- folders
def component_network(path: str, attr: str) -> dict[str, Any]:
    """The ``model.init_args.<attr>`` network config stored in the ``tta fit`` checkpoint ``path``."""
    from tta.training.loading import model_config
    from tta.utils.weights import load_checkpoint

    if not Path(path).is_file():
        raise FileNotFoundError(f"the component checkpoint {path} recorded in the run config no longer exists")
    net = model_config(load_checkpoint(path), path)["init_args"].get(attr)
    if net is None:
        raise KeyError(f"{path}: the stored config has no model.init_args.{attr}")
    return net


def self_contained_model_config(config: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """The ``model`` config with component checkpoints replaced by their network configs."""
    init = dict(config["init_args"])
    for key, network, attr in (("vae_checkpoint", "vae", "autoencoder"), ("clap_checkpoint", "clap", "clap")):
        path = init.pop(key, None)
        if path:
            init[network] = component_network(path, attr)
    init["scale_factor"] = module.codec.scale_factor
    init["init_from"] = None
    return {"class_path": config["class_path"], "init_args": init}
