"""The VQGAN stage of the demo (``tta demo --system vqgan``): the text-to-sound system of "Diverse
and Vivid Sound Generation from Text Descriptions" at CPU size on the synthetic dataset.

1. trains the mel classifier of ``configs/demo/mel_classifier.yaml`` (the Melception stand-in:
   MMKL, spectrogram FID and, when `PERCEPTUAL`, the VQGAN's perceptual loss), the VQGAN of
   ``configs/demo/vqgan.yaml`` and, on that frozen VQGAN, three GPT2 priors of
   ``configs/demo/vqgan_prior.yaml`` that differ only in their text features: No Feat
   (``text_features: none``), 1 Feat (``pooled``) and 30 Feats (``sequence``); fixed step budgets
   (``max_time`` switched off), `PRIOR_SECONDS` segments;
2. reports the VQGAN's codebook usage / perplexity and reconstruction PSNR on the test split;
   generates every captioned test prompt (the judge's prompts, clips never trained on) with each
   prior, vocodes them with Griffin-Lim (the judge's vocoder, `tta.demo_ldm.JUDGE_VOCODER`) and
   scores them: the judge's classifier accuracy and CLAP score (`tta.evaluation.judge`), MMKL and
   spectrogram FID of the mel classifier against the real test clips cropped to the same length
   (`tta.demo_vqgan_eval`), bootstrap 95 % intervals over prompts, beside the real test clips,
   their VQGAN reconstructions and chance;
3. writes ``OUT/vqgan/report.json``, universal HiFi-GAN listening WAVs under ``OUT/vqgan/audio`` and
   returns the table that ``tta demo --system vqgan`` prints.

The judge's CLAP is the demo CLAP of a finished ``tta demo`` folder (``demo_dir``) or, without
one, a demo CLAP trained here (`tta.demo_clap.run_clap_stage`, about 25 s).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from tta.data.audio import load_audio, pad_or_crop, save_audio
from tta.data.manifest import read_manifest
from tta.demo_clap import instantiate_config, run_clap_stage
from tta.demo_ldm import JUDGE_VOCODER, vocode
from tta.demo_vqgan_eval import MelScorer, codebook_report, format_vqgan_table, row

log = logging.getLogger(__name__)

#: the three priors (Table 1 rows a, c, g): report name -> ``text_features`` of `PriorTextFeatures`
PRIORS = {"No Feat": "none", "1 Feat": "pooled", "30 Feats": "sequence"}
CLASSIFIER_STEPS = 150  # mel classifier budget (docs/vqgan.md "Demo stage")
VQGAN_STEPS = None  # None: configs/demo/vqgan.yaml's 500 optimizer steps (discriminator from batch 200)
PRIOR_STEPS = 400  # per prior
#: prior training segments and generation length: whole 3 s clips (330 codes), so a caption describes
#: what the prior reads and the judge hears the whole generated clip (docs/vqgan.md "Demo stage")
PRIOR_SECONDS = 3.0
PERCEPTUAL = False  # the mel classifier's perceptual term in the VQGAN loss (docs/vqgan.md "Demo stage")
LISTEN = 3  # prompts written as HiFi-GAN WAVs per system
GEN_CHUNK = 36  # prompts sampled together (one KV cache)


def locate_clap(demo_dir: Path) -> Path:
    """The demo CLAP checkpoint of a finished ``tta demo`` folder; FileNotFoundError naming it."""
    path = Path(demo_dir) / "train_clap" / "clap_final.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: --demo must be a finished `tta demo` output folder")
    return path


def _data_args(manifest: Path | None) -> list[str]:
    return [] if manifest is None else [f"--data.init_args.manifest={manifest}"]


def _train(name: str, root: Path, steps: int | None, data_dir: Path | None, extra: list[str]) -> tuple[Any, Any, float]:
    """Train the demo config ``name`` under ``root``; saves ``root/<name>_final.ckpt`` (with the run config)."""
    from tta.demo import demo_config_path

    module, datamodule, trainer = instantiate_config(demo_config_path(name), root, steps, data_dir,
                                                     ["--trainer.max_time=null", *extra])
    log.info("training the demo %s for %s steps", name, trainer.max_steps)
    t0 = time.time()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.time() - t0
    trainer.save_checkpoint(root / f"{name}_final.ckpt")
    return module.eval(), datamodule, seconds


def prior_args(mode: str, vqgan_ckpt: Path, max_codes: int, seconds: float) -> list[str]:
    """Overrides of ``configs/demo/vqgan_prior.yaml`` for one Table 1 row: the text-feature mode (its
    prefix length, no encoder for No Feat), the VQGAN checkpoint and the segment length."""
    args = [f"--model.init_args.vqgan_checkpoint={vqgan_ckpt}", f"--model.init_args.text_features={mode}",
            f"--model.init_args.prior.init_args.max_codes={max_codes}", f"--data.init_args.segment_seconds={seconds}"]
    if mode != "sequence":
        args.append("--model.init_args.prior.init_args.prefix_length=1")
    if mode == "none":
        args.append("--model.init_args.text_encoder=null")
    return args


def segment_codes(module: Any, seconds: float) -> int:
    """Codes of one training segment of ``seconds`` (the datamodule's frames, whole code columns)."""
    m, f = module.mel_config, module.autoencoder.downsample_factor
    frames = round(seconds * m.sample_rate) // m.hop_length
    return math.ceil(frames / f) * (m.n_mels // f)


def _clap_checkpoint(out: Path, demo_dir: Path | None, steps: int | None, data_dir: Path | None,
                     manifest: Path | None) -> tuple[Path, dict[str, Any]]:
    """The judge's CLAP: from ``demo_dir`` or trained into ``out`` (the demo config, on ``manifest`` when given)."""
    from tta.demo import demo_config_path

    if demo_dir is not None:
        return locate_clap(demo_dir), {"source": str(demo_dir)}
    config = demo_config_path("clap")
    if manifest is not None:  # the same config reading another manifest
        cfg = yaml.safe_load(config.read_text())
        cfg["data"]["init_args"]["manifest"] = str(manifest)
        config = out / "clap_config.yaml"
        config.write_text(yaml.safe_dump(cfg))
    stage = run_clap_stage(out, config, steps=steps, data_dir=data_dir)
    return Path(stage["checkpoint"]), {"source": "trained here", "training": stage["training"]}


@torch.no_grad()
def generate(module: Any, prompts: list[str], seconds: float) -> torch.Tensor:
    """Log-mels ``(N, n_mels, frames)`` of ``prompts`` (the module's top-k / temperature; prompt ``i``
    drawn with seed ``i``, so its codes do not depend on the batch)."""
    gen = module.generator
    frames = gen.frames_for(seconds)
    return torch.cat([gen.generate_mel(prompts[s : s + GEN_CHUNK], frames, seed=list(range(s, s + len(prompts[s : s + GEN_CHUNK]))))
                      for s in range(0, len(prompts), GEN_CHUNK)])


def run_vqgan_stage(out: Path, demo_dir: Path | None = None, *, data_dir: Path | None = None,
                    manifest: Path | None = None, classifier_steps: int | None = CLASSIFIER_STEPS,
                    vqgan_steps: int | None = VQGAN_STEPS, prior_steps: int | None = PRIOR_STEPS,
                    clap_steps: int | None = None, n_prompts: int | None = None, prior_seconds: float = PRIOR_SECONDS,
                    perceptual: bool = PERCEPTUAL) -> dict[str, Any]:
    """Run the stage (module docstring) into ``out/vqgan``; returns the report (also written to
    ``out/vqgan/report.json``). ``manifest``: a labelled manifest instead of the synthetic set (tests);
    ``n_prompts``: the first test prompts only; a ``*_steps`` of None: the config's budget."""
    from tta.encoders.clap_towers import load_clap_network
    from tta.evaluation.judge import Judge
    from tta.metrics.melception import MelClassifierEmbedder
    from tta.vocoders.factory import build_vocoder

    t0 = time.time()
    root = Path(out) / "vqgan"
    root.mkdir(parents=True, exist_ok=True)
    data = _data_args(manifest)
    if manifest is not None:  # the classifier's head: that manifest's training labels (the synthetic set: 24)
        labels = {c for i in read_manifest(manifest) if i.split == "train" for c in i.labels}
        data_classifier = [*data, f"--model.init_args.classifier.init_args.num_classes={len(labels)}"]
    else:
        data_classifier = data
    clap_ckpt, clap_info = _clap_checkpoint(root, demo_dir, clap_steps, data_dir, manifest)
    training: dict[str, Any] = {}

    classifier, datamodule, sec = _train("mel_classifier", root / "train_mel_classifier", classifier_steps, data_dir,
                                           data_classifier)
    classifier_ckpt = root / "train_mel_classifier" / "mel_classifier_final.ckpt"
    training["mel_classifier"] = {"steps": int(classifier.batches_trained), "seconds": round(sec, 1),
                                  "checkpoint": str(classifier_ckpt)}
    del classifier
    vq_extra = [f"--model.init_args.perceptual_checkpoint={classifier_ckpt}",
                "--model.init_args.perceptual_weight=1.0"] if perceptual else []
    vqgan, _, sec = _train("vqgan", root / "train_vqgan", vqgan_steps, data_dir, [*data, *vq_extra])
    vqgan_ckpt = root / "train_vqgan" / "vqgan_final.ckpt"
    training["vqgan"] = {"steps": int(vqgan.global_step), "batches": int(vqgan.batches_trained),
                         "seconds": round(sec, 1), "perceptual": perceptual, "checkpoint": str(vqgan_ckpt)}
    max_codes = segment_codes(vqgan, prior_seconds)
    priors: dict[str, Any] = {}
    for title, mode in PRIORS.items():
        name = "prior_" + mode
        module, _, sec = _train("vqgan_prior", root / f"train_{name}", prior_steps, data_dir,
                                [*data, *prior_args(mode, vqgan_ckpt, max_codes, prior_seconds)])
        priors[title] = module
        training[name] = {"title": title, "text_features": mode, "steps": int(module.batches_trained),
                          "seconds": round(sec, 1), "checkpoint": str(root / f"train_{name}" / "vqgan_prior_final.ckpt")}

    # ---- scoring: the judge's prompts, real test clips cropped to the generations' length
    items = read_manifest(datamodule.manifest_path())
    mel_config = vqgan.mel_config
    sr = mel_config.sample_rate
    judge = Judge.fit(load_clap_network(str(clap_ckpt)).eval(), items, sr, n_prompts)
    prompts = [i.captions[0] for i in judge.test]
    samples = round(prior_seconds * sr)
    frames = next(iter(priors.values())).generator.frames_for(prior_seconds)
    real_wav = torch.stack([pad_or_crop(load_audio(i.audio, sr)[0], samples) for i in judge.test])
    with torch.no_grad():
        real = vqgan.frontend(real_wav)[..., :frames]
        whole = torch.stack([vqgan.frontend(load_audio(i.audio, sr)[0][None])[0] for i in judge.test])
    scorer = MelScorer(MelClassifierEmbedder.from_checkpoint(classifier_ckpt), real)
    val = [i for i in items if i.split == "val"][: max(2, len(judge.test))]
    with torch.no_grad():
        val_mels = vqgan.frontend(torch.stack([pad_or_crop(load_audio(i.audio, sr)[0], samples) for i in val]))[..., :frames]
    voc = build_vocoder(JUDGE_VOCODER, mel_config)
    codebook = codebook_report(vqgan, whole)
    recon = vqgan.reconstruct(real)
    rows = {
        "real test clips": row(judge.score(real_wav), {"mmkl": None, "mel_fid": scorer.fid(scorer.embed(val_mels)[0])}),
        "VQGAN-reconstructed real clips": row(judge.score(vocode(voc, recon, samples)), scorer.score(recon)),
    }
    mels = {"real": real, "vqgan_reconstruction": recon}
    generation: dict[str, Any] = {}
    for title, module in priors.items():
        t = time.time()
        mel = generate(module, prompts, prior_seconds)
        generation[title] = {"seconds": round(time.time() - t, 1), "codes": module.generator.codes_for(frames)}
        mels[title] = mel
        rows[title] = row(judge.score(vocode(voc, mel, samples)), scorer.score(mel))
    rolled = [judge.test[(k + 1) % len(judge.test)] for k in range(len(judge.test))]
    rows["chance"] = {"accuracy": {"mean": judge.chance, "low": None, "high": None, "n": len(prompts)},
                      **row(None, scorer.chance()),
                      "clap": judge.score(real_wav, rolled).summary()["clap"]}
    files = _listening(root / "audio", judge.test, mels, build_vocoder("universal", mel_config), samples, sr)
    report = {
        "description": "spectrogram VQGAN + GPT2 priors (No Feat / 1 Feat / 30 Feats) on the synthetic set, "
                       "generations of the test prompts judged by the demo judge and the mel classifier",
        "manifest": str(datamodule.manifest_path()),
        "clap": {"checkpoint": str(clap_ckpt), **clap_info},
        "training": training,
        "codebook": codebook,
        "prior_seconds": prior_seconds, "prior_max_codes": max_codes,
        "generation": {"top_k": next(iter(priors.values())).generator.sampling["top_k"], "temperature": 1.0,
                       "seeds": "prompt index", "per_prior": generation},
        "judge": {"vocoder": JUDGE_VOCODER, "prompts": len(prompts), "classes": len(judge.classes),
                  "chance": judge.chance,
                  "notes": "real / generated clips of prior_seconds; MMKL and mel FID from the mel classifier on "
                           "log-mels against the real test clips of the same length (MMKL paired by prompt); real "
                           "row FID: validation vs test clips; chance: accuracy of a uniform guess, CLAP score and "
                           "MMKL of the real clips against the next prompt's caption / clip"},
        "rows": rows,
        "table": format_vqgan_table(rows),
        "files": files,
    }
    report["seconds"] = round(time.time() - t0, 1)
    (root / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _listening(out: Path, test: list[Any], mels: dict[str, torch.Tensor], hifigan: Any, samples: int,
               sr: int) -> list[str]:
    """Universal HiFi-GAN WAVs of the first `LISTEN` prompts of every system."""
    files = []
    for name, mel in mels.items():
        wav = vocode(hifigan, mel[:LISTEN], samples)
        tag = name.lower().replace(" ", "_")
        for i, item in enumerate(test[:LISTEN]):
            files.append(str(save_audio(out / f"{item.id}_{tag}.wav", wav[i], sr)))
    return files


def print_report(report: dict[str, Any], console: Any) -> None:
    """The stage's summary and table on a `rich` console."""
    cb = report["codebook"]
    t = report["training"]
    console.print(
        f"VQGAN ({t['vqgan']['steps']} optimizer steps, perceptual {'on' if t['vqgan']['perceptual'] else 'off'}): "
        f"codebook usage {cb['usage']:.2f} ({cb['codes_used']}/{cb['num_codes']} codes), perplexity "
        f"{cb['perplexity']:.1f}, reconstruction PSNR {cb['psnr_db']['mean']:.2f} dB on the test clips", markup=False)
    console.print(f"{report['judge']['prompts']} test prompts, {report['prior_seconds']:g} s each "
                  f"({report['prior_max_codes']} codes), priors of {t['prior_sequence']['steps']} steps; "
                  f"judged through {report['judge']['vocoder']} (bootstrap 95% intervals):", markup=False)
    console.print(report["table"], markup=False)
    console.print(f"outputs: {Path(report['files'][0]).parent.parent if report['files'] else ''} "
                  f"(report.json, audio/) in {report['seconds']:.0f} s", markup=False)
