"""The demo's objective judge (`tta.evaluation.judge`) with a deterministic stand-in CLAP."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torchaudio
from scipy.signal import lfilter

from tta.data.audio import load_audio
from tta.data.manifest import read_manifest
from tta.data.synth import EVENTS, synthesize
from tta.evaluation.judge import Judge, Scores, format_table, is_noise, paired_difference

pytestmark = pytest.mark.usefixtures("single_thread")
SR = 16000
DUR = 1.5
N = int(DUR * SR)


class StandInCLAP:
    """A fixed random projection of log-mel statistics (audio) and of caption class indicators (text)."""

    sample_rate = SR

    def __init__(self, dim: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.mel = torchaudio.transforms.MelSpectrogram(SR, n_fft=512, hop_length=160, n_mels=40)
        self.audio_proj = torch.randn(120, dim, generator=g) / 120**0.5
        self.text_proj = torch.randn(len(EVENTS), dim, generator=g)

    def embed_audio(self, wav: torch.Tensor) -> torch.Tensor:
        logmel = torch.log(self.mel(wav) + 1e-6)  # (B, 40, frames)
        feats = torch.cat([logmel.mean(-1), logmel.std(-1), logmel.amax(-1)], dim=-1)
        return feats @ self.audio_proj

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        ind = torch.tensor([[float(e.clause in t or e.noun in t) for e in EVENTS] for t in texts])
        return ind @ self.text_proj


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> list:
    manifest = synthesize(tmp_path_factory.mktemp("judge_synth"), n=300, seed=0, sample_rate=SR, duration=DUR,
                          heldout=0)
    return read_manifest(manifest)


@pytest.fixture(scope="module")
def judge(data: list) -> Judge:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Judge.fit(StandInCLAP(), data, SR)
    finally:
        torch.set_num_threads(threads)


def test_real_clips_well_above_chance(judge: Judge) -> None:
    real = judge.real()
    assert len(real) == len(judge.test) >= 25
    assert real.correct.mean() >= 0.6 > 3 * judge.chance
    assert judge.chance == pytest.approx(1 / len(judge.classes))
    assert real.silent.sum() == 0 and real.noise.mean() < 0.05
    assert real.clap.shape == (len(real),) and np.all(np.abs(real.clap) <= 1 + 1e-6)


def test_gaussian_noise_near_chance_and_flagged(judge: Judge) -> None:
    g = torch.Generator().manual_seed(1)
    wavs = 0.1 * torch.randn(len(judge.test), N, generator=g)
    s = judge.score(wavs)
    assert s.correct.mean() <= 3 * judge.chance
    assert s.noise.mean() == 1.0 and s.silent.mean() == 0.0
    summary = s.summary(n_boot=200)
    assert summary["noise"]["mean"] == 1.0 and summary["noise"]["low"] == summary["noise"]["high"] == 1.0


def test_silence_is_silent_not_noise(judge: Judge) -> None:
    s = judge.score(torch.zeros(len(judge.test), N))
    assert s.silent.mean() == 1.0 and s.noise.mean() == 0.0
    quiet = judge.score(torch.full((len(judge.test), N), 5e-4))  # peak above 1e-4, RMS -66 dBFS
    assert quiet.silent.all()


def test_noise_detector_on_noise_and_real_clips(data: list) -> None:
    rng = np.random.default_rng(0)
    n = N
    pink = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) / np.sqrt(np.maximum(np.arange(n // 2 + 1), 1)), n)
    lowpass = lfilter([1.0], [1.0, -0.8], rng.standard_normal(n))
    for amp in (1e-3, 0.01, 0.1, 1.0):
        assert is_noise(torch.from_numpy(amp * rng.standard_normal(n)).float(), SR)
        for x in (pink, lowpass):
            assert is_noise(torch.from_numpy(amp * x / np.abs(x).max()).float(), SR)
    flagged = [is_noise(load_audio(i.audio, SR)[0], SR) for i in data]
    assert np.mean(flagged) < 0.05


def test_head_tail_split(judge: Judge, data: list) -> None:
    train = [i for i in data if i.split == "train"]
    freq = Counter(c for i in train for c in i.labels)
    assert judge.classes == sorted(freq)
    median = sorted(freq.values())[len(freq) // 2]
    assert judge.head_classes == {c for c, k in freq.items() if k >= median}
    assert judge.head_classes | judge.tail_classes == set(judge.classes)
    assert not judge.head_classes & judge.tail_classes and judge.tail_classes
    real = judge.real()
    for k, item in enumerate(judge.test):
        assert real.head[k] == any(c in judge.head_classes for c in item.labels)
        assert real.tail[k] == any(c in judge.tail_classes for c in item.labels)
    assert judge.test == [i for i in data if i.split == "test" and i.captions]


def test_n_prompts_and_wrong_batch(data: list, judge: Judge) -> None:
    small = Judge.fit(StandInCLAP(), data, SR, n_prompts=4, probe_steps=20)
    assert small.test == judge.test[:4] and len(small.real()) == 4
    with pytest.raises(ValueError, match=r"got 3 clips for 4 test prompts"):
        small.score(torch.zeros(3, N))


def test_empty_splits(data: list) -> None:
    clap = StandInCLAP()
    with pytest.raises(ValueError, match="no train-split clips"):
        Judge.fit(clap, [i for i in data if i.split != "train"], SR)
    with pytest.raises(ValueError, match="no captioned test-split clips"):
        Judge.fit(clap, [i for i in data if i.split != "test"], SR)


def _scores(n: int, seed: int) -> Scores:
    rng = np.random.default_rng(seed)
    head = rng.random(n) < 0.6
    return Scores(ids=[f"p{k}" for k in range(n)], correct=rng.random(n) < 0.5, clap=rng.normal(0.3, 0.1, n),
                  silent=rng.random(n) < 0.1, noise=rng.random(n) < 0.2, head=head, tail=~head)


def test_bootstrap_intervals() -> None:
    small, big = _scores(20, 0), _scores(400, 0)
    s1, s2 = small.summary(seed=3), small.summary(seed=3)
    assert s1 == s2
    for name, e in s1.items():
        assert e["low"] <= e["mean"] <= e["high"], name
    assert s1["accuracy_head"]["n"] + s1["accuracy_tail"]["n"] == 20 == s1["accuracy_all"]["n"]
    b = big.summary(seed=3)
    for name in ("accuracy_all", "accuracy_tail", "clap", "noise"):
        assert b[name]["high"] - b[name]["low"] < s1[name]["high"] - s1[name]["low"], name
    assert paired_difference(small, small, "accuracy", "tail") == (0.0, (0.0, 0.0))
    better = Scores(**{**small.__dict__, "correct": np.ones(20, dtype=bool)})
    diff, (low, high) = paired_difference(small, better, "accuracy", "all", n_boot=500, seed=1)
    assert diff == pytest.approx(1 - small.correct.mean()) and 0 < low <= diff <= high
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference(small, big)


def test_format_table(judge: Judge) -> None:
    rows = {"AudioLDM": _scores(12, 1).summary(n_boot=100), "Re-AudioLDM": _scores(12, 2),
            "real test clips": judge.real().summary(n_boot=100)}
    table = format_table(rows, judge.chance)
    for name in (*rows, "chance", f"{judge.chance:.3f}", "accuracy all [95% CI]", "noise share"):
        assert name in table
    assert len(table.splitlines()) == 2 + len(rows) + 1
