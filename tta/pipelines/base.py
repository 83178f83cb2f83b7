"""`Pipeline`: the inference composition every text-to-audio system shares, and the folders.

A pipeline holds a pure generator (a trained module's ``generator``: e.g.
`tta.generators.ldm.generator.LatentAudioGenerator`) and a vocoder. The base does what every
system does around sampling — check prompts, expand candidates, vocode, crop to the duration,
re-rank candidates by a CLAP text-audio score, refuse broken output (`check_output`), write WAVs,
spectrogram PNGs and a JSONL manifest. A subclass (one per system, registered as kind
``pipeline``) samples log-mels (``sample``) and names the module kind it serves
(``module_kind``), so a pipeline folder's ``kind`` and a checkpoint's module resolve to it
through the registry.

A pipeline folder::

    pipeline.json            format, kind, mel front-end, the model config (every network as
                             class_path/init_args), the vocoder config, sampling defaults,
                             system extras (e.g. retrieval references), provenance
    <component>.safetensors  one file per part the generator declares (``generator.components()``,
                             e.g. unet, vae, clap), ``conditioners`` for the rest of its weights
    vocoder.safetensors      the vocoder
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from tta.data.mel import MelConfig
from tta.pipelines.guard import check_output
from tta.registry import components
from tta.utils.errors import check_float, check_int
from tta.utils.pipeline_folder import FORMAT, PIPELINE_FILE, VOCODER, component_state, model_state, read_pipeline_meta
from tta.vocoders.base import Vocoder
from tta.vocoders.factory import check_composition

log = logging.getLogger(__name__)

#: the component file holding every generator weight no declared component takes
REST = "conditioners"
DEFAULTS = {"steps": 200, "sampler": "ddim", "guidance": 3.5, "candidates": 1}
#: seconds: the longest clip a pipeline generates unless its folder's ``defaults.max_duration`` says otherwise
MAX_DURATION = 327.68


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


class Pipeline:
    """Prompts -> waveforms around a system's sampler (subclasses implement `sample`).

    Args:
        generator: the pure inference model (eval mode); it has ``mel_config``, ``frames_for``
            and ``components()``.
        vocoder: a `Vocoder` on the generator's mel front-end.
        defaults: sampling defaults (``steps``, ``sampler``, ``guidance``, ``candidates``).
        rerank_clap: the CLAP that scores candidates (``candidates > 1``); default:
            `default_rerank_clap`.
    """

    #: the registered module kind whose checkpoints and folders this pipeline serves
    module_kind: ClassVar[str] = ""

    def __init__(self, generator: nn.Module, vocoder: Vocoder, defaults: dict[str, Any] | None = None,
                 rerank_clap: nn.Module | None = None) -> None:
        check_composition(generator.mel_config, vocoder, f"the {self.module_kind} generator and the vocoder")
        self.generator = generator.eval()
        self.vocoder = vocoder.eval()
        self.defaults = self.sampling_defaults(generator, defaults)
        self.rerank_clap = None if rerank_clap is None else rerank_clap.eval()

    # ------------------------------------------------------------ system hooks
    def sample(self, prompts: list[str], frames: int, *, steps: int, sampler: str, guidance: float,
               seed: int | list[int], candidates: int, duration: float,
               **inputs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """Log-mels ``(len(prompts) * candidates, n_mels, frames)`` (each prompt's candidates
        adjacent) and extras: ``neighbours`` (one list per prompt) and ``settings`` to record.
        ``seed``: the batch's, or one per prompt (each prompt's clips then drawn from its own)."""
        raise NotImplementedError

    def default_rerank_clap(self) -> nn.Module | None:
        """The CLAP scoring candidates when none is given (None: re-ranking needs one)."""
        return None

    @classmethod
    def sampling_defaults(cls, generator: nn.Module, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """``given`` (None values dropped) over the system's defaults over `DEFAULTS`."""
        return {**DEFAULTS, **{k: v for k, v in (given or {}).items() if v is not None}}

    @classmethod
    def portable_config(cls, config: dict[str, Any], module: nn.Module) -> dict[str, Any]:
        """The ``model`` config of a checkpoint made independent of other files (for a folder)."""
        return config

    @classmethod
    def folder_extras(cls, module: nn.Module) -> dict[str, Any]:
        """System entries of ``pipeline.json`` (e.g. retrieval references)."""
        return {}

    # ------------------------------------------------------------------ common
    @property
    def mel_config(self) -> MelConfig:
        return self.generator.mel_config

    @property
    def sample_rate(self) -> int:
        return self.mel_config.sample_rate

    def to(self, device: torch.device | str) -> Pipeline:
        for part in (self.generator, self.vocoder, self.rerank_clap):
            if part is not None:
                part.to(device)
        return self

    @property
    def max_duration(self) -> float:
        """The longest clip (seconds) generated in one pass: the folder's ``defaults.max_duration``,
        else `MAX_DURATION` (latents and attention grow with the duration; longer clips are
        refused by name instead of failing in an allocation)."""
        return float(self.defaults.get("max_duration", MAX_DURATION))

    def check_duration(self, duration: Any, name: str = "duration") -> float:
        """``duration`` if finite and in (0, `max_duration`], else `UsageError` naming ``name`` and the bound."""
        return check_float(name, duration, low=0.0, low_open=True, high=self.max_duration,
                           what_high="the pipeline's max_duration")

    def frames_for(self, duration: float) -> int:
        """Mel frames covering ``duration`` seconds."""
        return self.generator.frames_for(duration)

    @torch.no_grad()
    def generate(self, prompts: str | list[str], duration: float = 10.24, steps: int | None = None,
                 guidance: float | None = None, seed: int | Sequence[int] = 0, sampler: str | None = None,
                 candidates: int | None = None, allow_silent: bool = False, **inputs: Any) -> Generation:
        """One clip per prompt (the best of ``candidates`` by CLAP text-audio score); ``inputs``:
        the system's further arguments (see its `sample`). ``seed``: one for the batch, or one per
        prompt (a list), which makes each clip independent of the batch it is generated in."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError(f"prompts must be non-empty strings, got {prompts!r}")
        if not isinstance(seed, int):
            seed = [int(s) for s in seed]
            if len(seed) != len(prompts):
                raise ValueError(f"seed: {len(seed)} seeds given for {len(prompts)} prompts (one per prompt)")
        d = self.defaults
        steps = check_int("steps", d["steps"] if steps is None else steps)
        guidance = check_float("guidance", d["guidance"] if guidance is None else guidance)
        n = check_int("candidates", d["candidates"] if candidates is None else candidates)
        sampler = d["sampler"] if sampler is None else sampler
        self.check_duration(duration)
        mel, extras = self.sample(prompts, self.frames_for(duration), steps=steps, sampler=sampler, guidance=guidance,
                                  seed=seed, candidates=n, duration=duration, **inputs)
        wav = self.vocode(mel, duration)
        scores = None
        if n > 1:
            wav, mel, scores = self._rerank(prompts, wav, mel, n)
        flags = check_output(wav, allow_silent=allow_silent, names=prompts)
        settings = {"steps": steps, "sampler": sampler, "guidance": guidance, "candidates": n,
                    **extras.get("settings", {}),
                    "rerank_clap": "separate" if n > 1 and self.rerank_clap is not None else None}
        return Generation(wav.cpu(), mel.cpu(), self.sample_rate, prompts, scores, extras.get("neighbours"), flags,
                          settings)

    def __call__(self, prompts: str | list[str], duration: float = 10.24, **kwargs: Any) -> list[torch.Tensor]:
        """Waveforms (one 1-D tensor per prompt) at `sample_rate`."""
        return list(self.generate(prompts, duration, **kwargs).wav)

    def vocode(self, mel: torch.Tensor, duration: float) -> torch.Tensor:
        """Waveforms ``(B, T)`` of log-mels, cropped to ``duration`` seconds."""
        wav = self.vocoder(mel.to(next(self.vocoder.parameters(), mel).dtype)).float()
        return wav[..., : round(duration * self.sample_rate)]

    def _rerank(self, prompts: list[str], wav: torch.Tensor, mel: torch.Tensor,
                n: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        from tta.data.audio import resample

        clap = self.rerank_clap if self.rerank_clap is not None else self.default_rerank_clap()
        if clap is None:
            raise ValueError("candidates > 1 needs a CLAP to re-rank them: give rerank_clap")
        device = next(clap.parameters()).device
        audio = resample(wav, self.sample_rate, clap.sample_rate).to(device)
        sims = (clap.embed_audio(audio).float() * clap.embed_text(
            [p for p in prompts for _ in range(n)]).float()).sum(-1).view(len(prompts), n)
        best = sims.argmax(dim=1).cpu()
        rows = torch.arange(len(prompts)) * n + best
        return wav[rows.to(wav.device)], mel[rows.to(mel.device)], sims.max(dim=1).values.tolist()

    def save(self, gen: Generation, out: Path, ids: list[str], record: dict[str, Any],
             stems: list[str] | None = None) -> list[dict[str, Any]]:
        """Write ``<stem>.wav`` and ``<stem>.png`` per clip into ``out`` (``stems``: file names,
        default the ids); the manifest rows (``record`` over the generation's settings, plus
        neighbours and CLAP score, under ``generation``)."""
        from tta.data.audio import save_audio
        from tta.utils.plots import save_spectrograms

        rows = []
        for j, (clip_id, stem, prompt) in enumerate(zip(ids, stems or ids, gen.prompts, strict=True)):
            save_audio(out / f"{stem}.wav", gen.wav[j], gen.sample_rate)
            save_spectrograms(out / f"{stem}.png", {prompt: gen.mel[j]}, self.mel_config)
            rows.append({
                "id": clip_id, "audio": f"{stem}.wav", "captions": [prompt], "split": "generated",
                "duration": gen.wav.shape[-1] / gen.sample_rate, "sample_rate": gen.sample_rate,
                "generation": {**gen.settings, **record,
                               "neighbours": None if gen.neighbours is None else gen.neighbours[j],
                               "clap_score": None if gen.clap_scores is None else gen.clap_scores[j]},
            })
        return rows


# ------------------------------------------------------------------------- folders
def pipeline_class(kind: str) -> type[Pipeline]:
    """The registered pipeline serving module kind ``kind`` (a folder's ``kind``)."""
    served = {cls.module_kind: cls for cls in components("pipeline")["pipeline"].values()}
    if kind not in served:
        raise ValueError(f"no pipeline serves the model kind {kind!r}; pipelines exist for {sorted(served)}")
    return served[kind]


def untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous tensors of a state dict, a tensor that shares storage with an earlier
    one (tied weights, e.g. T5's input embedding under two names) copied: safetensors refuses
    shared storage, and loading the copy fills the tied parameter with the same values."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        value = value.detach()
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone().contiguous() if (ptr in seen and value.numel()) else value.contiguous()
        seen.add(ptr)
    return out


def write_components(generator: nn.Module, vocoder: nn.Module, out: Path) -> dict[str, str]:
    """Write the generator's declared components (the rest as `REST`) and the vocoder as
    safetensors files (keys as in the generator's state dict); their file names by component."""
    from safetensors.torch import save_file

    from tta.utils.files import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    state = untied(generator.state_dict())
    names = {id(m): name for name, m in generator.named_modules()}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for part, module in generator.components().items():
        if id(module) not in names:
            raise ValueError(f"component {part!r} is not a submodule of the {type(generator).__name__}")
        prefix = names[id(module)] + "."
        parts[part] = {k: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
    parts[REST] = state
    parts[VOCODER] = untied(vocoder.state_dict())
    files: dict[str, str] = {}
    for part, tensors in parts.items():
        files[part] = f"{part}.safetensors"
        with atomic_path(out / files[part]) as tmp:
            save_file(tensors, str(tmp))
    return files


def write_meta(out: Path, meta: dict[str, Any]) -> None:
    """Write ``pipeline.json`` (atomically)."""
    from tta.utils.files import atomic_path

    with atomic_path(out / PIPELINE_FILE) as tmp:
        tmp.write_text(json.dumps({"format": FORMAT, **meta}, indent=2))


def export_pipeline(checkpoint: str | os.PathLike, out: str | os.PathLike, vocoder: str = "universal",
                    use_ema: bool = True, defaults: dict[str, Any] | None = None) -> Path:
    """Write a pipeline folder from the checkpoint of any module a registered pipeline serves."""
    from tta.training.loading import model_config, trained_from_checkpoint
    from tta.utils.weights import load_checkpoint
    from tta.vocoders.factory import vocoder_spec

    ckpt = load_checkpoint(checkpoint)
    use_ema = use_ema and ckpt.get("ema") is not None
    module = trained_from_checkpoint(ckpt, checkpoint, use_ema=use_ema)
    kind = getattr(type(module), "registry_name", type(module).__name__)
    cls = pipeline_class(kind)
    voc, voc_config = vocoder_spec(vocoder, module.mel_config)
    out = Path(out)
    write_meta(out, {
        "kind": kind,
        "mel": module.mel_config.to_dict(),
        "model": cls.portable_config(model_config(ckpt, checkpoint), module),
        "vocoder": voc_config,
        "files": write_components(module.generator, voc, out),
        "defaults": cls.sampling_defaults(module.generator, defaults),
        **cls.folder_extras(module),
        "source": {"checkpoint": str(Path(checkpoint).resolve()), "ema": use_ema},
    })
    log.info("exported the %s pipeline to %s", kind, out)
    return out


def load_pipeline(path: str | os.PathLike, vocoder: str | None = None,
                  device: torch.device | str = "cpu") -> Pipeline:
    """The pipeline of a folder, or of a checkpoint plus ``vocoder`` (``"universal"``,
    ``"griffinlim"`` or a vocoder checkpoint); the pipeline class comes from the registry."""
    from tta.training.loading import build_model, load_trained
    from tta.utils.weights import load_state_dict_strict
    from tta.vocoders.factory import build_vocoder_from_config, vocoder_spec

    path = Path(path)
    if path.is_file():
        module = load_trained(path)
        cls = pipeline_class(getattr(type(module), "registry_name", type(module).__name__))
        voc, _ = vocoder_spec(vocoder or "universal", module.mel_config)
        return cls(module.generator, voc).to(device)
    meta = read_pipeline_meta(path)
    cls = pipeline_class(meta.get("kind", ""))
    module = build_model(meta["model"])
    MelConfig.from_dict(meta["mel"]).check_compatible(module.mel_config, f"{path / PIPELINE_FILE} and its model config")
    generator = module.generator
    load_state_dict_strict(generator, model_state(path, meta), source=str(path))
    if vocoder is None:
        voc = build_vocoder_from_config(meta["vocoder"])
        load_state_dict_strict(voc, component_state(path, meta, VOCODER), source=str(path / VOCODER))
    else:
        voc, _ = vocoder_spec(vocoder, module.mel_config)
    return cls(generator.eval(), voc, meta.get("defaults")).to(device)
