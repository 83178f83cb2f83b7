"""The DreamAudio stage of the demo: customized generation of sound classes held out of training.

Reuses a finished ``tta demo`` folder (its frozen VAE ``train/vae_final.ckpt``, its CLAP, the
synthetic dataset it trained on and, when present, its Re-AudioLDM) and:

1. builds two Customized-Concatenation sets with `tta.data.customize` (K = `NUM_REFERENCES`
   synthetic clips back to back, each clip one reference): a training set from the ``train``
   split and an evaluation set from the ``heldout`` split, whose clips all hold a class that never
   occurs in train / val / test. An item and its references come from one split;
   `check_split_purity` refuses any held-out (or test / val) clip in the training set;
2. trains ``configs/demo/dreamaudio.yaml`` (frozen demo VAE) for a fixed step budget;
3. generates every evaluation prompt with its references, with the references dropped, and with
   the demo's Re-AudioLDM (retrieval from training clips only), plus a sweep of Euler steps with
   references; every system gets the same prompts and seed;
4. scores them with the demo's judge (`tta.evaluation.judge`): CLAP_A (CLAP audio-audio cosine
   with the target clip, DreamAudio eq. 8, `tta.metrics.clap_score.CLAPAudioScore`), the linear
   probe's accuracy on the target's labels, zero-shot accuracy among the held-out classes (the
   demo CLAP's text tower; the probe never saw those classes), CLAP score, silent / noise shares,
   each with a bootstrap 95 % interval, beside the real targets, their VAE reconstructions (this
   VAE + vocoder's ceiling) and chance (CLAP_A of a target against another item's target);
5. writes ``OUT/dreamaudio/report.json`` and HiFi-GAN listening WAVs.

``python -m tta.demo_dreamaudio --demo DIR [--steps N]`` runs it on its own (docs/dreamaudio.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tta.data.audio import load_audio, pad_or_crop, save_audio
from tta.data.customize import CustomizeConfig, build_customized
from tta.data.customize_refs import item_references
from tta.data.manifest import ManifestItem, read_manifest
from tta.demo_clap import instantiate_config
from tta.demo_ldm import GUIDANCE as LDM_GUIDANCE
from tta.demo_ldm import JUDGE_VOCODER, train_only_ids, vocode
from tta.demo_ldm import SAMPLE_STEPS as LDM_SAMPLE_STEPS
from tta.evaluation.judge import Judge, Scores, bootstrap_interval, clap_audio_embed
from tta.metrics.clap_score import CLAPAudioScore

log = logging.getLogger(__name__)

NUM_REFERENCES = 1  # K: every item is K synthetic clips back to back, each one reference (cost grows with K)
TRAIN_ITEMS = 400  # customized training items (from the train split)
EVAL_ITEMS = 32  # customized evaluation items (from the held-out split)
TRAIN_STEPS = 120  # fixed budget (the demo stays < 15 min): measured CLAP_A in docs/dreamaudio.md "Demo stage"
SAMPLE_STEPS = 8  # Euler steps of the main comparison
STEP_SWEEP = (4, 8, 16, 32)  # Euler steps of the quality-vs-steps rows (with references, the first SWEEP_ITEMS)
SWEEP_ITEMS = 8  # items of the step sweep and of the other-seed diagnostic (they cost 6x the main rows' steps)
GUIDANCE = 2.0  # the paper's CFG scale (guidance drops prompt and references together)
TAIL_SECONDS = 0.02  # targets are K clips plus this silence: `customize` counts a clip as short when strictly
#                     shorter than the target, and every synthetic clip has the same length
CHUNK = 16  # prompts sampled together (CFG doubles the UNet batch)
LISTEN = 2  # items written as HiFi-GAN WAVs
N_BOOT = 1000


class SplitLeakError(ValueError):
    """A customized training item uses audio outside the training split (or an evaluation item
    audio outside the held-out split)."""


@dataclass(frozen=True)
class DemoInputs:
    """What the stage takes from a finished ``tta demo`` folder."""

    vae: Path
    clap: Path
    manifest: Path
    re_audioldm: Path | None

    @classmethod
    def from_demo(cls, demo_dir: Path) -> DemoInputs:
        """Locate the parts in ``demo_dir``; FileNotFoundError naming what is missing."""
        report = demo_dir / "report.json"
        if not report.is_file():
            raise FileNotFoundError(f"{report} missing: give a finished `tta demo` output folder")
        manifest = Path(json.loads(report.read_text())["manifest"])
        vae, clap = demo_dir / "train" / "vae_final.ckpt", demo_dir / "train_clap" / "clap_final.ckpt"
        for path in (vae, clap, manifest):
            if not path.is_file():
                raise FileNotFoundError(f"{path} missing: the demo folder {demo_dir} is incomplete")
        re_ldm = demo_dir / "train_re_audioldm" / "re_audioldm_final.ckpt"
        return cls(vae, clap, manifest, re_ldm if re_ldm.is_file() else None)


# ---------------------------------------------------------------------------------------------- data
def _sources(item: ManifestItem, root: Path) -> list[str]:
    """Ids of every base clip an item's audio or references were made from."""
    meta = item.extra.get("customize", {})
    refs = item_references(item, root)
    return [*meta.get("sources", []), *(s for r in refs for s in r.sources)]


def check_split_purity(base: Path, train_manifest: Path, eval_manifest: Path) -> dict[str, Any]:
    """Raise `SplitLeakError` unless every base clip behind a training item (its audio and its
    references) is a ``train`` clip without a held-out class, and every clip behind an evaluation
    item is a ``heldout`` clip; returns counts and the held-out classes."""
    items = read_manifest(base)
    split = {i.id: i.split for i in items}
    seen = {c for i in items if i.split != "heldout" for c in i.labels}
    held = sorted({c for i in items if i.split == "heldout" for c in i.labels} - seen)
    used: dict[str, set[str]] = {}
    for role, path, want in (("training", train_manifest, "train"), ("evaluation", eval_manifest, "heldout")):
        used[role] = set()
        for item in read_manifest(path):
            srcs = _sources(item, path.parent)
            bad = [s for s in srcs if split.get(s) != want]
            if item.split != want or bad or not srcs:
                raise SplitLeakError(f"{path}: {role} item {item.id} (split {item.split!r}) uses base clips "
                                     f"{[(s, split.get(s)) for s in bad] or 'none'}; only {want!r} clips are allowed")
            if role == "training" and set(item.labels) & set(held):
                raise SplitLeakError(f"{path}: training item {item.id} holds held-out classes "
                                     f"{sorted(set(item.labels) & set(held))}")
            used[role].update(srcs)
    if used["training"] & used["evaluation"]:
        raise SplitLeakError(f"base clips in both sets: {sorted(used['training'] & used['evaluation'])[:5]}")
    return {"heldout_classes": held, "train_source_clips": len(used["training"]),
            "eval_source_clips": len(used["evaluation"]), "shared_clips": 0}


def _build_or_reuse(base: Path, out: Path, config: CustomizeConfig) -> Path:
    """`build_customized`, or the folder a previous run built from the same base and config (the
    build is deterministic: byte-identical files)."""
    summary = out / "customize.json"
    if summary.is_file():
        have = json.loads(summary.read_text())
        if have.get("config") == json.loads(json.dumps(asdict(config))) and have.get("base") == str(base):
            log.info("reusing the customized set %s", out)
            return out / "manifest.jsonl"
    return build_customized(base, out, config)


def build_sets(base: Path, out: Path, sample_rate: int, train_items: int, eval_items: int, seed: int = 0,
               references: int = NUM_REFERENCES) -> tuple[Path, Path, float, dict[str, Any]]:
    """The training (``train`` split) and evaluation (``heldout`` split) Concatenation sets under
    ``out``; returns their manifests, the clip length (one reference) and the purity summary."""
    items = [i for i in read_manifest(base) if i.split in ("train", "heldout")]
    clip = max(i.duration for i in items)  # synthetic clips share one length: every clip is "short"
    seconds = references * clip + TAIL_SECONDS
    common: dict[str, Any] = {"kind": "concat", "seed": seed, "refs": references, "seconds": seconds,
                              "max_short": min(1.5 * clip, seconds), "max_clips": references, "sample_rate": sample_rate}
    train = _build_or_reuse(base, out / "train_set", CustomizeConfig(n=train_items, splits=("train",), **common))
    held = _build_or_reuse(base, out / "eval_set", CustomizeConfig(n=eval_items, splits=("heldout",), **common))
    purity = check_split_purity(base, train, held)
    log.info("customized sets: %d training items (train split), %d evaluation items (held-out classes %s)",
             train_items, eval_items, ", ".join(purity["heldout_classes"]))
    return train, held, clip, purity


# ------------------------------------------------------------------------------------------ training
def train_dreamaudio(out: Path, vae: Path, manifest: Path, clip_seconds: float, steps: int,
                     references: int = NUM_REFERENCES) -> tuple[Any, float]:
    """Train ``configs/demo/dreamaudio.yaml`` on ``manifest`` (K = ``references`` references of
    ``clip_seconds``); returns the module with its EMA weights (eval mode) and the training seconds."""
    from tta.demo import demo_config_path

    k, target = references, references * clip_seconds + TAIL_SECONDS
    extra = [f"--model.init_args.vae_checkpoint={vae}", f"--data.init_args.manifest={manifest}",
             f"--model.init_args.num_references={k}", f"--data.init_args.num_references={k}",
             f"--model.init_args.reference_seconds={clip_seconds}", f"--data.init_args.reference_seconds={clip_seconds}",
             f"--data.init_args.segment_seconds={target}", "--trainer.limit_val_batches=0"]
    module, datamodule, trainer = instantiate_config(demo_config_path("dreamaudio"), out, steps, None, extra)
    log.info("training the demo DreamAudio for %d steps", trainer.max_steps)
    t0 = time.time()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.time() - t0
    if module.ema is not None:
        module.ema.copy_to(module.ema_target())
    trainer.save_checkpoint(out / "dreamaudio_final.ckpt")
    return module.eval(), seconds


# ---------------------------------------------------------------------------------------- generation
def reference_inputs(gen: Any, items: list[ManifestItem], root: Path) -> dict[str, Any]:
    """The generator's reference inputs of ``items`` (their manifest references, read from disk)."""
    k, sr = gen.num_references, gen.mel_config.sample_rate
    wav = torch.zeros(len(items), k, gen.reference_samples)
    present = torch.zeros(len(items), k, dtype=torch.bool)
    captions = [[""] * k for _ in items]
    for i, item in enumerate(items):
        for j, ref in enumerate(item_references(item, root)):
            wav[i, j] = pad_or_crop(load_audio(ref.audio, sr)[0], gen.reference_samples)
            present[i, j], captions[i][j] = True, ref.caption
    return gen.encode_references(wav, present, captions)


@torch.no_grad()
def generate_dreamaudio(module: Any, items: list[ManifestItem], root: Path, seconds: float, references: bool,
                        steps: int, seed: int = 0) -> torch.Tensor:
    """Log-mels of the items' prompts with their references (or with the references dropped)."""
    gen = module.generator
    mels = []
    for s in range(0, len(items), CHUNK):
        chunk = items[s : s + CHUNK]
        refs = reference_inputs(gen, chunk, root) if references else None
        mels.append(gen.generate_mel([i.captions[0] for i in chunk], gen.frames_for(seconds), steps=steps,
                                     sampler="euler", guidance=GUIDANCE, seed=seed + s, references=refs))
    return torch.cat(mels)


@torch.no_grad()
def generate_retrieval(module: Any, prompts: list[str], banned: set[str], seconds: float, seed: int = 0) -> torch.Tensor:
    """Log-mels of the demo Re-AudioLDM (its demo sampler, steps and guidance; neighbours from the
    training split only)."""
    gen = module.generator
    mels = []
    for s in range(0, len(prompts), CHUNK):
        chunk = prompts[s : s + CHUNK]
        nb = gen.query_neighbours(chunk, exclude=[banned] * len(chunk))
        mels.append(gen.generate_mel(chunk, gen.frames_for(seconds), steps=LDM_SAMPLE_STEPS,
                                     sampler=gen.model.process.fast_sampler, guidance=LDM_GUIDANCE, seed=seed + s,
                                     neighbours=nb))
    return torch.cat(mels)


# ------------------------------------------------------------------------------------------- scoring
def _ci(values: np.ndarray) -> dict[str, Any]:
    low, high = bootstrap_interval(values, N_BOOT, np.random.default_rng(0))
    return {"mean": float(values.mean()), "low": low, "high": high, "n": len(values)}


class Scorer:
    """The judge of the evaluation items: CLAP_A against their targets, probe accuracy, zero-shot
    accuracy among the held-out classes, CLAP score, silent / noise shares."""

    def __init__(self, judge: Judge, items: list[ManifestItem], targets: torch.Tensor, sample_rate: int,
                 heldout_classes: list[str], template: str) -> None:
        from tta.encoders.clap.module import label_prompt

        self.judge, self.items, self.sample_rate = judge, items, sample_rate
        self.ids = [i.id for i in items]
        self.target_emb = self.embed(targets)
        self.held = heldout_classes
        with torch.no_grad():
            text = judge.clap.embed_text([label_prompt(c, template) for c in heldout_classes]).float().cpu()
        self.held_text = torch.nn.functional.normalize(text, dim=-1)
        self.held_chance = float(np.mean([len(set(i.labels) & set(self.held)) / len(self.held) for i in items]))

    def embed(self, wav: torch.Tensor) -> torch.Tensor:
        return torch.cat([clap_audio_embed(self.judge.clap, wav[s : s + 16], self.sample_rate) for s in range(0, len(wav), 16)])

    def clap_a(self, emb: torch.Tensor, target: torch.Tensor | None = None) -> np.ndarray:
        """Per-item CLAP_A of embeddings ``emb`` against the targets (or ``target`` embeddings)."""
        metric = CLAPAudioScore()
        metric.update(emb, self.ids)
        metric.update(self.target_emb if target is None else target, self.ids, real=True)
        ids, values = metric.per_item()
        order = {i: k for k, i in enumerate(ids)}
        return values[[order[i] for i in self.ids]].numpy()

    def chance_row(self) -> dict[str, Any]:
        """Chance: CLAP_A of each target against another item's target (the next one), the probe's
        and the held-out zero-shot's uniform guess."""
        clap_a = self.clap_a(self.target_emb, torch.roll(self.target_emb, 1, dims=0))
        point = {"low": None, "high": None, "n": len(self.items)}
        return {"clap_a": _ci(clap_a), "accuracy": {"mean": self.judge.chance, **point},
                "heldout_accuracy": {"mean": self.held_chance, **point}}

    def score(self, wav: torch.Tensor) -> dict[str, Any]:
        """The row of generations ``wav`` ``(N, T)`` (one per item, item order)."""
        emb = self.embed(wav)
        scores: Scores = self.judge.score(wav, self.items)
        held_pred = (torch.nn.functional.normalize(emb, dim=-1) @ self.held_text.T).argmax(-1).tolist()
        held_ok = np.array([self.held[p] in i.labels for p, i in zip(held_pred, self.items)], dtype=np.float64)
        return {"clap_a": _ci(self.clap_a(emb)), "accuracy": _ci(scores.values("accuracy")),
                "heldout_accuracy": _ci(held_ok), "clap_score": _ci(scores.values("clap")),
                "silent": float(scores.silent.mean()), "noise": float(scores.noise.mean()),
                "predicted": scores.predicted, "heldout_predicted": [self.held[p] for p in held_pred]}


def format_rows(rows: dict[str, dict[str, Any]]) -> str:
    """A markdown table of `Scorer.score` rows by system name."""
    def cell(e: dict[str, Any] | None, d: int = 2) -> str:
        if e is None:
            return "–"
        return f"{e['mean']:.{d}f}" + ("" if e["low"] is None else f" [{e['low']:.{d}f}, {e['high']:.{d}f}]")

    def share(r: dict[str, Any], key: str) -> str:
        return f"{r[key]:.2f}" if key in r else "–"

    head = ["system", "CLAP_A [95% CI]", "probe accuracy", "held-out zero-shot acc.", "CLAP score", "silent", "noise"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        lines.append(f"| {name} | {cell(r.get('clap_a'), 3)} | {cell(r.get('accuracy'))} | "
                     f"{cell(r.get('heldout_accuracy'))} | {cell(r.get('clap_score'), 3)} | "
                     f"{share(r, 'silent')} | {share(r, 'noise')} |")
    return "\n".join(lines)


def diagnostics(module: Any, with_refs: torch.Tensor, without: torch.Tensor, other_seed: torch.Tensor) -> dict[str, Any]:
    """Do the references reach the decoder? The zero projections' and ``refcap`` attentions' largest
    weights (0 at initialisation) and the mean |log-mel| change the references cause, beside the
    change another noise seed causes."""
    unet = module.model.unet
    proj = max((float(p.abs().max()) for p in unet.projections.parameters()), default=0.0)
    refcap = [p for n, p in unet.named_parameters() if "refcap" in n and "to_out" in n]
    return {"zero_projection_abs_max": proj,
            "refcap_out_abs_max": max((float(p.abs().max()) for p in refcap), default=None),
            "mel_change_by_references": float((with_refs - without).abs().mean()),
            "mel_change_by_seed": float((with_refs - other_seed).abs().mean())}


# ---------------------------------------------------------------------------------------------- stage
def _write_listening(out: Path, items: list[ManifestItem], mels: dict[str, torch.Tensor], targets: torch.Tensor,
                     hifigan: Any, sr: int) -> list[str]:
    """HiFi-GAN WAVs of the first `LISTEN` items (each system) and their targets."""
    files = []
    for i, item in enumerate(items[:LISTEN]):
        files.append(str(save_audio(out / f"{item.id}_target.wav", targets[i], sr)))
        for name, mel in mels.items():
            wav = vocode(hifigan, mel[i : i + 1], targets.shape[-1])[0]
            files.append(str(save_audio(out / f"{item.id}_{name}.wav", wav, sr)))
    return files


def run_dreamaudio_stage(out: Path, demo_dir: Path, steps: int | None = None, train_items: int = TRAIN_ITEMS,
                         eval_items: int = EVAL_ITEMS, sample_steps: int = SAMPLE_STEPS,
                         step_sweep: tuple[int, ...] = STEP_SWEEP, re_audioldm: bool = True,
                         seed: int = 0, references: int = NUM_REFERENCES,
                         checkpoint: Path | None = None, judge: Judge | None = None) -> dict[str, Any]:
    """Run the stage (module docstring) into ``out/dreamaudio``; returns the report (also written
    to ``out/dreamaudio/report.json``). ``steps`` None: `TRAIN_STEPS`; ``re_audioldm`` False (or a
    demo folder without one) leaves the Re-AudioLDM row out; ``checkpoint``: score this trained
    DreamAudio (a ``dreamaudio_final.ckpt`` of an earlier run) instead of training one; ``judge``: the
    demo's judge when the caller already fitted it on the same manifest and CLAP (its probe is reused)."""
    from tta.training.loading import load_trained, load_trained_part
    from tta.vocoders.factory import build_vocoder

    t0 = time.time()
    steps = TRAIN_STEPS if steps is None else int(steps)
    root = Path(out) / "dreamaudio"
    root.mkdir(parents=True, exist_ok=True)
    parts = DemoInputs.from_demo(Path(demo_dir))
    clap_module, clap = load_trained_part(parts.clap, "clap", "CLAP (clap_trainer)")
    sr = int(read_manifest(parts.manifest)[0].sample_rate)
    train_manifest, eval_manifest, clip, purity = build_sets(parts.manifest, root / "data", sr, train_items,
                                                             eval_items, seed, references)
    if checkpoint is None:
        module, train_seconds = train_dreamaudio(root / "train", parts.vae, train_manifest, clip, steps, references)
        checkpoint = root / "train" / "dreamaudio_final.ckpt"
    else:
        module, train_seconds = load_trained(checkpoint), 0.0
    items = read_manifest(eval_manifest)
    seconds = items[0].duration
    samples = round(seconds * sr)
    targets = torch.stack([pad_or_crop(load_audio(i.audio, sr)[0], samples) for i in items])
    base_items = read_manifest(parts.manifest)
    if judge is None:  # the probe of the demo; its own prompts are unused
        judge = Judge.fit(clap, base_items, sr, n_prompts=1)
    scorer = Scorer(judge, items, targets, sr, purity["heldout_classes"], clap_module.zero_shot_template)
    voc = build_vocoder(JUDGE_VOCODER, module.mel_config)
    frames = module.generator.frames_for(seconds)
    with torch.no_grad():
        real_mels = module.generator.audio_mels(targets, frames)
        recon = module.codec.decode(module.codec.encode(real_mels, sample=False), frames)
    rows = {"real targets": scorer.score(targets), "VAE-reconstructed targets": scorer.score(vocode(voc, recon, samples)),
            "chance": scorer.chance_row()}
    mels: dict[str, torch.Tensor] = {}
    timing: dict[str, float] = {}
    for name, refs in (("with_references", True), ("references_dropped", False)):
        t = time.time()
        mels[name] = generate_dreamaudio(module, items, eval_manifest.parent, seconds, refs, sample_steps, seed)
        timing[name] = round(time.time() - t, 1)
        rows[f"DreamAudio, {name.replace('_', ' ')}"] = scorer.score(vocode(voc, mels[name], samples))
    if re_audioldm and parts.re_audioldm is not None:
        t = time.time()
        ldm = load_trained(parts.re_audioldm)
        banned = train_only_ids(base_items)
        mels["re_audioldm"] = generate_retrieval(ldm, [i.captions[0] for i in items], banned, seconds, seed)
        timing["re_audioldm"] = round(time.time() - t, 1)
        rows["Re-AudioLDM (demo)"] = scorer.score(vocode(voc, mels["re_audioldm"], samples))
        del ldm
    # the sweep samples the first items (same noise as there in the main rows: SWEEP_ITEMS <= CHUNK)
    first = items[:SWEEP_ITEMS]
    sub = Scorer(judge, first, targets[: len(first)], sr, purity["heldout_classes"], clap_module.zero_shot_template)
    sweep = {}
    for n in step_sweep:
        t = time.time()
        mel = mels["with_references"][: len(first)] if n == sample_steps else generate_dreamaudio(
            module, first, eval_manifest.parent, seconds, True, n, seed)
        sweep[str(n)] = {**sub.score(vocode(voc, mel, samples)), "seconds": round(time.time() - t, 1)}
    other_seed = generate_dreamaudio(module, first, eval_manifest.parent, seconds, True, sample_steps, seed + 1)
    diag = diagnostics(module, mels["with_references"][: len(first)], mels["references_dropped"][: len(first)],
                       other_seed)
    hifigan = build_vocoder("universal", module.mel_config)
    files = _write_listening(root / "audio", items, mels, targets, hifigan, sr)
    sweep_rows = {f"DreamAudio, references, {n} Euler steps (first {len(first)} items)": r for n, r in sweep.items()}
    report = {
        "description": "DreamAudio (demo size) trained on a Customized-Concatenation set of the synthetic train "
                       "split; evaluated on items whose references and targets come from held-out classes",
        "data": {"train_manifest": str(train_manifest), "eval_manifest": str(eval_manifest),
                 "references_per_item": references, "step_sweep_items": len(first), "reference_seconds": clip, "target_seconds": seconds,
                 "train_items": train_items, "eval_items": len(items), "split_purity": purity},
        "training": {"steps": int(module.batches_trained), "seconds": round(train_seconds, 1),
                     "checkpoint": str(checkpoint)},
        "generation": {"sampler": "euler", "steps": sample_steps, "guidance": GUIDANCE, "guidance_drop": "both",
                       "seed": seed, "seconds": timing,
                       "re_audioldm": {"checkpoint": str(parts.re_audioldm) if "re_audioldm" in mels else None,
                                       "steps": LDM_SAMPLE_STEPS, "guidance": LDM_GUIDANCE,
                                       "retrieval": "training split only"}},
        "judge": {"vocoder": JUDGE_VOCODER, "probe_classes": len(judge.classes), "probe_chance": judge.chance,
                  "heldout_classes": purity["heldout_classes"], "heldout_chance": scorer.held_chance,
                  "note": "the probe never saw the held-out classes: its accuracy counts the targets' seen classes"},
        "rows": rows, "step_sweep": sweep, "diagnostics": diag,
        "table": format_rows({**rows, **sweep_rows}),
        "files": files, "seconds": 0.0,
    }
    report["seconds"] = round(time.time() - t0, 1)
    (root / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m tta.demo_dreamaudio --demo DIR [--out DIR] [--steps N] ...``."""
    p = argparse.ArgumentParser(prog="python -m tta.demo_dreamaudio", description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, required=True, help="a finished `tta demo` output folder")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: --demo); writes OUT/dreamaudio")
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {TRAIN_STEPS})")
    p.add_argument("--train-items", type=int, default=TRAIN_ITEMS)
    p.add_argument("--eval-items", type=int, default=EVAL_ITEMS)
    p.add_argument("--references", type=int, default=NUM_REFERENCES, help="K: clips (= references) per item")
    p.add_argument("--sample-steps", type=int, default=SAMPLE_STEPS, help="Euler steps of the main comparison")
    p.add_argument("--step-sweep", default=",".join(map(str, STEP_SWEEP)), help="Euler steps swept, comma-separated")
    p.add_argument("--no-re-audioldm", action="store_true", help="leave the Re-AudioLDM row out")
    p.add_argument("--checkpoint", type=Path, default=None, help="score this trained DreamAudio instead of training")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the idle cores)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tta.utils.threads import set_threads

    set_threads(args.threads)
    out = (args.out or args.demo).resolve()
    report = run_dreamaudio_stage(out, args.demo.resolve(), steps=args.steps, train_items=args.train_items,
                                  eval_items=args.eval_items, sample_steps=args.sample_steps,
                                  step_sweep=tuple(int(n) for n in args.step_sweep.split(",")),
                                  re_audioldm=not args.no_re_audioldm, references=args.references,
                                  checkpoint=args.checkpoint)
    log.info("DreamAudio on %d held-out-class items (%d training steps, %.0f s in all):\n%s\nreport: %s",
             report["data"]["eval_items"], report["training"]["steps"], report["seconds"], report["table"],
             out / "dreamaudio" / "report.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
