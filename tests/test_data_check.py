"""`check_manifest` / `tta data check` on a manifest mixing good and broken clips."""

from __future__ import annotations

import numpy as np
import soundfile as sf

from tta.data.check import PROBLEMS, check_manifest
from tta.data.commands import main
from tta.data.manifest import ManifestItem, write_manifest


def _make(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    sf.write(audio / "good.wav", 0.1 * rng.standard_normal(16000), 16000, subtype="PCM_16")
    (audio / "corrupt.wav").write_bytes(rng.bytes(4096))
    sf.write(audio / "empty.wav", np.zeros(0), 16000, subtype="PCM_16")
    sf.write(audio / "rate.wav", 0.1 * rng.standard_normal(8000), 8000, subtype="PCM_16")
    sf.write(audio / "stereo.wav", 0.1 * rng.standard_normal((16000, 2)), 16000, subtype="PCM_16")
    sf.write(audio / "short.wav", 0.1 * rng.standard_normal(800), 16000, subtype="PCM_16")
    nan = 0.1 * rng.standard_normal(16000)
    nan[100] = np.nan
    sf.write(audio / "nan.wav", nan, 16000, subtype="FLOAT")
    items = [
        ManifestItem(id="good", audio=audio / "good.wav", captions=["ok"], sample_rate=16000),
        ManifestItem(id="corrupt", audio=audio / "corrupt.wav", captions=["x"]),
        ManifestItem(id="empty", audio=audio / "empty.wav", captions=["x"]),
        ManifestItem(id="rate", audio=audio / "rate.wav", captions=["x"], sample_rate=16000),
        ManifestItem(id="stereo", audio=audio / "stereo.wav", captions=["x"]),
        ManifestItem(id="short", audio=audio / "short.wav", captions=["x"]),
        ManifestItem(id="nan", audio=audio / "nan.wav", captions=["x"]),
        ManifestItem(id="gone", audio=audio / "gone.wav", captions=["x"]),
        ManifestItem(id="nocap", audio=audio / "good.wav", captions=["  "]),
    ]
    return write_manifest(items, tmp_path / "m.jsonl")


def test_counts_and_examples(tmp_path):
    report = check_manifest(_make(tmp_path), min_duration=0.5)
    assert report.total == 9
    assert report.counts == {
        "missing_file": 1, "not_a_file": 0, "unreadable": 1, "empty": 1, "wrong_channels": 0, "too_short": 1,
        "too_short_for_mel": 0, "missing_caption": 1, "sample_rate": 1, "non_finite": 1, "silent": 0,
    }  # fmt: skip
    assert report.examples["unreadable"] == ["corrupt"] and report.examples["sample_rate"] == ["rate"]
    assert report.examples["missing_file"] == ["gone"] and report.examples["non_finite"] == ["nan"]
    # a declared-rate mismatch alone is reported but not blocking; a missing caption neither
    assert sorted(report.unusable) == ["corrupt", "empty", "gone", "nan", "short"]
    assert "gone.wav" in report.details["gone"]
    assert [r[0] for r in report.rows()] == list(PROBLEMS)


def test_required_rate_and_channels_make_clips_unusable(tmp_path):
    report = check_manifest(_make(tmp_path), sample_rate=16000, channels=1, workers=2)
    assert report.counts["wrong_channels"] == 1 and report.examples["wrong_channels"] == ["stereo"]
    assert report.counts["too_short"] == 0
    assert sorted(report.unusable) == ["corrupt", "empty", "gone", "nan", "rate", "stereo"]
    assert "sample_rate" in report.blocking and "wrong_channels" in report.blocking


def test_header_only_skips_sample_scan(tmp_path):
    report = check_manifest(_make(tmp_path), read_samples=False)
    assert report.counts["non_finite"] == 0 and report.counts["unreadable"] == 1


def test_cli_exit_codes(tmp_path, capsys):
    manifest = _make(tmp_path)
    assert main(["check", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert "missing_file" in out and "corrupt" in out and "9 clips" in out
    good = write_manifest([ManifestItem(id="g", audio=tmp_path / "audio" / "good.wav", captions=["a"])],
                          tmp_path / "good.jsonl")
    assert main(["check", str(good), "--sample-rate", "16000", "--channels", "1"]) == 0
    assert main(["check", str(good), "--sample-rate", "22050"]) == 1
    assert main(["check", str(good), "--min-duration", "2"]) == 1
    assert main(["check", str(tmp_path / "absent.jsonl")]) == 2
