"""DreamAudio customized datasets: concat / overlay / general builders, references, checks, augmentation."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tta.data.audio import load_audio, save_audio
from tta.data.customize import CustomizeConfig, add_customize_parser, build_customized, run_customize
from tta.data.customize_augment import drop_references, mask_reference_content
from tta.data.customize_build import group_sizes, quantize
from tta.data.customize_refs import check_references, item_references, manifest_lines
from tta.data.customize_text import (
    CONNECTION_PHRASES,
    OVERLAY_PHRASES,
    CaptionError,
    clip_caption,
    join_captions,
    normalise_part,
)
from tta.data.manifest import ManifestError, ManifestItem, read_manifest, write_manifest
from tta.utils.errors import UsageError

SR = 8000
TARGET = 2 * SR  # --seconds 2 at 8 kHz
# (duration s, file rate, caption or None = labels only): short clips are < 1 s, long ones >= 1 s
CLIPS = [(0.3, 16000, "A bell rings."), (0.45, 22050, None), (0.6, 16000, "Rain falls"), (0.75, 16000, None),
         (0.9, 16000, "A car passes by."), (1.5, 16000, "Wind blows"), (2.5, 22050, None), (3.0, 16000, "A crowd")]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tta data")
    add_customize_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(base: Path, out: Path, *extra: str) -> Path:
    argv = ["customize", "--base", str(base), "--out", str(out), "--seconds", "2", "--max-short", "1",
            "--sample-rate", str(SR), *extra]  # fmt: skip
    assert run_customize(_parser().parse_args(argv)) == 0
    return out / "manifest.jsonl"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Tones with a little noise (never silent): the same durations in a train and a test split."""
    root = tmp_path_factory.mktemp("base")
    items = []
    for split, f0 in (("train", 220.0), ("test", 330.0)):
        for j, (dur, rate, caption) in enumerate(CLIPS):
            t = np.arange(int(dur * rate)) / rate
            rng = np.random.default_rng(j)
            x = 0.05 * (1 + j % 3) * np.sin(2 * np.pi * f0 * (1 + j / 4) * t) + 0.002 * rng.standard_normal(len(t))
            path = save_audio(root / "audio" / f"{split}_{j}.wav", x, rate)
            labels = ["dog_bark" if j == 1 else f"car_horn_{j}"]  # a synthetic class name, then plain labels
            items.append(ManifestItem(f"{split}_{j}", path, [caption] if caption else [], labels, dur, rate, split))
    return write_manifest(items, root / "base.jsonl")


@pytest.fixture(scope="module")
def built(base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("built")
    return {
        "concat": _run(base, root / "concat", "--kind", "concat", "--n", "5", "--refs", "2"),
        "overlay": _run(base, root / "overlay", "--kind", "overlay", "--n", "8", "--max-short", "0.95"),
        "general": _run(base, root / "general", "--kind", "general", "--n", "8"),
    }


def _pcm(path: Path) -> np.ndarray:
    data, rate = sf.read(str(path), dtype="int16")
    assert rate == SR and data.ndim == 1
    return data.astype(np.int64)


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def _joined(parts: list[str], background: str | None = None) -> re.Pattern[str]:
    """A pattern of ``parts`` joined by connection phrases (then an overlay phrase and ``background``)."""
    phrases = "|".join(re.escape(p) for p in CONNECTION_PHRASES)
    text = re.escape(normalise_part(parts[0], True))
    for part in parts[1:]:
        text += f", (?:{phrases}) " + re.escape(normalise_part(part, False))
    if background is not None:
        overlay = "|".join(re.escape(p) for p in OVERLAY_PHRASES)
        text += f", (?:{overlay}) " + re.escape(normalise_part(background, False))
    return re.compile(text)


def test_group_sizes_rule():
    assert group_sizes(5, 3) == [2, 2, 1]
    assert group_sizes(7, 2) == [4, 3]
    assert group_sizes(3, 3) == [1, 1, 1]
    assert group_sizes(2, 3) == [1, 1]  # fewer clips than K: one reference per clip
    with pytest.raises(ValueError, match="m >= 1"):
        group_sizes(0, 3)


def test_concat_is_exact_concatenation_of_references(built, base):
    manifest = built["concat"]
    by_id = {i.id: i for i in read_manifest(base)}
    items = read_manifest(manifest)
    assert len(items) == 10 and {i.split for i in items} == {"train", "test"}
    sizes = set()
    for item in items:
        audio = _pcm(item.audio)
        assert len(audio) == TARGET and item.duration == 2.0 and item.sample_rate == SR
        refs = item_references(item, manifest.parent)
        sources = item.extra["customize"]["sources"]
        segments = item.extra["customize"]["segments"]
        assert len(refs) == len(group_sizes(len(sources), 2)) and [s for r in refs for s in r.sources] == sources
        joined = np.concatenate([_pcm(r.audio) for r in refs])
        used = sum(length for _, length in segments)
        assert [start for start, _ in segments] == np.cumsum([0] + [n for _, n in segments[:-1]]).tolist()
        assert len(joined) == used <= TARGET
        np.testing.assert_array_equal(audio[:used], joined)  # bit-exact
        assert not audio[used:].any()  # the rest is the zero tail
        for source, (start, length) in zip(sources, segments):
            clip = by_id[source]
            assert clip.duration < 1.0  # only short clips
            wav, _ = load_audio(clip.audio, SR)  # the base clip resampled to the output rate
            np.testing.assert_array_equal(audio[start : start + length], quantize(wav.double().numpy()))
        sizes.add(len(sources))
    assert max(sizes) > 2  # some items group more clips than references


def test_overlay_snr_from_written_files(built):
    manifest = built["overlay"]
    snrs, scaled = [], 0
    for item in read_manifest(manifest):
        meta = item.extra["customize"]
        audio, base = _pcm(item.audio), _pcm(manifest.parent / meta["base"]["audio"])
        assert len(audio) == len(base) == TARGET
        refs = item_references(item, manifest.parent)
        assert [r.sources[0] for r in refs] == meta["sources"][1:] and len(refs) == 2
        outside = np.ones(TARGET, dtype=bool)
        for ins, ref in zip(meta["inserts"], refs):
            start, length = ins["start"], ins["length"]
            seg = slice(start, start + length)
            outside[seg] = False
            inserted = audio[seg] - base[seg]
            measured = 10 * np.log10(np.mean(base[seg].astype(float) ** 2) / np.mean(inserted.astype(float) ** 2))
            assert measured == pytest.approx(ins["snr_db"], abs=0.1)
            assert -15 <= ins["snr_db"] <= 15
            ref_pcm = _pcm(ref.audio)
            assert len(ref_pcm) == length
            np.testing.assert_allclose(inserted, ins["gain"] * ref_pcm, atol=1 + ins["gain"])
            half = (0, TARGET // 2) if ins["role"] == "front" else (TARGET // 2, TARGET)
            assert half[0] <= start and start + length <= half[1]
            snrs.append(ins["snr_db"])
        np.testing.assert_array_equal(audio[outside], base[outside])
        scaled += int(np.max(np.abs(audio)) > 0.9 * 32767)
    assert min(snrs) < -5 and max(snrs) > 5 and len(set(snrs)) == len(snrs)
    assert scaled >= 1  # loud mixes were scaled (as a whole) to the headroom, keeping their SNR


def test_captions_join_source_captions(built, base):
    by_id = {i.id: i for i in read_manifest(base)}
    for item in read_manifest(built["concat"]):
        sources = [by_id[s] for s in item.extra["customize"]["sources"]]
        assert _joined([clip_caption(s) for s in sources]).fullmatch(item.captions[0]), item.captions
        for ref in item_references(item, built["concat"].parent):
            assert _joined([clip_caption(by_id[s]) for s in ref.sources]).fullmatch(ref.caption)
    for item in read_manifest(built["overlay"]):
        b, f, k = (by_id[s] for s in item.extra["customize"]["sources"])
        pattern = _joined([clip_caption(f), clip_caption(k)], background=clip_caption(b))
        assert pattern.fullmatch(item.captions[0]), item.captions
        assert [r.caption for r in item_references(item, built["overlay"].parent)] == [clip_caption(f),
                                                                                       clip_caption(k)]  # fmt: skip


def test_caption_rules():
    rng = np.random.default_rng(0)
    text = join_captions(["A dog barks.", "A bell rings", "TV static hisses"], rng)
    assert re.fullmatch(r"A dog barks, [a-z ]+ a bell rings, [a-z ]+ TV static hisses", text)
    item = ManifestItem("x", Path("/a.wav"), [], ["dog_bark", "air_conditioner"])
    assert clip_caption(item) == "a dog barks and the sound of an air conditioner"
    assert clip_caption(ManifestItem("y", Path("/a.wav"), ["  ", "Rain falls. "])) == "Rain falls"
    with pytest.raises(CaptionError, match="'z'.*neither captions nor labels"):
        clip_caption(ManifestItem("z", Path("/a.wav")))


def test_deterministic_files_and_seed(base, tmp_path):
    args = ("--kind", "overlay", "--n", "3", "--max-short", "0.95", "--split", "train")
    _run(base, tmp_path / "a", *args)
    _run(base, tmp_path / "b", *args)
    _run(base, tmp_path / "c", *args, "--seed", "1")
    a, b, c = (_hashes(tmp_path / name) for name in "abc")
    assert a == b and len(a) == 1 + 1 + 3 * 4  # manifest, summary, per item: audio, base, 2 references
    assert a["manifest.jsonl"] != c["manifest.jsonl"] and a["audio/overlay_train_000000.wav"] != c.get(
        "audio/overlay_train_000000.wav")  # fmt: skip


def test_general_items_have_empty_references(built, base):
    base_items = {i.id: i for i in read_manifest(base)}
    items = read_manifest(built["general"])
    for item in items:
        assert item.extra["references"] == [] and item_references(item, built["general"].parent) == []
        (source,) = item.extra["customize"]["sources"]
        assert len(_pcm(item.audio)) == TARGET
        assert item.captions == (base_items[source].captions or [clip_caption(base_items[source])])
    for split in ("train", "test"):  # n == clips per split: each clip used exactly once
        used = sorted(i.extra["customize"]["sources"][0] for i in items if i.split == split)
        assert used == sorted(k for k, v in base_items.items() if v.split == split)


def test_split_purity(built, base, tmp_path):
    split_of = {i.id: i.split for i in read_manifest(base)}
    for manifest in built.values():
        for item in read_manifest(manifest):
            sources = item.extra["customize"]["sources"]
            sources += [s for r in item_references(item, manifest.parent) for s in r.sources]
            assert {split_of[s] for s in sources} == {item.split}, item.id
    only = read_manifest(_run(base, tmp_path / "t", "--kind", "concat", "--n", "2", "--split", "test"))
    assert {i.split for i in only} == {"test"}
    with pytest.raises(UsageError, match="no clips of split.*'val'.*its splits: test, train"):
        _run(base, tmp_path / "v", "--kind", "concat", "--n", "2", "--split", "val")


def test_bad_arguments(base, tmp_path):
    with pytest.raises(UsageError, match="max_short must be <= 1 .*half the target length"):
        _run(base, tmp_path / "o", "--kind", "overlay", "--n", "1", "--max-short", "1.5")
    with pytest.raises(UsageError, match="n must be an integer >= 1"):
        _run(base, tmp_path / "o", "--kind", "concat", "--n", "0")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        _run(base, tmp_path / "full", "--kind", "concat", "--n", "1")
    with pytest.raises(UsageError, match="'train' has 0 short clips"):  # every clip counts as long
        config = CustomizeConfig("concat", 1, seconds=2, max_short=0.1, splits=("train",))
        build_customized(base, tmp_path / "s", config)
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_label_less_base_clip_names_line(tmp_path):
    path = save_audio(tmp_path / "a.wav", 0.1 * np.ones(800), SR)
    manifest = write_manifest([ManifestItem("ok", path, ["a hum"]), ManifestItem("bare", path)], tmp_path / "m.jsonl")
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: field 'captions': base clip 'bare'"):
        build_customized(manifest, tmp_path / "out", CustomizeConfig("general", 1, seconds=1, max_short=0.5))


@pytest.mark.parametrize(("value", "field", "message"), [
    ("x", "references", "expected a list"),
    (["a.wav"], r"references\[0\]", "expected an object"),
    ([{"caption": "c"}], r"references\[0\]\.audio", "non-empty path"),
    ([{"audio": "a.wav", "caption": "c"}, {"audio": "b", "caption": " "}], r"references\[1\]\.caption", "non-empty"),
    ([{"audio": "a.wav", "captions": ["c"]}], r"references\[0\]", "unknown key"),
    ([{"audio": "a.wav", "caption": "c", "sources": "s"}], r"references\[0\]\.sources", "list of strings"),
])  # fmt: skip
def test_malformed_references_name_file_line_field(tmp_path, value, field, message):
    lines = [{"id": "a", "audio": "a.wav"}, {"id": "b", "audio": "b.wav", "references": value}]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    (line, item), = [(n, i) for n, i in manifest_lines(path) if i.id == "b"]
    assert line == 2
    with pytest.raises(ManifestError, match=rf"m\.jsonl:2: field '{field}': .*{message}"):
        item_references(item, tmp_path, manifest=path, line=line)
    (problem,) = check_references(path)
    assert (problem.line, problem.item_id, problem.kind) == (2, "b", "malformed") and "m.jsonl:2" in str(problem)


def test_item_references_resolve_paths(tmp_path):
    item = ManifestItem("a", tmp_path / "a.wav", extra={"references": [
        {"audio": "refs/../r.wav", "caption": "c"}, {"audio": "/abs/r.wav", "caption": "d", "sources": ["s"]}]})
    refs = item_references(item, tmp_path)
    assert [r.audio for r in refs] == [tmp_path / "r.wav", Path("/abs/r.wav")] and refs[1].sources == ("s",)


def test_check_references_finds_missing_and_unreadable(built, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(built["concat"].parent, out)
    manifest = out / "manifest.jsonl"
    assert check_references(manifest) == []
    lines = manifest_lines(manifest)
    (l1, first), (l2, second) = lines[1], lines[3]
    item_references(first, out)[0].audio.unlink()
    item_references(second, out)[1].audio.write_bytes(b"not audio at all")
    problems = check_references(manifest)
    assert [(p.line, p.item_id, p.kind) for p in problems] == [(l1, first.id, "missing"),
                                                               (l2, second.id, "unreadable")]  # fmt: skip
    assert "references[0]: no such file" in str(problems[0]) and f"item {second.id!r}" in str(problems[1])


def test_masking_rate_and_spans():
    gen = torch.Generator().manual_seed(0)
    refs = torch.randn(4000, 3, 50) + 10.0  # never 0 before masking
    present = torch.ones(4000, 3, dtype=torch.bool)
    present[:, 2] = False  # padding slots are never masked
    out, masked = mask_reference_content(refs, present, p=0.1, generator=gen, span=(0.2, 0.5))
    assert not masked[:, 2].any() and masked[:, :2].float().mean().item() == pytest.approx(0.1, abs=0.01)
    hidden = out == 0
    assert torch.equal(hidden.any(-1), masked)
    assert torch.equal(out[~hidden], refs[~hidden])
    lengths = hidden.sum(-1)[masked]
    assert lengths.min() >= 10 and lengths.max() <= 25  # 20..50 % of 50 frames
    first, steps = hidden.float().argmax(-1)[masked], torch.arange(50)
    span = (steps >= first[:, None]) & (steps < (first + lengths)[:, None])
    assert torch.equal(hidden[masked], span)  # one contiguous span per masked reference
    again, _ = mask_reference_content(refs, present, p=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, out)
    lat, m = mask_reference_content(torch.ones(200, 2, 4, 12, 8), torch.ones(200, 2, dtype=torch.bool), p=1.0,
                                    generator=gen, time_dim=-2)  # latents: a span of frames, all channels/bins
    assert m.all() and torch.equal((lat == 0).all(2).all(-1).sum(-1), (lat == 0).any(2).any(-1).sum(-1))
    with pytest.raises(ValueError, match="present must be a bool tensor of shape"):
        mask_reference_content(refs, present.float())


def test_dropping_rate():
    gen = torch.Generator().manual_seed(1)
    refs = torch.rand(5000, 3, 16) + 1.0
    present = torch.ones(5000, 3, dtype=torch.bool)
    present[::2, 2] = False
    out, keep, dropped = drop_references(refs, present, p=0.4, generator=gen)
    assert dropped.shape == (5000,) and dropped.float().mean().item() == pytest.approx(0.4, abs=0.02)
    assert not keep[dropped].any() and torch.equal(keep[~dropped], present[~dropped])
    assert (out[dropped] == 0).all() and torch.equal(out[~dropped], refs[~dropped])
    _, keep, each = drop_references(refs, present, p=0.4, generator=gen, per_reference=True)
    assert each.shape == (5000, 3) and each.float().mean().item() == pytest.approx(0.4, abs=0.02)
    assert torch.equal(keep, present & ~each)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        drop_references(refs, present, p=1.5)


def test_overlay_redraws_silent_base_segments(tmp_path):
    t = np.arange(2 * SR) / SR
    tone = 0.1 * np.sin(2 * np.pi * 300 * t)
    half_silent = np.where(t < 1.0, tone, 0.0)  # an insert in the second half would sit on silence
    items = [ManifestItem(f"s{j}", save_audio(tmp_path / f"s{j}.wav", tone[: 3000 + 1000 * j], SR), [f"beep {j}"])
             for j in range(3)]  # fmt: skip
    quiet = ManifestItem("quiet", save_audio(tmp_path / "quiet.wav", half_silent, SR), ["a hum"])
    loud = ManifestItem("loud", save_audio(tmp_path / "loud.wav", tone, SR), ["a drone"])
    config = CustomizeConfig("overlay", 6, seconds=2, max_short=1, sample_rate=SR)
    mixed = build_customized(write_manifest([*items, quiet, loud], tmp_path / "m.jsonl"), tmp_path / "a", config)
    assert {i.extra["customize"]["base"]["source"] for i in read_manifest(mixed)} == {"loud"}
    assert json.loads((tmp_path / "a" / "customize.json").read_text())["rejected_draws"] > 0
    with pytest.raises(ValueError, match="overlay item overlay_nosplit_000000: 32 draws .* silent base segment"):
        build_customized(write_manifest([*items, quiet], tmp_path / "q.jsonl"), tmp_path / "b", config)
    assert not (tmp_path / "b").exists()


def test_tta_data_customize_and_check_through_the_cli(base, tmp_path, caplog):
    from tta.data.commands import main as data_main

    out = tmp_path / "cli"
    assert data_main(["customize", "--base", str(base), "--out", str(out), "--kind", "concat", "--n", "3",
                      "--seconds", "2", "--max-short", "1", "--sample-rate", str(SR), "--split", "train"]) == 0
    manifest = out / "manifest.jsonl"
    assert data_main(["check", str(manifest), "--mel", "none"]) == 0
    item = manifest_lines(manifest)[0][1]
    item_references(item, out)[0].audio.unlink()  # a reference gone: `tta data check` names it and fails
    with caplog.at_level("ERROR"):
        assert data_main(["check", str(manifest), "--mel", "none"]) == 1
    assert f"item {item.id!r}: missing" in caplog.text
