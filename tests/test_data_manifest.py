"""JSONL manifests: round trip, relative paths, validation errors naming file/line/field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tta.data.manifest import (
    ManifestError,
    ManifestItem,
    filter_split,
    read_manifest,
    write_manifest,
)


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_roundtrip_relative_paths(tmp_path):
    audio = tmp_path / "data" / "audio" / "a.wav"
    items = [
        ManifestItem(id="a", audio=audio, captions=["un café", "a dog"], labels=["dog"], duration=1.5,
                     sample_rate=16000, split="train", extra={"fold": 3}),
        ManifestItem(id="b", audio=tmp_path / "other" / "b.wav", split="test"),
    ]
    path = write_manifest(items, tmp_path / "data" / "m.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    assert first["audio"] == "audio/a.wav"
    assert json.loads(lines[1])["audio"] == "../other/b.wav"
    assert list(first) == ["id", "audio", "captions", "labels", "duration", "sample_rate", "split", "fold"]
    assert "un café" in lines[0]  # ensure_ascii=False
    back = read_manifest(path)
    assert back[0].audio == audio and back[0].audio.is_absolute()
    assert back[0].captions == ["un café", "a dog"] and back[0].extra == {"fold": 3}
    assert back[1].audio == (tmp_path / "other" / "b.wav").absolute()
    assert back[1].captions == [] and back[1].duration is None
    # deterministic bytes when rewritten
    again = write_manifest(back, tmp_path / "data" / "m2.jsonl")
    assert again.read_bytes() == path.read_bytes()


def test_relative_item_path_is_kept_and_resolved(tmp_path):
    write_manifest([ManifestItem(id="x", audio=Path("clips/x.wav"))], tmp_path / "m.jsonl")
    item = read_manifest(tmp_path / "m.jsonl")[0]
    assert item.audio == tmp_path.absolute() / "clips" / "x.wav"
    assert ManifestItem(id="y", audio=Path("y.wav")).audio_path(tmp_path) == tmp_path / "y.wav"


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ('{"id": "a", "audio": "a.wav"', r"m.jsonl:2: invalid JSON"),
        ('{"audio": "a.wav"}', r"m.jsonl:2: field 'id': missing required field"),
        ('{"id": "b"}', r"m.jsonl:2: field 'audio': missing required field"),
        ('{"id": 5, "audio": "a.wav"}', r"m.jsonl:2: field 'id': expected a non-empty string"),
        ('{"id": "b", "audio": "b.wav", "captions": "a dog"}', r"m.jsonl:2: field 'captions': expected a list"),
        ('{"id": "b", "audio": "b.wav", "labels": [1]}', r"m.jsonl:2: field 'labels': expected a list"),
        ('{"id": "b", "audio": "b.wav", "duration": "1s"}', r"m.jsonl:2: field 'duration'"),
        ('{"id": "b", "audio": "b.wav", "sample_rate": 16000.5}', r"m.jsonl:2: field 'sample_rate'"),
        ('{"id": "b", "audio": "b.wav", "split": 1}', r"m.jsonl:2: field 'split'"),
        ('{"id": "a", "audio": "c.wav"}', r"m.jsonl:2: field 'id': duplicate id 'a' \(first on line 1\)"),
        ("[1, 2]", r"m.jsonl:2: expected a JSON object"),
    ],
)
def test_invalid_lines(tmp_path, line, pattern):
    path = _write_lines(tmp_path / "m.jsonl", ['{"id": "a", "audio": "a.wav"}', line])
    with pytest.raises(ManifestError, match=pattern) as info:
        read_manifest(path)
    assert info.value.line == 2


def test_blank_lines_skipped_and_line_numbers_counted(tmp_path):
    path = _write_lines(tmp_path / "m.jsonl", ['{"id": "a", "audio": "a.wav"}', "", '{"id": "a", "audio": "b"}'])
    with pytest.raises(ManifestError, match=":3: "):
        read_manifest(path)


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "none.jsonl")


def test_write_rejects_duplicates_and_leaves_no_file(tmp_path):
    items = [ManifestItem(id="a", audio=tmp_path / "a.wav"), ManifestItem(id="a", audio=tmp_path / "b.wav")]
    with pytest.raises(ManifestError, match="duplicate id 'a'"):
        write_manifest(items, tmp_path / "m.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_filter_split(tmp_path):
    splits = ["train", "val", "train"]
    items = [ManifestItem(id=str(i), audio=tmp_path / "a.wav", split=s) for i, s in enumerate(splits)]
    assert [i.id for i in filter_split(items, "train")] == ["0", "2"]
    assert [i.id for i in filter_split(items, ["val", "test"])] == ["1"]
    assert filter_split(items, "heldout") == []


def test_non_utf8_line_named_by_line_and_column(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"id": "a", "audio": "a.wav"}\n{"id": "caf\xe9", "audio": "b.wav"}\n')
    with pytest.raises(ManifestError, match=r"m.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 12\)") as info:
        read_manifest(path)
    assert info.value.line == 2
    path.write_bytes('{"id": "café", "audio": "b.wav"}\r\n'.encode())  # valid UTF-8 and CRLF still read
    assert [i.id for i in read_manifest(path)] == ["café"]
