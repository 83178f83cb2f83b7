"""Dataset adapters on fixture metadata in each dataset's real format, plus `tta data manifest`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tta.data.adapters import (
    MetadataError,
    audiocaps,
    build_manifest,
    clotho,
    esc50,
    folder,
    label_caption,
    us8k,
    wavcaps,
)  # fmt: skip
from tta.data.commands import main
from tta.data.manifest import read_manifest

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def _wav(path: Path, seconds: float = 0.1, sr: int = 8000, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = 0.1 * np.random.default_rng(0).standard_normal((int(sr * seconds), channels))
    sf.write(path, data, sr, format="FLAC" if path.suffix == ".flac" else "WAV")
    return path


def _copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def test_audiocaps_groups_captions_and_finds_audio(tmp_path, caplog):
    root = _copy("audiocaps", tmp_path)
    audio = root / "audio"
    _wav(audio / "train" / "r1nicOVtvkQ_130.wav", 0.5, 16000)  # {ytid}_{start} in a split folder
    _wav(audio / "UDGBjjwyaqE.flac", 0.25, 32000)  # {ytid}.flac
    _wav(audio / "97151.wav")  # {audiocap_id}.wav
    _wav(audio / "Y--0w1YA1Hm4.wav")
    _wav(audio / "AxkTW3eIBf8_40.wav")
    # 7fmOlUlwoNg has no audio
    with caplog.at_level("WARNING", logger="tta.data.adapters"):
        result = audiocaps(root)
    assert "1 clips with no audio file: 7fmOlUlwoNg" in caplog.text
    ids = {i.id: i for i in result.items}
    assert result.missing == ["7fmOlUlwoNg"] and result.rows == 15
    assert set(ids) == {"r1nicOVtvkQ", "UDGBjjwyaqE", "rqfQRErjfk8", "--0w1YA1Hm4", "AxkTW3eIBf8"}
    assert len(ids["--0w1YA1Hm4"].captions) == 5 and ids["--0w1YA1Hm4"].split == "test"
    assert ids["rqfQRErjfk8"].captions == ["A large crowd cheers and applauds, then a man speaks",
                                           "An audience cheers and applauds"]
    assert ids["rqfQRErjfk8"].split == "val" and ids["rqfQRErjfk8"].audio == (audio / "97151.wav").absolute()
    assert ids["r1nicOVtvkQ"].sample_rate == 16000 and ids["r1nicOVtvkQ"].duration == pytest.approx(0.5)
    assert ids["UDGBjjwyaqE"].audio.name == "UDGBjjwyaqE.flac" and ids["UDGBjjwyaqE"].sample_rate == 32000
    assert ids["r1nicOVtvkQ"].extra == {"start_time": 130}
    assert result.summary()["splits"] == {"test": 2, "train": 2, "val": 1}


def test_audiocaps_labels_from_audioset_metadata(tmp_path, caplog):
    root = _copy("audiocaps", tmp_path)
    for name in ("r1nicOVtvkQ_130.wav", "UDGBjjwyaqE.flac", "97151.wav", "Y--0w1YA1Hm4.wav", "AxkTW3eIBf8_40.wav"):
        _wav(root / "audio" / name)
    (tmp_path / "classes.csv").write_text('index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/0bt9lr,"Dog"\n')
    (tmp_path / "eval_segments.csv").write_text('# YTID, start_seconds, end_seconds, positive_labels\n'
                                                '--0w1YA1Hm4, 30.000, 40.000, "/m/09x0r,/m/0bt9lr"\n')
    (tmp_path / "train_segments.csv").write_text('r1nicOVtvkQ, 130.000, 140.000, "/m/0bt9lr"\n')
    out = tmp_path / "labelled.jsonl"
    with caplog.at_level("WARNING", logger="tta.data.adapters"):
        assert main(["manifest", "--format", "audiocaps", "--root", str(root), "--out", str(out),
                     "--audioset-segments", str(tmp_path / "train_segments.csv"),
                     "--audioset-segments", str(tmp_path / "eval_segments.csv"),
                     "--audioset-classes", str(tmp_path / "classes.csv")]) == 0
    labels = {i.id: i.labels for i in read_manifest(out)}
    assert labels["--0w1YA1Hm4"] == ["Speech", "Dog"] and labels["r1nicOVtvkQ"] == ["Dog"]
    assert labels["UDGBjjwyaqE"] == [] and "4 of 6 clips are in none of the AudioSet segment lists" in caplog.text
    assert main(["manifest", "--format", "audiocaps", "--root", str(root), "--out", str(out),
                 "--audioset-classes", str(tmp_path / "classes.csv")]) == 2
    with pytest.raises(ValueError, match="give both audioset_segments"):
        audiocaps(root, audioset_classes=tmp_path / "classes.csv")


def test_clotho_splits_and_five_captions(tmp_path):
    root = _copy("clotho", tmp_path)
    _wav(root / "development" / "Distorted AM Radio noise.wav")
    _wav(root / "development" / "Paper_Parchment_Rustling.wav")
    _wav(root / "validation" / "Creaking bunk bed.wav")
    result = clotho(root)
    assert result.missing == ["Santa Motor"]
    by_id = {i.id: i for i in result.items}
    paper = by_id["Paper_Parchment_Rustling"]
    assert paper.split == "train" and len(paper.captions) == 5
    assert paper.captions[0] == "A person is turning a map over and over, crinkling it."
    assert by_id["Creaking bunk bed"].split == "val"


def test_wavcaps_sources_do_not_collide(tmp_path):
    root = _copy("wavcaps", tmp_path)
    audio = tmp_path / "waveforms"
    _wav(audio / "FreeSound_flac" / "180913.flac", 0.2)
    _wav(audio / "FreeSound_flac" / "78661.flac", 0.3)
    _wav(audio / "SoundBible" / "180913.wav", 0.4)
    result = wavcaps(root, audio_dir=audio)
    by_id = {i.id: i for i in result.items}
    assert result.missing == ["fsd_final/1234"] and result.rows == 4
    assert by_id["fsd_final/180913"].captions == ["A traditional ringtone is playing."]
    assert by_id["fsd_final/180913"].duration == pytest.approx(0.2)
    assert by_id["sb_final/180913"].duration == pytest.approx(0.4)
    assert {i.split for i in result.items} == {"train"}


def test_wavcaps_bad_json(tmp_path):
    (tmp_path / "x.json").write_text('{"data": {"id": 1}}')
    with pytest.raises(MetadataError, match="x.json.*'data' list"):
        wavcaps(tmp_path / "x.json")


def test_esc50_folds_labels_captions(tmp_path):
    root = _copy("esc50", tmp_path)
    for name in ("1-100032-A-0.wav", "1-100038-A-14.wav", "4-181286-A-10.wav", "5-200334-A-1.wav"):
        _wav(root / "audio" / name)
    result = esc50(root, val_fold=4)
    by_id = {i.id: i for i in result.items}
    assert result.missing == ["5-9032-A-0"]
    assert by_id["1-100032-A-0"].labels == ["dog"] and by_id["1-100032-A-0"].captions == ["the sound of a dog"]
    assert by_id["1-100038-A-14"].captions == ["the sound of chirping birds"]
    assert [by_id[k].split for k in ("1-100032-A-0", "4-181286-A-10", "5-200334-A-1")] == ["train", "val", "test"]
    assert by_id["5-200334-A-1"].extra == {"fold": 5}
    assert {i.split for i in esc50(root, test_fold=1).items} == {"test", "train"}


def test_us8k_folds(tmp_path):
    root = _copy("us8k", tmp_path)
    _wav(root / "audio" / "fold5" / "100032-3-0-0.wav")
    _wav(root / "audio" / "fold10" / "101415-3-0-2.wav")
    _wav(root / "audio" / "fold1" / "102305-6-0-0.wav")
    _wav(root / "audio" / "fold1" / "100263-2-0-117.wav")  # wrong fold folder: must count as missing
    result = us8k(root)
    by_id = {i.id: i for i in result.items}
    assert result.missing == ["100263-2-0-117"]
    assert by_id["101415-3-0-2"].split == "test" and by_id["100032-3-0-0"].split == "train"
    assert by_id["102305-6-0-0"].captions == ["the sound of a gun shot"]
    assert by_id["100032-3-0-0"].labels == ["dog_bark"]


def test_label_caption_template():
    assert label_caption("air_conditioner") == "the sound of an air conditioner"
    assert label_caption("rain", "{label} can be heard") == "rain can be heard"


def test_folder_sidecars_labels_and_unreadable(tmp_path):
    root = tmp_path / "clips"
    _wav(root / "dogs" / "d1.wav")
    (root / "dogs" / "d1.txt").write_text("a dog barks\n\n  a puppy yelps  \n")
    _wav(root / "birds" / "b1.flac")
    _wav(root / ".hidden" / "h.wav")
    (root / "broken.wav").write_bytes(b"not audio at all" * 10)
    result = folder(root, labels_from_dirs=True, split="val")
    by_id = {i.id: i for i in result.items}
    assert set(by_id) == {"dogs/d1", "birds/b1"}
    assert by_id["dogs/d1"].captions == ["a dog barks", "a puppy yelps"] and by_id["dogs/d1"].labels == ["dogs"]
    assert by_id["birds/b1"].captions == [] and result.no_caption == ["birds/b1"]
    assert result.unreadable == ["broken"] and not result.ok
    assert {i.split for i in result.items} == {"val"}


def test_folder_duplicate_stem_is_an_error(tmp_path):
    _wav(tmp_path / "a.wav")
    _wav(tmp_path / "a.flac")
    with pytest.raises(MetadataError, match="id 'a' is also used"):
        folder(tmp_path)


def test_missing_columns_are_reported(tmp_path):
    root = tmp_path / "esc"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "esc50.csv").write_text("filename,fold,category\nx.wav,1,dog\n")
    with pytest.raises(MetadataError, match=r"esc50.csv:1: missing column\(s\) \['target'\]"):
        build_manifest("esc50", root)
    (root / "meta" / "esc50.csv").write_text("filename,fold,target,category\nx.wav,one,0,dog\n")
    with pytest.raises(MetadataError, match=r"esc50.csv:2: column 'fold': expected an integer"):
        build_manifest("esc50", root)


def test_cli_manifest_strict_and_summary(tmp_path, capsys):
    root = _copy("esc50", tmp_path)
    for name in ("1-100032-A-0.wav", "1-100038-A-14.wav", "4-181286-A-10.wav", "5-200334-A-1.wav"):
        _wav(root / "audio" / name)
    out = tmp_path / "manifests" / "esc50.jsonl"
    assert main(["manifest", "--format", "esc50", "--root", str(root), "--out", str(out), "--strict"]) == 1
    assert not out.exists()
    assert main(["manifest", "--format", "esc50", "--root", str(root), "--out", str(out)]) == 0
    items = read_manifest(out)
    assert len(items) == 4 and items[0].audio.is_file()
    assert '"audio": "../esc50/audio/1-100032-A-0.wav"' in out.read_text()
    assert (tmp_path / "manifests" / "esc50.jsonl.missing.txt").read_text() == "5-9032-A-0\tmissing\n"
    printed = capsys.readouterr().out
    assert "missing" in printed and "split test" in printed
    # a flag that does not apply to the format is refused
    assert main(["manifest", "--format", "esc50", "--root", str(root), "--out", str(out), "--split", "x"]) == 2


def test_jsonl_caption_label_library(tmp_path, capsys):
    """An in-house "caption + category" JSONL (fixture: custom field names, one clip without audio)."""
    root = _copy("jsonl_caption_label", tmp_path)
    for name in ("doors/door_slam_01.wav", "doors/door_creak_02.wav", "weather/rain_roof.wav"):
        _wav(root / "sfx" / name)
    fields = {"path_field": "file", "caption_field": "description", "label_field": "category"}
    result = build_manifest("jsonl-caption-label", root / "library.jsonl", **fields)
    assert result.rows == 4 and result.missing == ["sfx/weather/thunder_far"]
    items = {i.id: i for i in result.items}
    assert items["sfx/doors/door_creak_02"].captions == ["a door creaks open slowly", "creaking hinge"]
    assert items["sfx/doors/door_creak_02"].labels == ["doors", "foley"]
    assert items["sfx/doors/door_slam_01"].labels == ["doors"] and items["sfx/doors/door_slam_01"].split == "train"
    assert items["sfx/weather/rain_roof"].split == "test" and items["sfx/weather/rain_roof"].sample_rate == 8000
    out = tmp_path / "lib.jsonl"
    argv = ["manifest", "--format", "jsonl-caption-label", "--root", str(root / "library.jsonl"), "--out", str(out),
            "--path-field", "file", "--caption-field", "description", "--label-field", "category", "--split", "val"]
    assert main(argv) == 0
    assert {i.split for i in read_manifest(out)} == {"val", "test"}
    # the default field names do not match this file: the first line is refused by line and field
    capsys.readouterr()
    assert main(argv[:7]) == 1
    err = capsys.readouterr().err
    assert err.strip().endswith("library.jsonl:1: field 'path' (--path-field): expected the audio path, got None")
    # field-name options belong to this format only
    assert main(["manifest", "--format", "esc50", "--root", str(root), "--out", str(out), "--label-field", "x"]) == 2


def test_jsonl_caption_label_refuses_bad_rows(tmp_path):
    path = tmp_path / "lib.jsonl"
    for text, message in (('{"path": "a.wav", "caption": 3}\n', r"lib.jsonl:1: field 'caption': expected a string"),
                          ('{"path": "a.wav"}\n{"path": "a.flac"}\n', r"lib.jsonl:2: id 'a' .* also on line 1"),
                          ('\n[1]\n', r"lib.jsonl:2: expected a JSON object"),
                          (b'{"path": "a.wav", "caption": "caf\xe9"}\n', r"lib.jsonl:1: not valid UTF-8")):
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
        with pytest.raises(MetadataError, match=message):
            build_manifest("jsonl-caption-label", path)
    with pytest.raises(MetadataError, match="give the file, not its folder"):
        build_manifest("jsonl-caption-label", tmp_path)
