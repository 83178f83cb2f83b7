"""AudioSet labels of AudioCaps clips (Re-AudioLDM's long-tail buckets, Fig. 4).

AudioCaps clips are AudioSet segments, so their sound-event labels come from AudioSet's own
metadata, which the AudioCaps CSVs do not repeat:

- segment lists (``balanced_train_segments.csv``, ``unbalanced_train_segments.csv``,
  ``eval_segments.csv``): ``# `` comment lines, then ``YTID, start_seconds, end_seconds,
  positive_labels`` with the labels a quoted comma-separated list of machine ids (``/m/09x0r``);
- the class list ``class_labels_indices.csv`` (``index,mid,display_name``) or the ontology
  ``ontology.json`` (``[{"id": "/m/09x0r", "name": "Speech", ...}, ...]``).

`audioset_labels` maps YouTube ids to display names ("Speech", "Dog", ...). A machine id that the
class list lacks is an error naming the segment file and line; a clip absent from every segment
list gets no labels and is reported by the caller.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["audioset_labels", "read_class_labels", "read_segments"]


class AudioSetMetadataError(ValueError):
    """AudioSet metadata is malformed; the message names the file and line."""


def _open(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AudioSet metadata file not found: {path}")
    return path


def read_class_labels(path: str | os.PathLike) -> dict[str, str]:
    """``{mid: display_name}`` of ``class_labels_indices.csv`` or of the AudioSet ontology
    (``ontology.json``: a list of ``{"id", "name", ...}``)."""
    path = _open(path)
    if path.suffix == ".json":
        return _read_ontology(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"mid", "display_name"} - set(reader.fieldnames or ())
        if missing:
            raise AudioSetMetadataError(f"{path}:1: missing column(s) {sorted(missing)} (have {reader.fieldnames})")
        out = {}
        for line, row in enumerate(reader, start=2):
            mid, name = (row["mid"] or "").strip(), (row["display_name"] or "").strip()
            if not mid or not name:
                raise AudioSetMetadataError(f"{path}:{line}: empty mid or display_name")
            out[mid] = name
    return out


def _read_ontology(path: Path) -> dict[str, str]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AudioSetMetadataError(f"{path}: not a JSON ontology ({exc})") from exc
    if not isinstance(entries, list):
        raise AudioSetMetadataError(f"{path}: the ontology must be a JSON list of {{'id', 'name'}} objects")
    out = {}
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("id") or not entry.get("name"):
            raise AudioSetMetadataError(f"{path}: entry {k} has no 'id' and 'name'")
        out[str(entry["id"])] = str(entry["name"])
    return out


def read_segments(path: str | os.PathLike) -> dict[str, tuple[str, list[str]]]:
    """``{ytid: (where, [mid, ...])}`` of one segment list; ``where`` is ``file:line`` for errors."""
    path = _open(path)
    out: dict[str, tuple[str, list[str]]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f, skipinitialspace=True), start=1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 4:
                raise AudioSetMetadataError(f"{path}:{line}: expected YTID, start_seconds, end_seconds, "
                                            f"positive_labels; got {len(row)} fields")
            mids = [m.strip() for m in row[3].split(",") if m.strip()]
            if not mids:
                raise AudioSetMetadataError(f"{path}:{line}: no positive_labels")
            out[row[0].strip()] = (f"{path}:{line}", mids)
    return out


def audioset_labels(ytids: Iterable[str], segment_files: Iterable[str | os.PathLike],
                    class_labels: str | os.PathLike | Mapping[str, str]) -> dict[str, list[str]]:
    """``{ytid: [display names]}`` for the ``ytids`` found in any of ``segment_files`` (later files
    do not override earlier ones); ids found nowhere are left out."""
    names = class_labels if isinstance(class_labels, Mapping) else read_class_labels(class_labels)
    segments: dict[str, tuple[str, list[str]]] = {}
    for path in segment_files:
        for ytid, entry in read_segments(path).items():
            segments.setdefault(ytid, entry)
    out: dict[str, list[str]] = {}
    for ytid in ytids:
        if ytid not in segments:
            continue
        where, mids = segments[ytid]
        unknown = [m for m in mids if m not in names]
        if unknown:
            raise AudioSetMetadataError(f"{where}: label id(s) {unknown} are not in the AudioSet class list")
        out[ytid] = [names[m] for m in mids]
    return out
