"""AudioSet labels for AudioCaps clips: segment lists + class list -> display names."""

from __future__ import annotations

from pathlib import Path

import pytest

from tta.data.audioset_labels import AudioSetMetadataError, audioset_labels, read_segments

CLASSES = 'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/0bt9lr,"Dog"\n2,/m/05tny_,"Bark"\n'
SEGMENTS = """# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=4
# YTID, start_seconds, end_seconds, positive_labels
--4gqARaEJE, 0.000, 10.000, "/m/0bt9lr,/m/05tny_"
--aaILOrkII, 200.000, 210.000, "/m/09x0r"
"""


def _files(tmp_path: Path, segments: str = SEGMENTS) -> tuple[Path, Path]:
    (tmp_path / "classes.csv").write_text(CLASSES)
    (tmp_path / "segments.csv").write_text(segments)
    return tmp_path / "segments.csv", tmp_path / "classes.csv"


def test_labels_of_known_clips(tmp_path: Path) -> None:
    segments, classes = _files(tmp_path)
    out = audioset_labels(["--4gqARaEJE", "--aaILOrkII", "not-in-audioset"], [segments], classes)
    assert out == {"--4gqARaEJE": ["Dog", "Bark"], "--aaILOrkII": ["Speech"]}


def test_bad_metadata_names_file_and_line(tmp_path: Path) -> None:
    segments, classes = _files(tmp_path, SEGMENTS + '--bad, 0.0, 10.0, "/m/unknown"\n')
    with pytest.raises(AudioSetMetadataError, match=r"segments.csv:6: label id\(s\) \['/m/unknown'\]"):
        audioset_labels(["--bad"], [segments], classes)
    (tmp_path / "short.csv").write_text("# header\nabc, 0.0\n")
    with pytest.raises(AudioSetMetadataError, match=r"short.csv:2: expected YTID.*got 2 fields"):
        read_segments(tmp_path / "short.csv")
    (tmp_path / "cls.csv").write_text("index,name\n0,x\n")
    with pytest.raises(AudioSetMetadataError, match=r"cls.csv:1: missing column\(s\) \['display_name', 'mid'\]"):
        audioset_labels([], [segments], tmp_path / "cls.csv")
    with pytest.raises(FileNotFoundError, match="AudioSet metadata file not found"):
        audioset_labels([], [tmp_path / "absent.csv"], classes)


def test_ontology_json_names_classes(tmp_path: Path) -> None:
    import json

    segments, _ = _files(tmp_path)
    ontology = tmp_path / "ontology.json"
    ontology.write_text(json.dumps([{"id": "/m/09x0r", "name": "Speech", "child_ids": []},
                                    {"id": "/m/0bt9lr", "name": "Dog"}, {"id": "/m/05tny_", "name": "Bark"}]))
    assert audioset_labels(["--4gqARaEJE"], [segments], ontology) == {"--4gqARaEJE": ["Dog", "Bark"]}
    ontology.write_text('{"id": "/m/09x0r"}')
    with pytest.raises(AudioSetMetadataError, match="must be a JSON list"):
        audioset_labels(["--4gqARaEJE"], [segments], ontology)
