"""The DreamAudio demo stage: split purity of its customized sets, and the stage end to end on a
tiny demo folder (a few training steps, two evaluation items)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from tta.data.customize_refs import item_references
from tta.data.manifest import read_manifest
from tta.demo_dreamaudio import NUM_REFERENCES, TAIL_SECONDS, SplitLeakError, build_sets, check_split_purity
from tta.utils.errors import UsageError


@pytest.fixture(scope="module")
def sets(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float, dict]:
    return build_sets(tiny_synth, tmp_path_factory.mktemp("sets"), 22050, train_items=6, eval_items=3)


def test_sets_keep_heldout_audio_out_of_training(tiny_synth: Path, sets: tuple) -> None:
    train, held, clip, purity = sets
    base = {i.id: i for i in read_manifest(tiny_synth)}
    classes = json.loads((tiny_synth.parent / "classes.json").read_text())["classes"]
    heldout_classes = {c["name"] for c in classes if c["heldout"]}
    assert clip == 1.0 and set(purity["heldout_classes"]) <= heldout_classes and purity["heldout_classes"]
    for path, split in ((train, "train"), (held, "heldout")):
        items = read_manifest(path)
        assert len(items) == (6 if split == "train" else 3)
        for item in items:
            refs = item_references(item, path.parent)
            sources = item.extra["customize"]["sources"]
            # K clips back to back, one reference each, in the target's order; all from one split
            assert len(refs) == len(sources) == NUM_REFERENCES
            assert math.isclose(item.duration, NUM_REFERENCES * clip + TAIL_SECONDS)
            assert [r.sources for r in refs] == [(s,) for s in sources]
            assert item.split == split and {base[s].split for s in sources} == {split}
            assert all(r.audio.is_file() and r.caption for r in refs)
        labels = {c for i in items for c in i.labels}
        if split == "train":
            assert not labels & heldout_classes  # no held-out class is ever heard in training
        else:
            assert all(set(i.labels) & heldout_classes for i in items)  # every evaluation target holds one
    assert purity["train_source_clips"] > 0 and purity["eval_source_clips"] > 0 and purity["shared_clips"] == 0


def test_sets_are_reused_on_a_rerun(tiny_synth: Path, sets: tuple) -> None:
    train, held, _, _ = sets
    before = train.read_bytes()
    again = build_sets(tiny_synth, train.parent.parent, 22050, train_items=6, eval_items=3)
    assert again[:2] == (train, held) and train.read_bytes() == before
    with pytest.raises(UsageError, match="not empty"):  # another config never overwrites a set
        build_sets(tiny_synth, train.parent.parent, 22050, train_items=5, eval_items=3)


def _item_id(path: Path, k: int) -> str:
    return read_manifest(path)[k].id


def _rewrite(src: Path, dst: Path, edit) -> Path:
    lines = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    edit(lines)
    dst.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return dst


def test_purity_check_names_a_leaking_item(tiny_synth: Path, sets: tuple) -> None:
    train, held, _, _ = sets
    base = read_manifest(tiny_synth)
    heldout_id = next(i.id for i in base if i.split == "heldout")
    test_id = next(i.id for i in base if i.split == "test")

    def leak_reference(lines: list[dict]) -> None:  # a training reference made from a held-out clip
        lines[1]["references"][0]["sources"] = [heldout_id]

    bad = _rewrite(train, train.parent / "leak_ref.jsonl", leak_reference)
    with pytest.raises(SplitLeakError, match=rf"training item {_item_id(train, 1)}.*{heldout_id}"):
        check_split_purity(tiny_synth, bad, held)

    def leak_target(lines: list[dict]) -> None:  # a training target made from a test clip
        lines[0]["customize"]["sources"][0] = test_id

    bad = _rewrite(train, train.parent / "leak_target.jsonl", leak_target)
    with pytest.raises(SplitLeakError, match=rf"{test_id}.*'test'"):
        check_split_purity(tiny_synth, bad, held)

    def relabel(lines: list[dict]) -> None:  # an evaluation item claiming the train split
        lines[0]["split"] = "train"

    bad = _rewrite(held, held.parent / "eval_split.jsonl", relabel)
    with pytest.raises(SplitLeakError, match="evaluation item"):
        check_split_purity(tiny_synth, train, bad)
    # the sets as built pass
    assert check_split_purity(tiny_synth, train, held)["shared_clips"] == 0


def _config_copy(name: str, out: Path, manifest: Path) -> Path:
    """The packaged demo config ``name`` reading ``manifest`` instead of the 1200-clip synthetic set."""
    from tta.demo import demo_config_path

    config = yaml.safe_load(demo_config_path(name).read_text())
    config["data"]["init_args"]["manifest"] = str(manifest)
    config["data"]["init_args"].pop("synth", None)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `tta demo` folder at one step per model on 40 synthetic 3 s clips: VAE, CLAP + index,
    Re-AudioLDM and the report naming the manifest."""
    from tta.data.synth import ensure_synth
    from tta.demo_clap import instantiate_config, run_clap_stage
    from tta.demo_ldm import build_features, train_system

    out = tmp_path_factory.mktemp("demo")
    manifest = ensure_synth(out / "synth", n=40, seed=0, sample_rate=22050, duration=3.0)
    module, datamodule, trainer = instantiate_config(_config_copy("vae", out, manifest), out / "train", 1, None)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(out / "train" / "vae_final.ckpt")
    clap = run_clap_stage(out, _config_copy("clap", out, manifest), steps=1)
    features = build_features(out, clap["checkpoint"], _config_copy("retrieval_features", out, manifest), None)
    train_system("re_audioldm", out, str(out / "train" / "vae_final.ckpt"), clap["checkpoint"], clap["index_dir"],
                 features, 1, None, [f"--data.init_args.manifest={manifest}", "--model.init_args.init_from=null"])
    (out / "report.json").write_text(json.dumps({"manifest": str(manifest)}))
    return out


@pytest.mark.slow
def test_stage_end_to_end(tiny_demo: Path, tmp_path: Path, single_thread: None) -> None:
    from tta.demo_dreamaudio import main

    assert main(["--demo", str(tiny_demo), "--out", str(tmp_path), "--steps", "2", "--train-items", "8",
                 "--eval-items", "2", "--sample-steps", "2", "--step-sweep", "1,2", "--threads", "1"]) == 0
    report = json.loads((tmp_path / "dreamaudio" / "report.json").read_text())
    assert report["training"]["steps"] == 2 and Path(report["training"]["checkpoint"]).is_file()
    assert report["data"]["eval_items"] == 2 and report["data"]["split_purity"]["shared_clips"] == 0
    rows = report["rows"]
    assert set(rows) == {"real targets", "VAE-reconstructed targets", "chance", "DreamAudio, with references",
                         "DreamAudio, references dropped", "Re-AudioLDM (demo)"}
    assert math.isclose(rows["real targets"]["clap_a"]["mean"], 1.0, abs_tol=1e-6)  # a clip against itself
    chance = rows.pop("chance")
    assert chance["clap_a"]["n"] == 2 and chance["accuracy"]["mean"] == report["judge"]["probe_chance"]
    assert 0.0 < chance["heldout_accuracy"]["mean"] == report["judge"]["heldout_chance"] <= 1.0
    for name, row in rows.items():
        for key in ("clap_a", "accuracy", "heldout_accuracy", "clap_score"):
            e = row[key]
            assert e["n"] == 2 and e["low"] <= e["mean"] <= e["high"], (name, key, e)
        assert -1.0 - 1e-6 <= row["clap_a"]["mean"] <= 1.0 + 1e-6 and 0.0 <= row["heldout_accuracy"]["mean"] <= 1.0
    assert set(report["step_sweep"]) == {"1", "2"}
    # the references change the generation (the zero projections moved after two steps)
    diag = report["diagnostics"]
    assert diag["zero_projection_abs_max"] > 0 and diag["mel_change_by_references"] > 0
    assert all(name in report["table"] for name in rows)
    wavs = {Path(f).name for f in report["files"]}
    assert len(wavs) == 2 * 4 and all(Path(f).is_file() for f in report["files"])  # target + 3 systems per item
