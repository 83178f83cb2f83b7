"""``tta generate`` (prompts -> WAV + spectrogram PNG + a manifest), ``tta pipeline export`` and
``tta pipeline import-audioldm``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from tta.generators.noise import DDPMProcess, RectifiedFlow

log = logging.getLogger(__name__)

#: every sampler of tta's noise processes (a pipeline refuses the ones its process lacks)
SAMPLER_CHOICES = DDPMProcess.samplers + RectifiedFlow.samplers


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tta generate", description="Text-to-audio generation.")
    p.add_argument("prompt", nargs="*", help="one or more prompts (or --prompts FILE)")
    p.add_argument("--prompts", type=Path, help="a text file with one prompt per line")
    p.add_argument("--pipeline", required=True, type=Path, help="a pipeline folder or a latent_diffusion checkpoint")
    p.add_argument("--vocoder", help="universal | griffinlim | a vocoder checkpoint (default: the pipeline's)")
    p.add_argument("--duration", type=float, default=10.24, help="seconds per clip")
    p.add_argument("--steps", type=int, help="sampling steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 3.5)")
    p.add_argument("--sampler", choices=SAMPLER_CHOICES,
                   help="default: the pipeline's (DDPM models: ddim; rectified flow: euler)")
    p.add_argument("--candidates", type=int, help="clips sampled per prompt, best kept by CLAP score (default 1)")
    p.add_argument("--rerank-clap", type=Path,
                   help="a clap_trainer checkpoint whose CLAP scores the candidates (default: the pipeline's; "
                        "imported public AudioLDM pipelines hold only CLAP's text tower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-audio", type=Path,
                   help="style transfer (AudioLDM): re-generate this audio file towards each prompt")
    p.add_argument("--strength", type=float, default=None,
                   help="with --init-audio: how far to move from it, in (0, 1] (default 0.5)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--device", default="cpu")
    p.add_argument("--index", type=Path, help="retrieve from this `tta index build` directory (Re-AudioLDM)")
    p.add_argument("--allow-silent", action="store_true", help="write silent clips (with a warning) instead of failing")
    p.add_argument("--out", type=Path, default=Path("generations"))
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    """Prompts from the command line and/or a file (blank lines and ``#`` comments skipped)."""
    prompts = list(args.prompt)
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise FileNotFoundError(f"prompt file {args.prompts} does not exist")
        lines = args.prompts.read_text(encoding="utf-8").splitlines()
        prompts += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError("no prompts: give them as arguments or with --prompts FILE")
    return prompts


def generate(args: argparse.Namespace) -> int:
    """Generate every prompt in batches; write WAVs, PNGs and ``generations.jsonl``."""
    from tta.pipelines.base import load_pipeline
    from tta.utils.plots import safe_name

    prompts = read_prompts(args)
    pipe = load_pipeline(args.pipeline, vocoder=args.vocoder, device=args.device)
    if args.rerank_clap is not None:
        from tta.encoders.clap_towers import load_clap_network

        pipe.rerank_clap = load_clap_network(args.rerank_clap).to(args.device)
    inputs = _system_inputs(args, pipe)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        gen = pipe.generate(batch, duration=args.duration, steps=args.steps, guidance=args.guidance,
                            seed=args.seed + start, sampler=args.sampler, candidates=args.candidates,
                            allow_silent=args.allow_silent, **inputs)
        ids = [f"{start + j:04d}_{safe_name(prompt)[:48]}" for j, prompt in enumerate(batch)]
        rows += pipe.save(gen, args.out, ids, {
            "pipeline": str(args.pipeline), "seed": args.seed + start,
            "rerank_clap": None if args.rerank_clap is None else str(args.rerank_clap),
            "init_audio": None if args.init_audio is None else str(args.init_audio),
        })
        log.info("generated %d/%d clips", min(start + args.batch_size, len(prompts)), len(prompts))
    manifest = args.out / "generations.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    log.info("wrote %d clips and %s", len(rows), manifest)
    return 0


def _system_inputs(args: argparse.Namespace, pipe: Any) -> dict[str, Any]:
    """The latent-diffusion options: ``--index`` (Re-AudioLDM's datastore), ``--init-audio`` /
    ``--strength`` (style transfer)."""
    if args.index is not None:
        retrieval = getattr(getattr(pipe.generator, "model", None), "retrieval", None)
        if retrieval is None:
            raise ValueError(f"--index given but the pipeline {args.pipeline} does not retrieve (plain AudioLDM)")
        retrieval.use_index(str(args.index))
    if args.init_audio is not None:
        from tta.data.audio import load_audio

        init_audio, _ = load_audio(args.init_audio, pipe.sample_rate)
        return {"init_audio": init_audio, "strength": 0.5 if args.strength is None else args.strength}
    if args.strength is not None:
        raise ValueError("--strength needs --init-audio (the audio to edit)")
    return {}


def main(argv: list[str]) -> int:
    """``tta generate ...``."""
    return generate(_parser().parse_args(argv))


def export_main(argv: list[str]) -> int:
    """``tta pipeline export CHECKPOINT --out DIR [--vocoder universal]``."""
    from tta.pipelines.base import export_pipeline

    p = argparse.ArgumentParser(prog="tta pipeline export", description="Write a self-describing pipeline folder.")
    p.add_argument("checkpoint", type=Path, help="a latent_diffusion checkpoint")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vocoder", default="universal", help="universal | griffinlim | a vocoder checkpoint")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even when an EMA exists")
    p.add_argument("--steps", type=int, help="default sampling steps (default: the noise process's: DDPM 200)")
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, help="default sampler (default: the noise process's)")
    args = p.parse_args(argv)
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
    import_audioldm(args.folder, args.out, mel=args.mel, text_max_length=args.text_max_length,
                    defaults={"steps": args.steps, "guidance": args.guidance, "sampler": args.sampler})
    return 0
