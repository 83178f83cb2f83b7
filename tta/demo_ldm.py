"""The text-to-audio stage of ``tta demo``: CPU-sized AudioLDM and Re-AudioLDM on the synthetic
long-tail dataset, with the frozen VAE and CLAP of the earlier stages.

Steps: (1) the neighbour feature store of every clip (CLAP audio-tower tokens + MiniLM caption
tokens) through the ``predict`` path; (2) train ``configs/demo/audioldm.yaml`` and
``configs/demo/re_audioldm.yaml`` for their fixed step budgets; (3) generate every captioned
test-split prompt (clips never trained on; Re-AudioLDM retrieves from the *training* clips only);
(4) score the generations with the demo's judge (`tta.evaluation.judge`): accuracy of a linear
classifier trained on the CLAP embeddings of real training clips (all / head / tail classes),
CLAP score and the share of silent / noise-only clips, each with a bootstrap 95 % interval,
beside the real test clips, the VAE-reconstructed real clips (this VAE + vocoder's ceiling) and
chance; (5) FAD / KL / IS with YAMNet through `tta.evaluation.evaluate`.

The judge hears the mels through Griffin-Lim (`JUDGE_VOCODER`): the judge's ceiling rows use the
same vocoder, Griffin-Lim reproduces the mel the judge's CLAP reads (real clips: same accuracy
as the original audio), and it is ~12x faster on a CPU than the universal HiFi-GAN, which
vocodes the listening examples (`LISTEN_CLIPS` per model).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from tta.data.audio import save_audio
from tta.data.manifest import read_manifest
from tta.demo_clap import instantiate_config
from tta.evaluation.judge import Judge, Scores, format_table, paired_difference

log = logging.getLogger(__name__)

SYSTEMS = {"audioldm": "AudioLDM", "re_audioldm": "Re-AudioLDM"}
JUDGE_VOCODER = "griffinlim"
LISTEN_CLIPS = 2
GUIDANCE = 3.5
SECONDS = 3.0
SAMPLE_STEPS = 8  # DPM-Solver++ (DDPM) / Euler (flow) steps: accuracy is flat from 4-8 steps on (docs/ldm.md)
CHUNK = 18  # prompts sampled together (CFG doubles the UNet batch)


def build_features(out: Path, clap_ckpt: str, config: Path, data_dir: Path | None) -> Path:
    """The neighbour feature store of the whole synthetic dataset (`tta predict` code path)."""
    store = out / "retrieval_features"
    tower = {"class_path": "tta.encoders.clap_towers.CLAPAudioTower", "init_args": {"checkpoint": str(clap_ckpt)}}
    extra = [f"--model.init_args.out_dir={store}", f"--model.init_args.audio_encoder={json.dumps(tower)}"]
    module, datamodule, trainer = instantiate_config(config, out / "features_run", None, data_dir, extra)
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    return store


def train_system(name: str, out: Path, vae_ckpt: str, clap_ckpt: str, index_dir: str, features: Path | None,
                 steps: int | None, data_dir: Path | None, extra: list[str] | tuple[str, ...] = ()) -> tuple[Any, Any, float]:
    """Train the demo config ``name`` (``audioldm``, ``re_audioldm``, ...) with the given frozen
    parts; returns (module with its EMA weights, datamodule, training seconds) and leaves
    ``out/train_<name>/<name>_final.ckpt`` (EMA weights, run config) for later stages."""
    from tta.demo import demo_config_path

    args = [f"--model.init_args.vae_checkpoint={vae_ckpt}", f"--model.init_args.clap_checkpoint={clap_ckpt}", *extra]
    if name.startswith("re_"):
        args += [f"--model.init_args.retrieval.init_args.features={features}",
                 f"--model.init_args.retrieval.init_args.index={index_dir}"]
    module, datamodule, trainer = instantiate_config(demo_config_path(name), out / f"train_{name}", steps, data_dir, args)
    log.info("training the demo %s for %s steps", name, trainer.max_steps)
    t0 = time.time()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.time() - t0
    if module.ema is not None:
        module.ema.copy_to(module.ema_target())
    trainer.save_checkpoint(out / f"train_{name}" / f"{name}_final.ckpt")
    return module.eval(), datamodule, seconds


def train_only_ids(items: list[Any]) -> set[str]:
    """Ids a test-time retrieval must never return: every clip outside the training split."""
    return {i.id for i in items if i.split != "train"}


@torch.no_grad()
def generate_mels(module: Any, prompts: list[str], banned: set[str], steps: int | None = None,
                  sampler: str | None = None, guidance: float = GUIDANCE, seed: int = 0) -> torch.Tensor:
    """Log-mels of ``prompts`` (``SECONDS`` each, in chunks); a retrieving model queries its index
    with the prompts and never returns a clip in ``banned`` (validation / test / held-out)."""
    gen = module.generator
    sampler = sampler or gen.model.process.fast_sampler
    frames = gen.frames_for(SECONDS)
    mels = []
    for s in range(0, len(prompts), CHUNK):
        chunk = prompts[s : s + CHUNK]
        neighbours = gen.query_neighbours(chunk, exclude=[banned] * len(chunk))
        mels.append(gen.generate_mel(chunk, frames, steps=steps, sampler=sampler, guidance=guidance, seed=seed + s,
                                     neighbours=neighbours))
    return torch.cat(mels)


@torch.no_grad()
def vocode(vocoder: Any, mels: torch.Tensor, samples: int) -> torch.Tensor:
    """Waveforms ``(B, samples)`` in [-1, 1] of log-mels ``(B, n_mels, frames)``."""
    return torch.cat([vocoder(mels[s : s + 16]).float().clamp(-1, 1)[..., :samples] for s in range(0, len(mels), 16)])


def real_test_mels(judge: Judge, module: Any) -> torch.Tensor:
    """Log-mels of the judge's real test clips (``SECONDS`` each, the model's front-end)."""
    from tta.data.audio import load_audio, pad_or_crop

    sr = module.mel_config.sample_rate
    wav = torch.stack([pad_or_crop(load_audio(i.audio, sr)[0], round(SECONDS * sr)) for i in judge.test])
    return module.frontend(wav)[..., : module.generator.frames_for(SECONDS)]


def fit_judge(clap: Any, items: list[Any], module: Any, vocoder: Any,
              n_prompts: int | None = None) -> tuple[Judge, dict[str, Scores]]:
    """The judge of the test prompts and its ceiling rows: the real test clips and their
    reconstructions through ``module``'s VAE and ``vocoder`` (what the generations go through)."""
    judge = Judge.fit(clap, items, module.mel_config.sample_rate, n_prompts)
    real = real_test_mels(judge, module)
    recon = module.codec.decode(module.codec.encode(real, sample=False), real.shape[-1])
    samples = round(SECONDS * module.mel_config.sample_rate)
    return judge, {"real test clips": judge.real(),
                   "VAE-reconstructed real clips": judge.score(vocode(vocoder, recon, samples))}


def run_ldm_stage(out: Path, vae_ckpt: str, clap_ckpt: str, index_dir: str, steps: int | None = None,
                  data_dir: Path | None = None, n_prompts: int | None = None,
                  sample_steps: int | None = None) -> tuple[dict[str, Any], Judge]:
    """Train both demo diffusion models, generate the test prompts (``sample_steps``, default
    `SAMPLE_STEPS`) and score them; returns the stage report and the fitted judge (later stages
    on the same manifest and CLAP reuse its probe)."""
    sample_steps = SAMPLE_STEPS if sample_steps is None else sample_steps
    from tta.demo import demo_config_path
    from tta.encoders.clap_towers import load_clap_network
    from tta.vocoders.factory import build_vocoder

    t0 = time.time()
    features = build_features(out, clap_ckpt, demo_config_path("retrieval_features"), data_dir)
    clap = load_clap_network(clap_ckpt).eval()
    results: dict[str, Any] = {"feature_store": str(features), "models": {}, "judge_vocoder": JUDGE_VOCODER,
                               "retrieval_datastore": "training split only: validation, test and held-out clips "
                                                      "are excluded from every test-time query"}
    judge: Judge | None = None
    rows: dict[str, Scores] = {}
    for name, title in SYSTEMS.items():
        # Re-AudioLDM fine-tunes the demo AudioLDM (`init_from`): its retrieval attention starts at zero
        base = out / "train_audioldm" / "audioldm_final.ckpt"
        start = [f"--model.init_args.init_from={base}"] if name.startswith("re_") else []
        module, datamodule, seconds = train_system(name, out, vae_ckpt, clap_ckpt, index_dir, features, steps,
                                                   data_dir, start)
        items = read_manifest(datamodule.manifest_path())
        samples = round(SECONDS * module.mel_config.sample_rate)
        if judge is None:  # the vocoders and the judge serve both models (same mel front-end)
            judge_voc = build_vocoder(JUDGE_VOCODER, module.mel_config)
            hifigan = build_vocoder("universal", module.mel_config)
            judge, ceilings = fit_judge(clap, items, module, judge_voc, n_prompts)
            rows.update(ceilings)
        prompts = [i.captions[0] for i in judge.test]
        t_gen = time.time()
        banned = train_only_ids(items)
        mels = generate_mels(module, prompts, banned, steps=sample_steps)
        wav = vocode(judge_voc, mels, samples)
        rows[title] = scores = judge.score(wav)
        gen_seconds = time.time() - t_gen
        results["models"][name] = _report_model(out / f"generated_{name}", module, judge, scores, mels, wav,
                                                datamodule.manifest_path(), clap, sample_steps, banned, hifigan)
        results["models"][name]["training"] = {"steps": int(module.batches_trained), "seconds": round(seconds, 1)}
        results["models"][name]["generation_seconds"] = round(gen_seconds, 1)
    assert judge is not None
    results["judge"] = {"prompts": len(judge.test), "classes": len(judge.classes), "chance": round(judge.chance, 4),
                        "rows": {k: v.summary() for k, v in rows.items()}}
    results["table"] = format_table(rows, judge.chance)
    results["tail_difference"] = _tail_difference(rows)
    results["seconds"] = round(time.time() - t0, 1)
    return results, judge


def _tail_difference(rows: dict[str, Scores]) -> dict[str, Any]:
    """Re-AudioLDM minus AudioLDM tail accuracy on the same prompts, with its 95 % interval."""
    diff, (low, high) = paired_difference(rows["AudioLDM"], rows["Re-AudioLDM"], key="accuracy", bucket="tail")
    significant = low > 0 or high < 0
    verdict = ("significant" if significant else "not significant at demo size (the interval contains 0)")
    return {"mean": round(diff, 4), "low": round(low, 4), "high": round(high, 4), "significant": significant,
            "statement": f"Re-AudioLDM - AudioLDM tail accuracy {diff:+.3f} [95% CI {low:+.3f}, {high:+.3f}]: {verdict}"}


def _report_model(out: Path, module: Any, judge: Judge, scores: Scores, mels: torch.Tensor, wav: torch.Tensor,
                  train_manifest: Path, clap: Any, sample_steps: int, banned: set[str], hifigan: Any) -> dict[str, Any]:
    """Write the listening examples (through ``hifigan``) and the YAMNet evaluation; the report entry."""
    sr = module.mel_config.sample_rate
    out.mkdir(parents=True, exist_ok=True)
    listen = vocode(hifigan, mels[:LISTEN_CLIPS], wav.shape[-1])
    for i, item in enumerate(judge.test[:LISTEN_CLIPS]):
        save_audio(out / f"{item.id}.wav", listen[i], sr)
    for i, item in enumerate(judge.test):
        save_audio(out / "griffinlim" / f"{item.id}.wav", wav[i], sr)
    process = module.model.process
    generation = {"guidance": GUIDANCE, "steps": sample_steps,
                  "sampler": process.fast_sampler, "process": process.registry_name}
    summary = scores.summary()
    return {
        "evaluation": _yamnet_eval(out, judge.test, wav, sr, clap, train_manifest, generation),
        "prompts": len(judge.test),
        "generation": generation,
        "judge": summary,
        "clap_score": round(summary["clap"]["mean"], 4),
        "accuracy": {b: summary[f"accuracy_{b}"]["mean"] for b in ("all", "head", "tail")},
        "audio_dir": str(out),
        "examples": _examples(module, judge, scores, banned),
    }


def _examples(module: Any, judge: Judge, scores: Scores, banned: set[str], n: int = 3) -> list[dict[str, Any]]:
    """The first prompts with the judge's verdict (and, for a retrieving model, its neighbours)."""
    prompts = [i.captions[0] for i in judge.test[:n]]
    neighbours: list[Any] = [None] * len(prompts)
    retrieval = module.model.retrieval
    if retrieval is not None:
        neighbours = retrieval.query_neighbours(module.model.text.embed(prompts), exclude=[banned] * len(prompts))
    return [{"prompt": p, "labels": list(i.labels), "predicted": scores.predicted[k], "neighbours": neighbours[k]}
            for k, (p, i) in enumerate(zip(prompts, judge.test))]


def _yamnet_eval(out: Path, test: list[Any], wav: torch.Tensor, sr: int, clap: Any, train_manifest: Path,
                 generation: dict[str, Any]) -> dict[str, Any]:
    """FAD / KL / IS with the YAMNet embedder-classifier and CLAP score with the demo CLAP
    (`tta.evaluation.evaluate`, which also writes ``eval.json``, ``eval.md`` and plots)."""
    from tta.evaluation import evaluate
    from tta.evaluation.clips import Clip
    from tta.metrics.embedders import YAMNetEmbedder

    generated = [Clip(it.id, list(it.captions), list(it.labels), wav=wav[i].cpu(), sample_rate=sr,
                      extra={"generation": generation}) for i, it in enumerate(test)]
    reference = [Clip.from_item(it) for it in test]
    report = evaluate(generated, reference, metrics=("fad", "kl", "is", "clap"), embedder=YAMNetEmbedder(), clap=clap,
                      out_dir=out / "eval", train_manifest=train_manifest, seconds=SECONDS, cache_reference=False,
                      is_splits=1)
    return {"metrics": report.get("metrics"), "eval_dir": str(out / "eval")}
