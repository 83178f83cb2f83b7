"""The synthetic captioned dataset: classes, captions, splits, long tail, determinism, reuse."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tta.data import synth
from tta.data.commands import main
from tta.data.manifest import read_manifest
from tta.data.synth import EVENT_CLASSES, EVENTS, ensure_synth, render_event, synthesize

PHRASES = {e.name: (e.clause, e.noun) for e in EVENTS}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("synth") / "a", n=60, seed=3, sample_rate=16000, duration=1.0)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_classes_render_distinct_non_silent_events():
    assert len(EVENT_CLASSES) >= 24 and len(set(EVENT_CLASSES)) == len(EVENT_CLASSES)
    spectra = []
    for name in EVENT_CLASSES:
        for n in (400, 16000):
            x = render_event(name, np.random.default_rng(0), 16000, n)
            assert x.shape == (n,) and np.isfinite(x).all()
            assert np.max(np.abs(x)) == pytest.approx(1.0) and np.sqrt(np.mean(x**2)) > 0.01, name
        frames = np.abs(np.fft.rfft(x.reshape(8, 2000), axis=1))[:, :1000].reshape(8, 25, 40).sum(2)
        pattern = np.log(frames + 1e-3 * frames.max()).ravel()  # coarse log spectrogram, 8 x 25 cells
        pattern -= pattern.mean()
        spectra.append(pattern / np.linalg.norm(pattern))
    sims = np.array(spectra) @ np.array(spectra).T
    np.fill_diagonal(sims, 0)
    assert sims.max() < 0.95  # no two classes share the same time-frequency pattern


def test_manifest_splits_labels_and_captions(small):
    items = read_manifest(small)
    assert len(items) == 60 and [i.id for i in items] == sorted(i.id for i in items)
    splits = Counter(i.split for i in items)
    assert splits == {"train": 44, "val": 5, "test": 5, "heldout": 6}
    held = set(EVENT_CLASSES[-4:])
    for item in items:
        assert item.audio.is_file() and item.sample_rate == 16000 and item.duration == 1.0
        assert 1 <= len(item.labels) <= 3 and len(set(item.labels)) == len(item.labels)
        assert set(item.labels) <= set(EVENT_CLASSES)
        assert (item.split == "heldout") == bool(held & set(item.labels))
        assert 1 <= len(item.captions) <= 3 and len(set(item.captions)) == len(item.captions)
        for caption in item.captions:  # every event is named, in label order
            positions = []
            for label in item.labels:
                found = [caption.find(p) for p in PHRASES[label] if p in caption]
                assert found, (label, caption)
                positions.append(min(found))
            assert positions == sorted(positions), (item.labels, caption)
    kinds = Counter(i.extra["composition"] for i in items)
    assert set(kinds) == {"single", "sequence", "overlap"}


def test_audio_levels(small):
    for item in read_manifest(small)[:20]:
        data, sr = sf.read(item.audio)
        assert sr == 16000 and len(data) == 16000 and sf.info(item.audio).subtype == "PCM_16"
        peak_db = 20 * np.log10(np.max(np.abs(data)))
        assert -6.1 < peak_db < -0.9


def test_classes_json_matches_manifest(small):
    meta = json.loads((small.parent / "classes.json").read_text())
    assert [c["name"] for c in meta["classes"]] == EVENT_CLASSES
    assert [c["name"] for c in meta["classes"] if c["heldout"]] == EVENT_CLASSES[-4:]
    counts = Counter((label, i.split) for i in read_manifest(small) for label in i.labels)
    for c in meta["classes"]:
        assert c["counts"] == {s: counts[(c["name"], s)] for s in ("train", "val", "test", "heldout")}
        if c["heldout"]:
            assert c["counts"]["train"] == c["counts"]["val"] == c["counts"]["test"] == 0


def test_byte_identical_for_same_arguments(small, tmp_path):
    again = synthesize(tmp_path / "b", n=60, seed=3, sample_rate=16000, duration=1.0)
    assert _files(again.parent) == _files(small.parent)
    other = synthesize(tmp_path / "c", n=60, seed=4, sample_rate=16000, duration=1.0)
    assert other.read_bytes() != small.read_bytes()


def test_zipf_long_tail(tmp_path):
    def train_counts(zipf: float) -> np.ndarray:
        m = synthesize(tmp_path / str(zipf), n=300, seed=0, sample_rate=8000, duration=0.25, zipf=zipf, heldout=0)
        c = Counter(lab for i in read_manifest(m) if i.split == "train" for lab in i.labels)
        return np.array([c[name] for name in EVENT_CLASSES])

    skewed, uniform = train_counts(1.5), train_counts(0.0)
    assert skewed[:3].sum() > 4 * skewed[-10:].sum()  # head dominates the tail
    assert skewed[-1] < skewed[0] / 5
    assert uniform.min() > 0 and uniform.max() < 3 * uniform.min()


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="heldout=30"):
        synthesize(tmp_path, n=5, seed=0, heldout=30)
    with pytest.raises(ValueError, match="n=0"):
        synthesize(tmp_path, n=0, seed=0)


def test_ensure_synth_reuses_and_regenerates(tmp_path, monkeypatch):
    calls = []
    real = synth.synthesize
    monkeypatch.setattr(synth, "synthesize", lambda *a, **k: calls.append(k) or real(*a, **k))
    out = tmp_path / "ds"
    m1 = ensure_synth(out, n=8, seed=1, duration=0.5)
    before = _files(out)
    assert ensure_synth(out, n=8, seed=1, duration=0.5) == m1 and len(calls) == 1
    assert _files(out) == before
    ensure_synth(out, n=5, seed=1, duration=0.5)  # different arguments: regenerated, stale clips removed
    assert len(calls) == 2 and len(list((out / "audio").glob("*.wav"))) == 5
    (out / "audio" / "synth_00002.wav").unlink()  # incomplete dataset: regenerated
    ensure_synth(out, n=5, seed=1, duration=0.5)
    assert len(calls) == 3 and (out / "audio" / "synth_00002.wav").is_file()


def test_cli_synth(tmp_path):
    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--n", "6", "--seed", "2", "--duration", "0.5", "--heldout", "0"]) == 0
    items = read_manifest(out / "manifest.jsonl")
    assert len(items) == 6 and {i.split for i in items} <= {"train", "val", "test"}
    assert json.loads((out / ".synth_stamp.json").read_text())["args"]["n"] == 6
    assert main(["synth", "--out", str(out), "--n", "6", "--heldout", "99"]) == 2
