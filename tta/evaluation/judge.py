"""The objective judge of generated audio used by ``tta demo`` and the learning-curve bench.

`Judge.fit` takes a CLAP network (``embed_audio``, ``embed_text``, ``sample_rate``) and the
manifest items of a dataset. It trains a multi-label linear probe (sigmoid BCE) on the CLAP
audio embeddings of the *train* clips, splits the classes into head / tail by training
frequency and takes the captioned test clips as prompts. `Judge.score` then scores one
generation per prompt, `Judge.real` the real test clips (the ceiling); `Scores.summary` gives
point estimates with percentile-bootstrap 95 % intervals over prompts, `paired_difference`
compares two systems on the same prompts, `format_table` prints a markdown table.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tta.data.audio import load_audio, resample

__all__ = ["ENERGY_STD_THRESHOLD", "FLATNESS_THRESHOLD", "Judge", "Scores", "format_table", "is_noise", "is_silent",
           "noise_stats", "paired_difference", "train_linear_probe"]

log = logging.getLogger(__name__)

SILENT_PEAK = 1e-4  # peak |x| below this: silent
SILENT_RMS_DB = -60.0  # RMS below this (dBFS): silent
NOISE_N_FFT, NOISE_HOP, NOISE_F_MAX = 1024, 256, 8000.0
# Noise-only detector, calibrated with `noise_stats` (n_fft 1024, hop 256, Hann, bins 1 .. 8 kHz) on
# 1400 real clips of `synthesize` (n=400 seed 0 at 16 kHz, 1 s and 2 s; n=300 seed 1 at 22.05 kHz,
# 1 s and 3 s; all splits): flatness median 0.0007, p95 0.28, max 0.61 (clicks, rain, applause:
# but every clip with flatness > 0.15 has energy std >= 6.4 dB); energy std median 61 dB, p5 6.7,
# min 0.46 dB (tones / ticks, flatness < 0.01; every clip with std < 3 dB has flatness <= 0.097,
# e.g. a tone over white noise). 0/1400 real clips are flagged. Noise (amplitude 1e-3..1,
# 0.5..5 s, 16 / 22.05 / 44.1 kHz): Gaussian white flatness 0.56-0.57, std <= 0.54 dB; FFT-shaped
# 1/f pink 0.18-0.26, std <= 1.8 dB; one-pole low-passed white (a=0.8) 0.20-0.35, std <= 0.7 dB:
# all flagged. (A steeper a=0.9 low-pass, flatness 0.10-0.13 at 16/22 kHz, is not.)
FLATNESS_THRESHOLD = 0.15  # mean spectral flatness above this ...
ENERGY_STD_THRESHOLD = 3.0  # ... and frame energy std (dB) below this: noise-only
METRICS = ("accuracy", "clap", "silent", "noise")
BUCKETS = ("all", "head", "tail")


def train_linear_probe(emb: torch.Tensor, labels: list[list[str]], classes: list[str], steps: int = 300,
                       seed: int = 0) -> torch.nn.Linear:
    """A multi-label linear classifier (sigmoid BCE, Adam lr 0.05) on frozen embeddings, seeded."""
    index = {c: k for k, c in enumerate(classes)}
    target = torch.zeros(len(labels), len(classes))
    for i, ls in enumerate(labels):
        for c in ls:
            if c in index:
                target[i, index[c]] = 1.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = torch.nn.Linear(emb.shape[1], len(classes))
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    x = emb.detach().float()
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(probe(x), target).backward()
            opt.step()
    return probe.eval()


def _frames_power(wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Power spectra ``(frames, bins)`` of one clip (bins 1 .. min(Nyquist, 8 kHz)), float64."""
    x = wav.detach().double().flatten()
    if x.numel() < NOISE_N_FFT:
        x = F.pad(x, (0, NOISE_N_FFT - x.numel()))
    spec = torch.stft(x, NOISE_N_FFT, NOISE_HOP, window=torch.hann_window(NOISE_N_FFT, dtype=torch.float64),
                      center=False, return_complex=True).abs().pow(2).T
    top = int(min(sample_rate / 2, NOISE_F_MAX) / sample_rate * NOISE_N_FFT)
    return spec[:, 1 : top + 1]


def noise_stats(wav: torch.Tensor, sample_rate: int) -> tuple[float, float]:
    """``(mean spectral flatness, std of frame energies in dB)`` of one clip ``(T,)``.

    Flatness is the geometric / arithmetic mean of each frame's power spectrum, averaged over
    frames (an all-zero frame counts as 0, not flat); energies have a -120 dB floor.
    """
    power = _frames_power(wav, sample_rate)
    arith = power.mean(-1)
    geo = torch.exp(torch.log(power.clamp_min(1e-300)).mean(-1))
    flat = torch.where(arith > 1e-300, geo / arith.clamp_min(1e-300), torch.zeros_like(arith))
    energy_db = 10 * torch.log10(power.sum(-1).clamp_min(1e-12))
    return float(flat.mean()), float(energy_db.std(unbiased=False))


def is_noise(wav: torch.Tensor, sample_rate: int) -> bool:
    """Broadband and stationary over the whole clip (see the calibrated thresholds)."""
    flat, std = noise_stats(wav, sample_rate)
    return flat > FLATNESS_THRESHOLD and std < ENERGY_STD_THRESHOLD


def is_silent(wav: torch.Tensor) -> bool:
    """Peak |x| below 1e-4 or RMS below -60 dBFS."""
    x = wav.detach().double().flatten()
    rms = float(x.pow(2).mean().sqrt()) if x.numel() else 0.0
    return float(x.abs().max()) < SILENT_PEAK or rms < 10 ** (SILENT_RMS_DB / 20)


def bootstrap_interval(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile-bootstrap 95 % interval of the mean of ``values``."""
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@dataclass
class Scores:
    """Per-prompt scores of one clip per prompt; ``head`` / ``tail`` are bucket memberships."""

    ids: list[str]
    correct: np.ndarray
    clap: np.ndarray
    silent: np.ndarray
    noise: np.ndarray
    head: np.ndarray
    tail: np.ndarray
    predicted: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def values(self, key: str) -> np.ndarray:
        """The per-prompt float array of ``key`` (accuracy, clap, silent or noise)."""
        if key not in METRICS:
            raise KeyError(f"unknown score {key!r}; expected one of {METRICS}")
        return np.asarray(self.correct if key == "accuracy" else getattr(self, key), dtype=np.float64)

    def mask(self, bucket: str) -> np.ndarray:
        """The prompts of ``bucket`` (all, head or tail)."""
        if bucket not in BUCKETS:
            raise KeyError(f"unknown bucket {bucket!r}; expected one of {BUCKETS}")
        return np.ones(len(self), dtype=bool) if bucket == "all" else np.asarray(getattr(self, bucket), dtype=bool)

    def summary(self, n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
        """``{accuracy_all|accuracy_head|accuracy_tail|clap|silent|noise: {mean, low, high, n}}``.

        ``low`` / ``high`` bound a percentile-bootstrap 95 % interval (prompts resampled with
        replacement, within the bucket for head / tail); ``mean`` etc. are None for an empty bucket.
        """
        rng = np.random.default_rng(seed)
        plan = [(f"accuracy_{b}", "accuracy", b) for b in BUCKETS] + [(k, k, "all") for k in METRICS[1:]]
        out: dict[str, dict[str, Any]] = {}
        for name, key, bucket in plan:
            v = self.values(key)[self.mask(bucket)]
            if len(v) == 0:
                out[name] = {"mean": None, "low": None, "high": None, "n": 0}
                continue
            low, high = bootstrap_interval(v, n_boot, rng)
            out[name] = {"mean": float(v.mean()), "low": low, "high": high, "n": len(v)}
        return out


def paired_difference(a: Scores, b: Scores, key: str = "accuracy", bucket: str = "all", n_boot: int = 1000,
                      seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Mean of ``b - a`` over the prompts of ``bucket`` and its paired bootstrap 95 % interval.

    Both systems must score the same prompts in the same order; the prompts are resampled
    jointly, so an interval that excludes 0 means ``b`` differs from ``a`` significantly.
    """
    if a.ids != b.ids:
        raise ValueError(f"paired_difference needs the same prompts in the same order ({len(a)} vs {len(b)} prompts)")
    d = (b.values(key) - a.values(key))[a.mask(bucket)]
    if len(d) == 0:
        raise ValueError(f"bucket {bucket!r} holds no prompts")
    return float(d.mean()), bootstrap_interval(d, n_boot, np.random.default_rng(seed))


@dataclass
class Judge:
    """A fitted judge: CLAP, probe, classes, head / tail split and the test prompts."""

    clap: Any = field(repr=False)
    sample_rate: int
    classes: list[str]
    head_classes: set[str]
    tail_classes: set[str]
    test: list[Any] = field(repr=False)
    probe: torch.nn.Linear = field(repr=False)
    text_embeddings: torch.Tensor = field(repr=False)
    real_scores: Scores | None = field(default=None, repr=False)

    @property
    def chance(self) -> float:
        """Accuracy of a uniform guess: 1 / number of classes."""
        return 1.0 / len(self.classes)

    @classmethod
    @torch.no_grad()
    def fit(cls, clap: Any, items: Sequence[Any], sample_rate: int, n_prompts: int | None = None,
            probe_steps: int = 300, seed: int = 0) -> Judge:
        """Train the probe on the train clips and score the real test clips (see the module doc)."""
        train = [i for i in items if i.split == "train"]
        if not train:
            raise ValueError(f"Judge.fit: no train-split clips among {len(items)} manifest items")
        test = [i for i in items if i.split == "test" and i.captions]
        if not test:
            raise ValueError(f"Judge.fit: no captioned test-split clips among {len(items)} manifest items")
        test = test[:n_prompts] if n_prompts is not None else test
        freq = Counter(c for i in train for c in i.labels)
        if not freq:
            raise ValueError(f"Judge.fit: the {len(train)} train clips carry no labels")
        classes = sorted(freq)
        median = sorted(freq.values())[len(freq) // 2]
        head = {c for c, n in freq.items() if n >= median}
        unknown = sorted({c for i in test for c in i.labels} - set(classes))
        if unknown:
            log.warning("test labels never seen in training (never predicted): %s", ", ".join(unknown))
        train_emb = torch.cat([clap_audio_embed(clap, load_audio(i.audio, sample_rate)[0][None], sample_rate) for i in train])
        probe = train_linear_probe(train_emb, [list(i.labels) for i in train], classes, probe_steps, seed)
        text = F.normalize(clap.embed_text([i.captions[0] for i in test]).detach().float(), dim=-1)
        judge = cls(clap, int(sample_rate), classes, head, set(classes) - head, test, probe, text)
        judge.real_scores = judge._score_clips([load_audio(i.audio, sample_rate)[0] for i in test], test, text)
        log.info("judge: %d train clips, %d classes (%d head), %d test prompts, real accuracy %.3f",
                 len(train), len(classes), len(head), len(test), judge.real_scores.correct.mean())
        return judge

    def real(self) -> Scores:
        """The scores of the real test clips (the ceiling)."""
        if self.real_scores is None:
            raise RuntimeError("Judge.real: build the judge with Judge.fit")
        return self.real_scores

    @torch.no_grad()
    def score(self, wavs: torch.Tensor, prompts_items: Sequence[Any] | None = None) -> Scores:
        """Score ``wavs`` ``(B, T)`` at ``sample_rate``: one generation per prompt of ``prompts_items``
        (default `test`, same order)."""
        items = list(self.test if prompts_items is None else prompts_items)
        if wavs.dim() != 2:
            raise ValueError(f"Judge.score expects wavs of shape (B, T), got {tuple(wavs.shape)}")
        if not items:
            raise ValueError("Judge.score: no prompts to score")
        if wavs.shape[0] != len(items):
            raise ValueError(f"Judge.score got {wavs.shape[0]} clips for {len(items)} test prompts")
        text = self.text_embeddings if prompts_items is None else F.normalize(
            self.clap.embed_text([i.captions[0] for i in items]).detach().float(), dim=-1)
        return self._score_clips(list(wavs), items, text)

    def _score_clips(self, wavs: list[torch.Tensor], items: list[Any], text: torch.Tensor) -> Scores:
        if len(wavs) and all(w.shape == wavs[0].shape for w in wavs):
            emb = torch.cat([clap_audio_embed(self.clap, torch.stack(wavs[s : s + 16]), self.sample_rate)
                             for s in range(0, len(wavs), 16)])
        else:
            emb = torch.cat([clap_audio_embed(self.clap, w[None], self.sample_rate) for w in wavs])
        pred = [self.classes[int(k)] for k in self.probe(emb).argmax(-1)]
        labels = [set(i.labels) for i in items]
        return Scores(
            ids=[str(i.id) for i in items],
            correct=np.array([p in ls for p, ls in zip(pred, labels)], dtype=bool),
            clap=(F.normalize(emb, dim=-1) * text.float().cpu()).sum(-1).cpu().double().numpy(),
            silent=np.array([is_silent(w) for w in wavs], dtype=bool),
            noise=np.array([is_noise(w, self.sample_rate) for w in wavs], dtype=bool),
            head=np.array([bool(ls & self.head_classes) for ls in labels], dtype=bool),
            tail=np.array([bool(ls & self.tail_classes) for ls in labels], dtype=bool),
            predicted=pred,
        )


def clap_audio_embed(clap: Any, wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """CLAP audio embeddings ``(B, D)`` (float32, CPU) of ``wav`` ``(B, T)`` at ``sample_rate``."""
    param = next(iter(clap.parameters()), None) if hasattr(clap, "parameters") else None
    device = param.device if param is not None else torch.device("cpu")
    x = resample(wav.detach().float().cpu(), sample_rate, clap.sample_rate).to(device)
    return clap.embed_audio(x).detach().float().cpu()


def _cell(entry: dict[str, Any] | None, digits: int = 2, ci: bool = True) -> str:
    if not entry or entry.get("mean") is None:
        return "–"
    text = f"{entry['mean']:.{digits}f}"
    return f"{text} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]" if ci else text


def format_table(rows: dict[str, dict[str, Any] | Scores], chance: float) -> str:
    """A markdown table of `Scores.summary` dicts (or `Scores`) by system name, with a chance line."""
    header = ["system", "accuracy all [95% CI]", "head", "tail", "CLAP score [CI]", "silent share", "noise share"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, row in rows.items():
        s = row.summary() if isinstance(row, Scores) else row
        cells = [name, _cell(s.get("accuracy_all")), _cell(s.get("accuracy_head")), _cell(s.get("accuracy_tail")),
                 _cell(s.get("clap"), 3), _cell(s.get("silent"), ci=False), _cell(s.get("noise"), ci=False)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| " + " | ".join(["chance"] + [f"{chance:.3f}"] * 3 + ["–"] * 3) + " |")
    return "\n".join(lines)
