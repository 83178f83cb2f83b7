"""The DreamAudio demo stage: split purity of its customized sets (the stage end to end, inside
`tta demo` and through its own CLI: tests/test_demo.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

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
