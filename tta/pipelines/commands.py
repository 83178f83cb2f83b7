"""``tta generate`` (prompts, or the captions of a manifest's items -> WAV + spectrogram PNG + a
manifest), ``tta pipeline export`` and ``tta pipeline import-audioldm``."""

from __future__ import annotations

import argparse
import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tta.generators.noise import DDPMProcess, RectifiedFlow
from tta.utils.errors import UsageError, check_float, check_int

log = logging.getLogger(__name__)

#: every sampler of tta's noise processes (a pipeline refuses the ones its process lacks)
SAMPLER_CHOICES = DDPMProcess.samplers + RectifiedFlow.samplers
#: seconds per clip when neither ``--duration`` nor the manifest item gives one
DEFAULT_DURATION = 10.24


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tta generate", description="Text-to-audio generation.")
    p.add_argument("prompt", nargs="*", help="one or more prompts (or --prompts FILE, or --manifest FILE)")
    p.add_argument("--prompts", type=Path, help="a text file with one prompt per line")
    p.add_argument("--manifest", type=Path,
                   help="generate one clip per item of this JSONL manifest, named by its id (for `tta eval`)")
    p.add_argument("--split", help="with --manifest: only the items of this split (default: every item)")
    p.add_argument("--caption-index", type=int,
                   help="with --manifest: which caption of each item is the prompt (default 0, the first)")
    p.add_argument("--pipeline", required=True, type=Path, help="a pipeline folder or a latent_diffusion checkpoint")
    p.add_argument("--vocoder", help="universal | griffinlim | a vocoder checkpoint (default: the pipeline's)")
    p.add_argument("--duration", type=float,
                   help=f"seconds per clip (default: the pipeline's, else {DEFAULT_DURATION}; with --manifest each "
                        f"item's own duration, where it has one)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the pipeline's; VQGAN pipelines refuse it)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 3.5)")
    p.add_argument("--sampler", choices=SAMPLER_CHOICES,
                   help="default: the pipeline's (DDPM models: ddim; rectified flow: euler)")
    p.add_argument("--candidates", type=int, help="clips sampled per prompt, best kept by CLAP score (default 1)")
    p.add_argument("--rerank-clap", type=Path,
                   help="a clap_trainer checkpoint whose CLAP scores the candidates (default: the pipeline's; "
                        "imported public AudioLDM pipelines hold only CLAP's text tower)")
    p.add_argument("--seed", type=int, default=0,
                   help="clip i's seed is SEED + i (--manifest: SEED + crc32(item id)), whatever the batch")
    p.add_argument("--init-audio", type=Path,
                   help="style transfer (AudioLDM): re-generate this audio file towards each prompt")
    p.add_argument("--strength", type=float, default=None,
                   help="with --init-audio: how far to move from it, in (0, 1] (default 0.5)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--device", default="cpu")
    p.add_argument("--index", type=Path, help="retrieve from this `tta index build` directory (Re-AudioLDM)")
    p.add_argument("--ref", action="append", default=None, metavar="PATH=CAPTION",
                   help="a reference clip and its caption for every prompt (DreamAudio pipelines; repeat for several)")
    p.add_argument("--top-k", type=int, help="VQGAN pipelines: keep the K most probable codes (default: the pipeline's)")
    p.add_argument("--top-p", type=float, help="VQGAN pipelines: nucleus sampling mass in (0, 1] (default: off)")
    p.add_argument("--temperature", type=float, help="VQGAN pipelines: code sampling temperature > 0 (default 1)")
    p.add_argument("--allow-silent", action="store_true", help="write silent clips (with a warning) instead of failing")
    p.add_argument("--out", type=Path, default=Path("generations"))
    return p


@dataclass
class Job:
    """One clip to generate: its manifest id, file stem, prompt, seed and duration, and what its
    manifest row adds (``fields`` at the top, ``record`` under ``generation``)."""

    id: str
    stem: str
    prompt: str
    seed: int
    duration: float | None  # None: the pipeline's default
    fields: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    references: list[tuple[str, str]] = field(default_factory=list)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """Prompts from the command line and/or a file (blank lines and ``#`` comments skipped)."""
    prompts = list(args.prompt)
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise FileNotFoundError(f"prompt file {args.prompts} does not exist")
        lines = args.prompts.read_text(encoding="utf-8").splitlines()
        prompts += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UsageError("no prompts: give them as arguments, with --prompts FILE or with --manifest FILE")
    return prompts


def prompt_jobs(args: argparse.Namespace) -> list[Job]:
    """The clips of the prompts: ids ``<index>_<prompt>``, clip i seeded ``seed + i``."""
    from tta.utils.plots import safe_name

    duration = args.duration  # None: the pipeline's default (`generate`)
    jobs = []
    for i, prompt in enumerate(read_prompts(args)):
        clip_id = f"{i:04d}_{safe_name(prompt)[:48]}"
        jobs.append(Job(clip_id, clip_id, prompt, args.seed + i, duration))
    return jobs


def manifest_jobs(args: argparse.Namespace) -> list[Job]:
    """One clip per item of ``--manifest`` (of ``--split``): its caption ``--caption-index``,
    its id, file stem ``safe_name(id)``, seed ``seed + crc32(id)``, its duration unless
    ``--duration`` is given, its labels and its reference clips (a customized manifest's
    ``references``, recorded under ``generation.references``)."""
    from tta.data.customize_refs import item_references
    from tta.data.manifest import ManifestError, read_manifest, select_split
    from tta.utils.plots import safe_name

    if args.prompt or args.prompts is not None:
        raise UsageError("--manifest takes the prompts from the manifest: give no prompts and no --prompts")
    k = 0 if args.caption_index is None else args.caption_index
    items = select_split(read_manifest(args.manifest), args.split, args.manifest)
    jobs, stems = [], {}
    for item in items:
        if len(item.captions) <= k:
            raise ManifestError(args.manifest, None, f"item {item.id!r} has no caption {k} "
                                f"(it has {len(item.captions)})", "captions")
        stem = safe_name(item.id)
        if stem in stems:
            raise ManifestError(args.manifest, None, f"items {stems[stem]!r} and {item.id!r} both make the file "
                                f"name {stem}.wav", "id")
        stems[stem] = item.id
        duration = args.duration if args.duration is not None else item.duration or None
        refs = [(str(r.audio), r.caption) for r in item_references(item, Path(args.manifest).parent,
                                                                    manifest=args.manifest)]
        record = {"source_manifest": str(args.manifest), "split": args.split, "caption_index": k}
        if refs:
            record["references"] = [{"audio": a, "caption": c} for a, c in refs]
        jobs.append(Job(item.id, stem, item.captions[k], args.seed + zlib.crc32(item.id.encode("utf-8")), duration,
                        {"labels": list(item.labels)}, record, refs))
    return jobs


def batches(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    """Batches of at most ``size`` clips of one duration each (in order of first appearance)."""
    check_int("--batch-size", size)
    by_duration: dict[float, list[Job]] = {}
    for job in jobs:
        by_duration.setdefault(job.duration, []).append(job)
    for group in by_duration.values():
        for start in range(0, len(group), size):
            yield group[start : start + size]


def generate(args: argparse.Namespace) -> int:
    """Generate every prompt (or manifest item) in batches; write WAVs, PNGs and ``generations.jsonl``
    (rows in prompt / manifest order)."""
    from tta.pipelines.base import load_pipeline

    check_arguments(args)
    jobs = prompt_jobs(args) if args.manifest is None else manifest_jobs(args)
    pipe = load_pipeline(args.pipeline, vocoder=args.vocoder, device=args.device)
    for job in jobs:
        job.duration = float(pipe.defaults.get("duration", DEFAULT_DURATION)) if job.duration is None else job.duration
        pipe.check_duration(job.duration, "--duration" if args.duration is not None else f"duration of item {job.id!r}")
    if args.rerank_clap is not None:
        from tta.encoders.clap_towers import load_clap_network

        pipe.rerank_clap = load_clap_network(args.rerank_clap).to(args.device)
    inputs = _system_inputs(args, pipe)
    item_refs = _item_references(jobs, pipe, args)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"pipeline": str(args.pipeline),
              "rerank_clap": None if args.rerank_clap is None else str(args.rerank_clap),
              "init_audio": None if args.init_audio is None else str(args.init_audio),
              "references": args.ref}
    rows: dict[str, dict[str, Any]] = {}
    for batch in batches(jobs, args.batch_size):
        gen = pipe.generate([job.prompt for job in batch], duration=batch[0].duration, steps=args.steps,
                            guidance=args.guidance, seed=[job.seed for job in batch], sampler=args.sampler,
                            candidates=args.candidates, allow_silent=args.allow_silent, **inputs,
                            **({"references": [job.references for job in batch]} if item_refs else {}))
        saved = pipe.save(gen, args.out, [job.id for job in batch], record, stems=[job.stem for job in batch])
        for job, row in zip(batch, saved, strict=True):
            row.update(job.fields)
            row["generation"].update(seed=job.seed, **job.record)
            rows[job.id] = row
        log.info("generated %d/%d clips", len(rows), len(jobs))
    manifest = args.out / "generations.jsonl"
    manifest.write_text("".join(json.dumps(rows[job.id], ensure_ascii=False) + "\n" for job in jobs),
                        encoding="utf-8")
    log.info("wrote %d clips and %s", len(rows), manifest)
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse, by name, option values no pipeline can use (the duration's upper bound is checked
    against the loaded pipeline's ``max_duration``); nothing given is replaced by a default."""
    if args.manifest is None and (args.split is not None or args.caption_index is not None):
        raise UsageError("--split and --caption-index select manifest items: they need --manifest")
    for name, value, minimum in (("--steps", args.steps, 1), ("--candidates", args.candidates, 1),
                                 ("--batch-size", args.batch_size, 1), ("--caption-index", args.caption_index, 0)):
        if value is not None:
            check_int(name, value, minimum)
    if args.guidance is not None:
        check_float("--guidance", args.guidance)
    if args.duration is not None:
        check_float("--duration", args.duration, low=0.0, low_open=True)
    if args.top_k is not None:
        check_int("--top-k", args.top_k)
    if args.top_p is not None:
        check_float("--top-p", args.top_p, low=0.0, low_open=True, high=1.0)
    if args.temperature is not None:
        check_float("--temperature", args.temperature, low=0.0, low_open=True)
    if args.strength is not None:
        if args.init_audio is None:
            raise UsageError("--strength needs --init-audio (the audio to edit)")
        check_float("--strength", args.strength, low=0.0, low_open=True, high=1.0)


def check_index_clap(index: Path, clap: Any, what: str) -> None:
    """Refuse an index built with another CLAP than ``clap`` (`tta.retrieval.compat`)."""
    from tta.retrieval.compat import check_embedding_content, clap_content_hashes
    from tta.retrieval.index import META_FILE

    meta_path = Path(index) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"--index {index}: no index there (missing {META_FILE}); build one with `tta index build`")
    check_embedding_content(json.loads(meta_path.read_text()), clap_content_hashes(clap), str(index), what)


def _item_references(jobs: list[Job], pipe: Any, args: argparse.Namespace) -> bool:
    """Whether the manifest items' own references go to the pipeline: a DreamAudio pipeline takes
    them (items without references get none); another pipeline generates from the caption alone
    (logged). ``--ref`` together with a manifest whose items carry references is refused."""
    if not any(job.references for job in jobs):
        return False
    from tta.pipelines.dreamaudio import DreamAudioPipeline

    if args.ref:
        raise UsageError(f"--ref given but the items of --manifest {args.manifest} carry their own references: "
                         "give one or the other")
    if not isinstance(pipe, DreamAudioPipeline):
        log.info("the items of %s carry references; %s takes none and generates from the captions alone",
                 args.manifest, type(pipe).__name__)
        for job in jobs:  # the rows record what conditioned the generation: references did not
            job.record.pop("references", None)
        return False
    return True


def _system_inputs(args: argparse.Namespace, pipe: Any) -> dict[str, Any]:
    """The system options: ``--index`` (Re-AudioLDM's datastore), ``--init-audio`` / ``--strength``
    (style transfer), ``--ref`` (DreamAudio's reference clips), ``--top-k`` / ``--top-p`` /
    ``--temperature`` (a VQGAN prior's code sampling)."""
    inputs: dict[str, Any] = {}
    codes = {"top_k": args.top_k, "top_p": args.top_p, "temperature": args.temperature}
    if any(v is not None for v in codes.values()):
        from tta.pipelines.vqgan import VQGANPipeline

        if not isinstance(pipe, VQGANPipeline):
            raise UsageError(f"--top-k / --top-p / --temperature given but the pipeline {args.pipeline} "
                             f"({type(pipe).__name__}) samples no codes (a VQGAN prior pipeline does)")
        inputs.update({k: v for k, v in codes.items() if v is not None})
    if args.ref:
        from tta.pipelines.dreamaudio import DreamAudioPipeline, parse_references

        if not isinstance(pipe, DreamAudioPipeline):
            raise UsageError(f"--ref given but the pipeline {args.pipeline} ({type(pipe).__name__}) takes no "
                             "reference clips (a DreamAudio pipeline does)")
        inputs["references"] = parse_references(args.ref)
    if args.index is not None:
        retrieval = getattr(getattr(pipe.generator, "model", None), "retrieval", None)
        if retrieval is None:
            raise UsageError(f"--index given but the pipeline {args.pipeline} does not retrieve (plain AudioLDM)")
        check_index_clap(args.index, pipe.generator.model.text.clap, f"the CLAP of pipeline {args.pipeline}")
        retrieval.use_index(str(args.index))
    if args.init_audio is not None:
        from tta.data.audio import load_audio

        init_audio, _ = load_audio(args.init_audio, pipe.sample_rate)
        inputs.update(init_audio=init_audio, strength=0.5 if args.strength is None else args.strength)
    return inputs


def main(argv: list[str]) -> int:
    """``tta generate ...``."""
    return generate(_parser().parse_args(argv))


def _check_defaults(args: argparse.Namespace) -> None:
    """The sampling defaults a folder records: ``--steps`` >= 1, a finite ``--guidance``."""
    if args.steps is not None:
        check_int("--steps", args.steps)
    if args.guidance is not None:
        check_float("--guidance", args.guidance)


def export_main(argv: list[str]) -> int:
    """``tta pipeline export CHECKPOINT --out DIR [--vocoder universal]``."""
    from tta.pipelines.base import export_pipeline

    p = argparse.ArgumentParser(prog="tta pipeline export", description="Write a self-describing pipeline folder.")
    p.add_argument("checkpoint", type=Path, help="a generator checkpoint (latent_diffusion, dreamaudio, vqgan_prior)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vocoder", default="universal", help="universal | griffinlim | a vocoder checkpoint")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even when an EMA exists")
    p.add_argument("--steps", type=int, help="default sampling steps (default: the noise process's: DDPM 200)")
    p.add_argument("--guidance", type=float, help="default guidance scale (default: the pipeline's: 3.5 for AudioLDM)")
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, help="default sampler (default: the noise process's)")
    args = p.parse_args(argv)
    _check_defaults(args)
    export_pipeline(args.checkpoint, args.out, vocoder=args.vocoder, use_ema=not args.no_ema,
                    defaults={"steps": args.steps, "guidance": args.guidance, "sampler": args.sampler})
    return 0


def import_audioldm_main(argv: list[str]) -> int:
    """``tta pipeline import-audioldm FOLDER --out DIR``: a diffusers AudioLDM folder -> a pipeline folder."""
    from tta.pipelines.audioldm_import import IMPORT_DEFAULTS, import_audioldm

    p = argparse.ArgumentParser(
        prog="tta pipeline import-audioldm",
        description="Import a local diffusers AudioLDMPipeline folder (unet, vae, text_encoder, tokenizer, vocoder, "
        "scheduler) as a tta pipeline folder.",
    )
    p.add_argument("folder", type=Path, help="the diffusers AudioLDM folder (with model_index.json)")
    p.add_argument("--out", type=Path, required=True, help="the new pipeline folder (must not exist or be empty)")
    p.add_argument("--mel", default="audioldm", help="mel preset of the VAE and vocoder (default audioldm)")
    p.add_argument("--text-max-length", type=int, help="most prompt tokens (default: the tokenizer's)")
    p.add_argument("--steps", type=int, default=IMPORT_DEFAULTS["steps"])
    p.add_argument("--guidance", type=float, default=IMPORT_DEFAULTS["guidance"])
    p.add_argument("--sampler", default="ddim", choices=DDPMProcess.samplers)
    args = p.parse_args(argv)
    _check_defaults(args)
    import_audioldm(args.folder, args.out, mel=args.mel, text_max_length=args.text_max_length,
                    defaults={"steps": args.steps, "guidance": args.guidance, "sampler": args.sampler})
    return 0
