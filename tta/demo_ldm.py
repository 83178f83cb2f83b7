"""The text-to-audio stage of ``tta demo``: CPU-sized AudioLDM and Re-AudioLDM on the synthetic
long-tail dataset, with the frozen VAE and CLAP of the earlier stages.

Steps: (1) the neighbour feature store of every clip (CLAP audio-tower tokens + MiniLM caption
tokens) through the ``predict`` path; (2) train ``configs/demo/audioldm.yaml`` and
``configs/demo/re_audioldm.yaml``; (3) generate the test split's prompts (clips never trained
on; Re-AudioLDM retrieves from the training clips only); (4) score the generations: CLAP score
(text-audio cosine, demo CLAP) and accuracy under a linear classifier trained on the CLAP
embeddings of real training clips, split into head / tail classes by training frequency.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tta.data.audio import resample, save_audio
from tta.data.manifest import read_manifest
from tta.demo_clap import instantiate_config

log = logging.getLogger(__name__)


def build_features(out: Path, clap_ckpt: str, config: Path, data_dir: Path | None) -> Path:
    """The neighbour feature store of the whole synthetic dataset (`tta predict` code path)."""
    store = out / "retrieval_features"
    tower = {"class_path": "tta.encoders.clap_towers.CLAPAudioTower", "init_args": {"checkpoint": str(clap_ckpt)}}
    extra = [f"--model.init_args.out_dir={store}", f"--model.init_args.audio_encoder={json.dumps(tower)}"]
    module, datamodule, trainer = instantiate_config(config, out / "features_run", None, data_dir, extra)
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    return store


def train_linear_probe(emb: torch.Tensor, labels: list[list[str]], classes: list[str],
                       steps: int = 300) -> torch.nn.Linear:
    """A multi-label linear classifier (sigmoid BCE) on frozen embeddings of real clips."""
    target = torch.zeros(len(labels), len(classes))
    for i, ls in enumerate(labels):
        for c in ls:
            target[i, classes.index(c)] = 1.0
    probe = torch.nn.Linear(emb.shape[1], len(classes))
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(probe(emb.detach()), target).backward()
            opt.step()
    return probe.eval()


def _accuracy(pred: torch.Tensor, labels: list[list[str]], classes: list[str]) -> list[bool]:
    """A generation is correct when the classifier's top class is one of its prompt's events."""
    return [classes[int(p)] in ls for p, ls in zip(pred, labels)]


def run_ldm_stage(out: Path, vae_ckpt: str, clap_ckpt: str, index_dir: str, steps: int | None = None,
                  data_dir: Path | None = None, n_prompts: int = 16, sample_steps: int = 25) -> dict[str, Any]:
    """Train both demo diffusion models, generate the test prompts and score them."""
    from tta.demo import demo_config_path
    from tta.encoders.clap_towers import load_clap_network
    from tta.pipelines.ldm import TextToAudioPipeline
    from tta.vocoders.factory import build_vocoder

    t0 = time.time()
    features = build_features(out, clap_ckpt, demo_config_path("retrieval_features"), data_dir)
    clap = load_clap_network(clap_ckpt).eval()
    results: dict[str, Any] = {"feature_store": str(features), "models": {}}
    items: list[Any] | None = None
    judge: dict[str, Any] = {}
    for name in ("audioldm", "re_audioldm"):
        extra = [f"--model.init_args.vae_checkpoint={vae_ckpt}", f"--model.init_args.clap_checkpoint={clap_ckpt}"]
        if name == "re_audioldm":
            extra += [f"--model.init_args.retrieval.init_args.features={features}",
                      f"--model.init_args.retrieval.init_args.index={index_dir}"]
        module, datamodule, trainer = instantiate_config(demo_config_path(name), out / f"train_{name}", steps,
                                                         data_dir, extra)
        log.info("training the demo %s for %s steps", name, trainer.max_steps)
        t_train = time.time()
        trainer.fit(module, datamodule=datamodule)
        train_seconds = time.time() - t_train
        if module.ema is not None:
            module.ema.copy_to(module.ema_target())
        if items is None:
            items = read_manifest(datamodule.manifest_path())
            judge = _judge(items, clap, module.mel_config.sample_rate, n_prompts)
        results["models"][name] = _generate_and_score(
            out / f"generated_{name}", module, items, clap, judge, sample_steps,
            TextToAudioPipeline(module.eval(), build_vocoder("universal", module.mel_config)),
            datamodule.manifest_path())
        results["models"][name]["training"] = {"steps": int(module.batches_trained), "seconds": round(train_seconds, 1)}
    results["seconds"] = round(time.time() - t0, 1)
    return results


@torch.no_grad()
def _judge(items: list[Any], clap: Any, sr: int, n_prompts: int) -> dict[str, Any]:
    """Test prompts, the head/tail split and a linear classifier trained on real training clips."""
    from tta.data.audio import load_audio

    train = [i for i in items if i.split == "train"]
    test = [i for i in items if i.split == "test" and i.captions][:n_prompts]
    classes = sorted({c for i in train for c in i.labels})
    freq = Counter(c for i in train for c in i.labels)
    median = sorted(freq.values())[len(freq) // 2]
    head = {c for c, n in freq.items() if n >= median}
    real = _embed(clap, [load_audio(i.audio, sr)[0] for i in train], sr)
    probe = train_linear_probe(real, [i.labels for i in train], classes)
    real_test = _embed(clap, [load_audio(i.audio, sr)[0] for i in test], sr)
    return {"test": test, "classes": classes, "head": head, "probe": probe, "real_test": real_test}


def _embed(clap: Any, wavs: list[torch.Tensor], sr: int) -> torch.Tensor:
    return torch.cat([clap.embed_audio(resample(w[None], sr, clap.sample_rate)).float() for w in wavs])


@torch.no_grad()
def _generate_and_score(out: Path, module: Any, items: list[Any], clap: Any, judge: dict[str, Any], steps: int,
                        pipe: Any, train_manifest: Path) -> dict[str, Any]:
    test, classes, head, probe = judge["test"], judge["classes"], judge["head"], judge["probe"]
    sr = pipe.sample_rate
    prompts = [i.captions[0] for i in test]
    model = module.model
    neighbours = None
    if model.retrieval is not None:  # retrieve from training clips only (never the test clip itself)
        banned = {i.id for i in items if i.split != "train"}
        neighbours = model.retrieval.query_neighbours(model.text.embed(prompts), exclude=[banned] * len(prompts))
    frames = pipe.frames_for(3.0)
    mel = module.generate_mel(prompts, frames, steps=steps, sampler="dpmsolver++", guidance=3.5, seed=0,
                              neighbours=neighbours)
    wav = pipe.vocoder(mel).float().clamp(-1, 1)
    gen = _embed(clap, list(wav), sr)
    clap_scores = (gen * clap.embed_text(prompts).float()).sum(-1)
    correct = _accuracy(probe(gen).argmax(-1), [i.labels for i in test], classes)
    real_test = judge["real_test"]
    real_correct = _accuracy(probe(real_test).argmax(-1), [i.labels for i in test], classes)
    out.mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(test):
        save_audio(out / f"{item.id}.wav", wav[i], sr)

    def bucket(flags: list[bool], which: set[str] | None) -> float | None:
        sel = [f for f, it in zip(flags, test) if which is None or any(c in which for c in it.labels)]
        return round(sum(sel) / len(sel), 3) if sel else None

    tail = set(classes) - head
    evaluation = _yamnet_eval(out, test, wav, sr, clap, train_manifest, steps)
    return {
        "evaluation": evaluation,
        "prompts": len(test),
        "clap_score": round(float(clap_scores.mean()), 4),
        "clap_score_real_test_clips": round(float((real_test * clap.embed_text(prompts).float()).sum(-1).mean()), 4),
        "accuracy": {"all": bucket(correct, None), "head": bucket(correct, head), "tail": bucket(correct, tail)},
        "accuracy_real_test_clips": {"all": bucket(real_correct, None), "head": bucket(real_correct, head),
                                     "tail": bucket(real_correct, tail)},
        "chance": round(1.0 / len(classes), 3),
        "silent_clips": int((wav.abs().amax(-1) < 1e-4).sum()),
        "audio_dir": str(out),
        "examples": [{"prompt": p, "neighbours": None if neighbours is None else neighbours[j]}
                     for j, p in enumerate(prompts[:3])],
    }


def _yamnet_eval(out: Path, test: list[Any], wav: torch.Tensor, sr: int, clap: Any, train_manifest: Path,
                 steps: int) -> dict[str, Any]:
    """FAD / KL / IS with the YAMNet embedder-classifier and CLAP score with the demo CLAP
    (`tta.evaluation.evaluate`, which also writes ``eval.json``, ``eval.md`` and plots)."""
    from tta.evaluation import evaluate
    from tta.evaluation.clips import Clip
    from tta.metrics.embedders import YAMNetEmbedder

    generation = {"guidance": 3.5, "steps": steps, "sampler": "dpmsolver++"}
    generated = [Clip(it.id, list(it.captions), list(it.labels), wav=wav[i].cpu(), sample_rate=sr,
                      extra={"generation": generation}) for i, it in enumerate(test)]
    reference = [Clip.from_item(it) for it in test]
    report = evaluate(generated, reference, metrics=("fad", "kl", "is", "clap"), embedder=YAMNetEmbedder(), clap=clap,
                      out_dir=out / "eval", train_manifest=train_manifest, seconds=3.0, cache_reference=False,
                      is_splits=1)
    return {"metrics": report.get("metrics"), "eval_dir": str(out / "eval")}
