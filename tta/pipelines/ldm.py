"""Text-to-audio inference for AudioLDM / Re-AudioLDM, and self-describing pipeline folders.

A pipeline folder::

    pipeline.json          format, kind, mel front-end, the model config (every network as
                           class_path/init_args), the vocoder config, sampling defaults,
                           retrieval references (index + feature store), provenance
    unet.safetensors       the denoiser
    vae.safetensors        the mel VAE
    clap.safetensors       CLAP (text tower for FiLM and retrieval queries, audio tower for
                           re-ranking candidates)
    conditioners.safetensors   the prompt's null embedding, retrieval projections
    vocoder.safetensors    the vocoder

`export_pipeline` writes one from a ``latent_diffusion`` checkpoint (`tta.pipelines.audioldm_import`
from a public diffusers AudioLDM folder); `load_pipeline` rebuilds it (strict loading, mel
front-ends of VAE and vocoder checked to agree). Config entries listed in ``relative_paths``
(e.g. the text encoder folder an importer copied in) are resolved against the pipeline folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tta.data.mel import MelConfig
from tta.generators.ldm.module import LatentDiffusionModule
from tta.pipelines.guard import check_output
from tta.utils.pipeline_folder import FORMAT, PIPELINE_FILE, component_state, read_pipeline_meta
from tta.vocoders.base import Vocoder
from tta.vocoders.factory import check_composition

log = logging.getLogger(__name__)

#: component file -> state-dict prefix inside `LatentDiffusionModule` ("" = everything left)
COMPONENTS = {"unet": "model.unet.", "vae": "codec.", "clap": "model.text.clap.", "conditioners": ""}
DEFAULTS = {"steps": 200, "sampler": "ddim", "guidance": 3.5, "candidates": 1}


@dataclass
class Generation:
    """Waveforms ``(B, T)``, their log-mels, CLAP scores (when re-ranked) and retrieved neighbours."""

    wav: torch.Tensor
    mel: torch.Tensor
    sample_rate: int
    prompts: list[str]
    clap_scores: list[float] | None = None
    neighbours: list[list[str]] | None = None
    flags: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # steps, sampler, guidance, candidates used


class TextToAudioPipeline:
    """Prompts -> waveforms: conditioning, sampling, VAE decoding, vocoding, candidate re-ranking.

    Args:
        module: a (trained) `LatentDiffusionModule` (eval mode).
        vocoder: a `Vocoder` on the same mel front-end as the module.
        defaults: sampling defaults (``steps``, ``sampler``, ``guidance``, ``candidates``).
        rerank_clap: the CLAP that scores candidates (``candidates > 1``); default: the model's own,
            which must then have an audio tower (imported public AudioLDM pipelines have only the
            text tower: give a full CLAP here, e.g. a ``clap_trainer`` checkpoint's).
    """

    def __init__(self, module: LatentDiffusionModule, vocoder: Vocoder, defaults: dict[str, Any] | None = None,
                 rerank_clap: torch.nn.Module | None = None) -> None:
        check_composition(module.mel_config, vocoder, "the diffusion model's VAE and the vocoder")
        self.module = module.eval()
        self.vocoder = vocoder.eval()
        self.defaults = pipeline_defaults(module, defaults)
        self.rerank_clap = None if rerank_clap is None else rerank_clap.eval()

    @property
    def mel_config(self) -> MelConfig:
        return self.module.mel_config

    @property
    def sample_rate(self) -> int:
        return self.mel_config.sample_rate

    def to(self, device: torch.device | str) -> TextToAudioPipeline:
        self.module.to(device)
        self.vocoder.to(device)
        if self.rerank_clap is not None:
            self.rerank_clap.to(device)
        return self

    def frames_for(self, duration: float) -> int:
        """Mel frames covering ``duration`` seconds (see `LatentDiffusionModule.frames_for`)."""
        return self.module.frames_for(duration)

    @torch.no_grad()
    def generate(self, prompts: str | list[str], duration: float = 10.24, steps: int | None = None,
                 guidance: float | None = None, seed: int = 0, sampler: str | None = None,
                 candidates: int | None = None, allow_silent: bool = False,
                 noise: torch.Tensor | None = None, init_audio: torch.Tensor | None = None,
                 strength: float = 1.0) -> Generation:
        """Generate one clip per prompt (the best of ``candidates`` by CLAP text-audio score).

        ``noise``: initial latents ``(len(prompts) * candidates, C, h, w)`` instead of the seeded
        draw (e.g. to reproduce another implementation's run). ``init_audio`` ``(T,)`` (for every
        prompt) or ``(len(prompts), T)`` at `sample_rate`, padded/cropped to ``duration``, with
        ``strength`` in (0, 1): AudioLDM's style transfer, that audio re-generated towards the
        prompts (small strength keeps more of it).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError(f"prompts must be non-empty strings, got {prompts!r}")
        d = self.defaults
        steps, guidance = int(steps or d["steps"]), float(guidance if guidance is not None else d["guidance"])
        sampler, n = sampler or d["sampler"], int(candidates or d["candidates"])
        if n < 1:
            raise ValueError(f"candidates must be >= 1, got {n}")
        frames = self.frames_for(duration)
        model = self.module.model
        neighbours = None
        if model.retrieval is not None:
            neighbours = model.retrieval.query_neighbours(model.text.embed(prompts))
        expanded = [p for p in prompts for _ in range(n)]
        expanded_nb = None if neighbours is None else [nb for nb in neighbours for _ in range(n)]
        init_mel = None if init_audio is None else self._init_mel(init_audio, len(prompts), n, duration, frames)
        mel = self.module.generate_mel(expanded, frames, steps=steps, sampler=sampler, guidance=guidance, seed=seed,
                                       neighbours=expanded_nb, noise=noise, init_mel=init_mel, strength=strength)
        wav = self.vocoder(mel.to(next(self.vocoder.parameters(), mel).dtype)).float()
        wav = wav[..., : round(duration * self.sample_rate)]
        scores = None
        if n > 1:
            wav, mel, scores = self._rerank(prompts, wav, mel, n)
        flags = check_output(wav, allow_silent=allow_silent, names=prompts)
        settings = {"steps": steps, "sampler": sampler, "guidance": guidance, "candidates": n, "strength": strength,
                    "rerank_clap": "separate" if n > 1 and self.rerank_clap is not None else None}
        return Generation(wav.cpu(), mel.cpu(), self.sample_rate, prompts, scores, neighbours, flags, settings)

    def __call__(self, prompts: str | list[str], duration: float = 10.24, **kwargs: Any) -> list[torch.Tensor]:
        """Waveforms (one 1-D tensor per prompt) at `sample_rate`."""
        return list(self.generate(prompts, duration, **kwargs).wav)

    def _init_mel(self, audio: torch.Tensor, batch: int, n: int, duration: float, frames: int) -> torch.Tensor:
        """Log-mels ``(batch * n, n_mels, frames)`` of the audio to edit."""
        from tta.data.audio import pad_or_crop

        wav = audio.float()[None] if audio.dim() == 1 else audio.float()
        if wav.dim() != 2 or wav.shape[0] not in (1, batch):
            raise ValueError(f"init_audio must be (T,) or ({batch}, T) for {batch} prompts, got {tuple(audio.shape)}")
        wav = pad_or_crop(wav, round(duration * self.sample_rate)).expand(batch, -1)
        mel = self.module.frontend(wav.to(self.module.device))[..., :frames]
        if mel.shape[-1] < frames:  # the front-end's frame count for this length: pad with the log floor
            mel = torch.nn.functional.pad(mel, (0, frames - mel.shape[-1]), value=math.log(self.mel_config.log_floor))
        return mel.repeat_interleave(n, dim=0)

    def _rerank(self, prompts: list[str], wav: torch.Tensor, mel: torch.Tensor,
                n: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        from tta.data.audio import resample

        clap = self.rerank_clap if self.rerank_clap is not None else self.module.model.text.clap
        device = next(clap.parameters()).device
        audio = resample(wav, self.sample_rate, clap.sample_rate).to(device)
        sims = (clap.embed_audio(audio).float() * clap.embed_text(
            [p for p in prompts for _ in range(n)]).float()).sum(-1).view(len(prompts), n)
        best = sims.argmax(dim=1).cpu()
        rows = torch.arange(len(prompts)) * n + best
        return wav[rows.to(wav.device)], mel[rows.to(mel.device)], sims.max(dim=1).values.tolist()


# ------------------------------------------------------------------------- folders
def _component_network(path: str, attr: str) -> dict[str, Any]:
    from tta.training.loading import model_config
    from tta.utils.weights import load_checkpoint

    if not Path(path).is_file():
        raise FileNotFoundError(f"the component checkpoint {path} recorded in the run config no longer exists")
    net = model_config(load_checkpoint(path), path)["init_args"].get(attr)
    if net is None:
        raise KeyError(f"{path}: the stored config has no model.init_args.{attr}")
    return net


def self_contained_model_config(config: dict[str, Any], module: LatentDiffusionModule) -> dict[str, Any]:
    """The ``model`` config with component checkpoints replaced by their network configs."""
    init = dict(config["init_args"])
    for key, network, attr in (("vae_checkpoint", "vae", "autoencoder"), ("clap_checkpoint", "clap", "clap")):
        path = init.pop(key, None)
        if path:
            init[network] = _component_network(path, attr)
    init["scale_factor"] = module.codec.scale_factor
    init["init_from"] = None
    return {"class_path": config["class_path"], "init_args": init}


def write_components(module: LatentDiffusionModule, vocoder: torch.nn.Module, out: Path) -> dict[str, str]:
    """Write the module's `COMPONENTS` and the vocoder as safetensors files; their names by component."""
    from safetensors.torch import save_file

    from tta.utils.files import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    files: dict[str, str] = {}
    for name, prefix in COMPONENTS.items():
        taken = {k: v for k, v in state.items() if k.startswith(prefix)} if prefix else dict(state)
        for k in taken:
            state.pop(k)
        files[name] = f"{name}.safetensors"
        with atomic_path(out / files[name]) as tmp:
            save_file(taken, str(tmp))
    files["vocoder"] = "vocoder.safetensors"
    with atomic_path(out / files["vocoder"]) as tmp:
        save_file({k: v.detach().contiguous() for k, v in vocoder.state_dict().items()}, str(tmp))
    return files


def pipeline_defaults(module: LatentDiffusionModule, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sampling defaults of a pipeline: ``given`` (None values dropped) over the noise process's
    sampler / steps (DDPM: DDIM 200, AudioLDM's; rectified flow: its own) over `DEFAULTS`."""
    process = module.model.process
    own = {"sampler": process.default_sampler, "steps": process.default_steps}
    return {**DEFAULTS, **own, **{k: v for k, v in (given or {}).items() if v is not None}}


def export_pipeline(checkpoint: str | os.PathLike, out: str | os.PathLike, vocoder: str = "universal",
                    use_ema: bool = True, defaults: dict[str, Any] | None = None) -> Path:
    """Write a pipeline folder from a ``latent_diffusion`` checkpoint and a vocoder spec."""
    from tta.pipelines.vocoder import vocoder_spec
    from tta.training.loading import model_config, trained_from_checkpoint
    from tta.utils.files import atomic_path
    from tta.utils.weights import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    use_ema = use_ema and ckpt.get("ema") is not None
    module = trained_from_checkpoint(ckpt, checkpoint, use_ema=use_ema)
    if not isinstance(module, LatentDiffusionModule):
        raise TypeError(f"{checkpoint} is a {type(module).__name__} checkpoint, not a latent_diffusion one")
    voc, voc_config = vocoder_spec(vocoder, module.mel_config)
    out = Path(out)
    files = write_components(module, voc, out)
    retrieval = module.model.retrieval
    meta = {
        "format": FORMAT,
        "kind": "latent_diffusion",
        "mel": module.mel_config.to_dict(),
        "model": self_contained_model_config(model_config(ckpt, checkpoint), module),
        "vocoder": voc_config,
        "files": files,
        "defaults": pipeline_defaults(module, defaults),
        "retrieval": None if retrieval is None else {
            "index": retrieval.index_dir, "features": retrieval.features_dir, "k": retrieval.k, "mode": retrieval.mode},
        "source": {"checkpoint": str(Path(checkpoint).resolve()), "ema": use_ema},
    }
    with atomic_path(out / PIPELINE_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    log.info("exported pipeline to %s", out)
    return out


def load_pipeline(path: str | os.PathLike, vocoder: str | None = None,
                  device: torch.device | str = "cpu") -> TextToAudioPipeline:
    """A `TextToAudioPipeline` from a pipeline folder, or from a ``latent_diffusion`` checkpoint
    plus ``vocoder`` (``"universal"``, ``"griffinlim"`` or a vocoder checkpoint)."""
    from tta.pipelines.vocoder import build_vocoder_from_config, vocoder_spec
    from tta.training.loading import build_model, load_trained
    from tta.utils.weights import load_state_dict_strict

    path = Path(path)
    if path.is_file():
        module = load_trained(path)
        voc, _ = vocoder_spec(vocoder or "universal", module.mel_config)
        return TextToAudioPipeline(module, voc).to(device)
    meta = read_pipeline_meta(path)
    module = build_model(meta["model"])
    MelConfig.from_dict(meta["mel"]).check_compatible(module.mel_config, f"{path / PIPELINE_FILE} and its model config")
    state: dict[str, torch.Tensor] = {}
    for name in COMPONENTS:
        state.update(component_state(path, meta, name))
    load_state_dict_strict(module, state, source=str(path))
    voc = build_vocoder_from_config(meta["vocoder"])
    if vocoder is None:
        load_state_dict_strict(voc, component_state(path, meta, "vocoder"), source=str(path / "vocoder"))
    else:
        voc, _ = vocoder_spec(vocoder, module.mel_config)
    return TextToAudioPipeline(module.eval(), voc, meta.get("defaults")).to(device)
