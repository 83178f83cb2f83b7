"""Adapters turning public datasets' own metadata into `ManifestItem` lists.

Supported layouts (see ``docs/data.md`` for the expected folders):

- ``audiocaps``: ``{train,val,test}.csv`` (``audiocap_id,youtube_id,start_time,caption``), rows grouped
  per ``youtube_id``;
- ``clotho``: ``clotho_captions_{development,validation,evaluation}.csv`` + audio folders;
- ``wavcaps``: the WavCaps JSON files (``{"data": [{"id", "caption", ...}]}``);
- ``esc50``: ``meta/esc50.csv`` + ``audio/``;
- ``us8k``: ``metadata/UrbanSound8K.csv`` + ``audio/fold{N}/``;
- ``folder``: audio files found recursively, captions in sidecar ``<stem>.txt`` files;
- ``jsonl-caption-label``: an in-house JSONL with an audio path, caption(s) and label(s) per line
  (field names configurable).

``duration`` and ``sample_rate`` come from the audio headers (``soundfile.info``). A clip whose
audio cannot be found or read is never silently dropped: its id is listed in
`AdapterResult.missing` / `AdapterResult.unreadable` and logged.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tta.data.audio import AudioLoadError, audio_info
from tta.data.manifest import ManifestItem

log = logging.getLogger(__name__)

__all__ = [
    "ADAPTERS",
    "AUDIO_EXTENSIONS",
    "AdapterResult",
    "MetadataError",
    "audiocaps",
    "build_manifest",
    "clotho",
    "esc50",
    "folder",
    "jsonl_caption_label",
    "label_caption",
    "us8k",
    "wavcaps",
]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
DEFAULT_TEMPLATE = "the sound of {label}"
# Class names that read as a countable singular noun and take "a"/"an" in a templated caption.
_COUNTABLE = {
    "dog", "rooster", "pig", "cow", "frog", "cat", "hen", "sheep", "crow", "crying baby", "mouse click",
    "door wood knock", "door wood creaks", "can opening", "washing machine", "vacuum cleaner", "clock alarm",
    "clock tick", "helicopter", "chainsaw", "siren", "car horn", "engine", "train", "airplane", "hand saw",
    "air conditioner", "dog bark", "drilling", "engine idling", "gun shot", "jackhammer",
}  # fmt: skip


class MetadataError(ValueError):
    """Dataset metadata is malformed; the message names the file, line and column."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


@dataclass
class AdapterResult:
    """Items built by an adapter plus the clips that could not be used."""

    format: str
    items: list[ManifestItem] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    no_caption: list[str] = field(default_factory=list)
    rows: int = 0

    @property
    def ok(self) -> bool:
        """True when every clip of the metadata has readable audio."""
        return not self.missing and not self.unreadable

    def summary(self) -> dict[str, Any]:
        """Counts: metadata rows, items, captions, missing/unreadable/uncaptioned clips, per split."""
        splits: dict[str, int] = {}
        for item in self.items:
            splits[item.split or "none"] = splits.get(item.split or "none", 0) + 1
        return {
            "format": self.format,
            "rows": self.rows,
            "items": len(self.items),
            "captions": sum(len(i.captions) for i in self.items),
            "missing": len(self.missing),
            "unreadable": len(self.unreadable),
            "no_caption": len(self.no_caption),
            "splits": dict(sorted(splits.items())),
        }


@dataclass
class _Pending:
    id: str
    audio: Path | None
    captions: list[str]
    labels: list[str]
    split: str
    extra: dict[str, Any] = field(default_factory=dict)


class _DirIndex:
    """Cached, non-recursive listing of directories, to look files up without many stat calls."""

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = [d for d in dirs if d.is_dir()]
        self._names: dict[Path, set[str]] = {}

    def _listing(self, d: Path) -> set[str]:
        if d not in self._names:
            with os.scandir(d) as it:
                self._names[d] = {e.name for e in it if e.is_file()}
        return self._names[d]

    def find(self, names: list[str]) -> Path | None:
        for name in names:
            for d in self.dirs:
                if name in self._listing(d):
                    return d / name
        return None


def _finish(fmt: str, pending: list[_Pending], rows: int) -> AdapterResult:
    """Read the headers of the found audio files and build the result (logging every loss)."""
    result = AdapterResult(format=fmt, rows=rows)
    for p in pending:
        if p.audio is None:
            result.missing.append(p.id)
            continue
        try:
            info = audio_info(p.audio)
        except AudioLoadError as exc:
            log.warning("%s", exc)
            result.unreadable.append(p.id)
            continue
        captions = [c.strip() for c in p.captions if c and c.strip()]
        if not captions:
            result.no_caption.append(p.id)
        result.items.append(
            ManifestItem(
                id=p.id, audio=p.audio.absolute(), captions=captions, labels=list(p.labels),
                duration=round(info.duration, 6), sample_rate=info.sample_rate, split=p.split, extra=p.extra,
            )
        )  # fmt: skip
    for what, ids in (("no audio file", result.missing), ("unreadable audio", result.unreadable)):
        if ids:
            shown = ", ".join(ids[:20]) + (f", ... ({len(ids) - 20} more)" if len(ids) > 20 else "")
            log.warning("%s: %d clips with %s: %s", fmt, len(ids), what, shown)
    if result.no_caption:
        log.warning("%s: %d clips have no caption (kept)", fmt, len(result.no_caption))
    return result


def _read_csv(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV with a header, with their line numbers; checks the required columns."""
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        absent = [c for c in required if c not in header]
        if absent:
            raise MetadataError(path, f"missing column(s) {absent}; header is {header}", line=1)
        for row in reader:
            if None in row or any(row.get(c) is None for c in required):
                raise MetadataError(path, "wrong number of fields", line=reader.line_num)
            yield reader.line_num, row


def _int_field(path: Path, line: int, row: dict[str, str], name: str) -> int:
    try:
        return int(row[name])
    except ValueError as exc:
        raise MetadataError(path, f"column {name!r}: expected an integer, got {row[name]!r}", line) from exc


def label_caption(label: str, template: str = DEFAULT_TEMPLATE) -> str:
    """A templated caption for a class label: ``"dog"`` -> ``"the sound of a dog"``."""
    phrase = label.replace("_", " ").strip().lower()
    if phrase in _COUNTABLE:
        phrase = ("an " if phrase[0] in "aeiou" else "a ") + phrase
    return template.format(label=phrase)


def _split_for_fold(fold: int, test_fold: int, val_fold: int | None) -> str:
    if fold == test_fold:
        return "test"
    if val_fold is not None and fold == val_fold:
        return "val"
    return "train"


def audiocaps(root: str | os.PathLike, audio_dir: str | os.PathLike | None = None,
              audioset_segments: list[str | os.PathLike] | None = None,
              audioset_classes: str | os.PathLike | None = None) -> AdapterResult:
    """AudioCaps: ``root/{train,val,test}.csv``; audio in ``audio_dir`` (default ``root/audio``
    or ``root``) or its ``train/val/test`` subfolders, named ``{youtube_id}_{start_time}``,
    ``{youtube_id}`` or ``Y{youtube_id}`` (``.wav``/``.flac``) or ``{audiocap_id}.wav``.

    Labels (Re-AudioLDM's long-tail buckets): the AudioSet labels of each clip, read from AudioSet's
    segment lists ``audioset_segments`` and class list ``audioset_classes``
    (`tta.data.audioset_labels`); give both or neither. Clips found in no segment list keep empty
    labels and are counted in the log."""
    if (audioset_segments is None) != (audioset_classes is None):
        raise ValueError("audiocaps: give both audioset_segments (segment CSVs) and audioset_classes "
                         "(class_labels_indices.csv), or neither")
    root = Path(root)
    audio_root = Path(audio_dir) if audio_dir else (root / "audio" if (root / "audio").is_dir() else root)
    csvs = [(root / f"{s}.csv", s) for s in ("train", "val", "test") if (root / f"{s}.csv").is_file()]
    if not csvs:
        raise MetadataError(root, "no AudioCaps train.csv/val.csv/test.csv found")
    pending: list[_Pending] = []
    rows = 0
    for csv_path, split in csvs:
        index = _DirIndex([audio_root / split, audio_root])
        groups: dict[str, dict[str, Any]] = {}
        for line, row in _read_csv(csv_path, ("audiocap_id", "youtube_id", "start_time", "caption")):
            rows += 1
            ytid = row["youtube_id"].strip()
            if not ytid:
                raise MetadataError(csv_path, "column 'youtube_id' is empty", line)
            g = groups.setdefault(ytid, {"start": row["start_time"].strip(), "ids": [], "captions": []})
            g["ids"].append(row["audiocap_id"].strip())
            g["captions"].append(row["caption"])
        for ytid, g in groups.items():
            start = g["start"]
            names = [f"{stem}{ext}" for stem in (f"{ytid}_{start}", ytid, f"Y{ytid}") for ext in (".wav", ".flac")]
            names += [f"{aid}.wav" for aid in g["ids"]]
            pending.append(
                _Pending(ytid, index.find(names), g["captions"], [], split, {"start_time": _num(start)})
            )
    if audioset_segments is not None:
        from tta.data.audioset_labels import audioset_labels

        labels = audioset_labels([p.id for p in pending], audioset_segments, audioset_classes)
        pending = [dataclasses.replace(p, labels=labels.get(p.id, [])) for p in pending]
        unlabelled = sum(p.id not in labels for p in pending)
        if unlabelled:
            log.warning("audiocaps: %d of %d clips are in none of the AudioSet segment lists (no labels)",
                        unlabelled, len(pending))
    return _finish("audiocaps", pending, rows)


def _num(text: str) -> float | int | str:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() else value


CLOTHO_SPLITS = {"development": "train", "validation": "val", "evaluation": "test"}


def clotho(root: str | os.PathLike, audio_dir: str | os.PathLike | None = None) -> AdapterResult:
    """Clotho v2: ``root/clotho_captions_{development,validation,evaluation}.csv``
    (``file_name,caption_1..caption_5``); audio in ``audio_dir/{development,validation,evaluation}/``
    (``audio_dir`` defaults to ``root``). Splits: train / val / test."""
    root = Path(root)
    audio_root = Path(audio_dir) if audio_dir else root
    pending: list[_Pending] = []
    rows = 0
    found = False
    for part, split in CLOTHO_SPLITS.items():
        csv_path = root / f"clotho_captions_{part}.csv"
        if not csv_path.is_file():
            continue
        found = True
        index = _DirIndex([audio_root / part, audio_root / f"clotho_audio_{part}", audio_root])
        for _line, row in _read_csv(csv_path, ("file_name", "caption_1")):
            rows += 1
            name = row["file_name"]
            caps = [row[k] for k in sorted(row) if k.startswith("caption_") and row[k]]
            pending.append(_Pending(Path(name).stem, index.find([name]), caps, [], split))
    if not found:
        raise MetadataError(root, "no clotho_captions_{development,validation,evaluation}.csv found")
    return _finish("clotho", pending, rows)


def wavcaps(
    root: str | os.PathLike, audio_dir: str | os.PathLike | None = None, split: str = "train"
) -> AdapterResult:
    """WavCaps: ``root`` is one JSON file or a folder searched for ``*.json``; each entry's audio
    is ``{id}.flac``/``{id}.wav`` under ``audio_dir`` (default: the JSON's folder) or its
    ``<json folder name>[_flac]``/``<json stem>`` subfolders. Ids become ``<json stem>/<id>``."""
    root = Path(root)
    jsons = [root] if root.is_file() else sorted(root.rglob("*.json"))
    if not jsons:
        raise MetadataError(root, "no WavCaps JSON file found")
    pending: list[_Pending] = []
    rows = 0
    for jpath in jsons:
        base = Path(audio_dir) if audio_dir else jpath.parent
        source = jpath.stem
        sub = jpath.parent.name
        index = _DirIndex([base / sub, base / f"{sub}_flac", base / source, base])
        try:
            with jpath.open("r", encoding="utf-8") as fh:
                meta = json.load(fh)
        except json.JSONDecodeError as exc:
            raise MetadataError(jpath, f"invalid JSON ({exc.msg})", exc.lineno) from exc
        if not isinstance(meta, dict) or not isinstance(meta.get("data"), list):
            raise MetadataError(jpath, "expected an object with a 'data' list (WavCaps format)")
        for n, entry in enumerate(meta["data"]):
            rows += 1
            if not isinstance(entry, dict) or "id" not in entry:
                raise MetadataError(jpath, f"data[{n}]: missing 'id'")
            raw_id = str(entry["id"])
            stem = raw_id[: -len(Path(raw_id).suffix)] if Path(raw_id).suffix.lower() in AUDIO_EXTENSIONS else raw_id
            cap = entry.get("caption", [])
            caps = [cap] if isinstance(cap, str) else list(cap) if isinstance(cap, list) else []
            if not all(isinstance(c, str) for c in caps):
                raise MetadataError(jpath, f"data[{n}] ({raw_id}): 'caption' must be a string or list of strings")
            names = [raw_id] if raw_id != stem else []
            names += [f"{stem}.flac", f"{stem}.wav"]
            pending.append(_Pending(f"{source}/{stem}", index.find(names), caps, [], split))
    return _finish("wavcaps", pending, rows)


def esc50(
    root: str | os.PathLike, test_fold: int = 5, val_fold: int | None = None, template: str = DEFAULT_TEMPLATE
) -> AdapterResult:
    """ESC-50: ``root/meta/esc50.csv`` + ``root/audio/``; labels ``[category]``, a templated
    caption, fold ``test_fold`` -> test, ``val_fold`` (optional) -> val, the rest -> train."""
    root = Path(root)
    csv_path = root / "meta" / "esc50.csv"
    if not csv_path.is_file():
        raise MetadataError(csv_path, "ESC-50 metadata file not found")
    index = _DirIndex([root / "audio"])
    pending: list[_Pending] = []
    rows = 0
    for line, row in _read_csv(csv_path, ("filename", "fold", "target", "category")):
        rows += 1
        fold = _int_field(csv_path, line, row, "fold")
        category = row["category"].strip()
        pending.append(
            _Pending(
                Path(row["filename"]).stem, index.find([row["filename"]]), [label_caption(category, template)],
                [category], _split_for_fold(fold, test_fold, val_fold), {"fold": fold},
            )
        )  # fmt: skip
    return _finish("esc50", pending, rows)


def us8k(
    root: str | os.PathLike, test_fold: int = 10, val_fold: int | None = None, template: str = DEFAULT_TEMPLATE
) -> AdapterResult:
    """UrbanSound8K: ``root/metadata/UrbanSound8K.csv`` + ``root/audio/fold{N}/``; labels
    ``[class]``, a templated caption, fold ``test_fold`` -> test, ``val_fold`` -> val."""
    root = Path(root)
    csv_path = root / "metadata" / "UrbanSound8K.csv"
    if not csv_path.is_file():
        raise MetadataError(csv_path, "UrbanSound8K metadata file not found")
    indices: dict[int, _DirIndex] = {}
    pending: list[_Pending] = []
    rows = 0
    for line, row in _read_csv(csv_path, ("slice_file_name", "fold", "class")):
        rows += 1
        fold = _int_field(csv_path, line, row, "fold")
        index = indices.setdefault(fold, _DirIndex([root / "audio" / f"fold{fold}"]))
        name = row["slice_file_name"]
        label = row["class"].strip()
        pending.append(
            _Pending(
                Path(name).stem, index.find([name]), [label_caption(label, template)], [label],
                _split_for_fold(fold, test_fold, val_fold), {"fold": fold},
            )
        )  # fmt: skip
    return _finish("us8k", pending, rows)


def folder(root: str | os.PathLike, labels_from_dirs: bool = False, split: str = "train") -> AdapterResult:
    """A folder of audio files (searched recursively, hidden entries skipped) with optional
    sidecar captions ``<stem>.txt`` (one per non-empty line). Ids are the relative paths without
    extension; with ``labels_from_dirs`` each clip is labelled with its parent folder's name."""
    root = Path(root)
    if not root.is_dir():
        raise MetadataError(root, "not a directory")
    files = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )  # fmt: skip
    pending: list[_Pending] = []
    seen: dict[str, Path] = {}
    for path in files:
        rel = path.relative_to(root)
        item_id = rel.with_suffix("").as_posix()
        if item_id in seen:
            raise MetadataError(path, f"id {item_id!r} is also used by {seen[item_id]}; rename one of them")
        seen[item_id] = path
        sidecar = path.with_suffix(".txt")
        caps = sidecar.read_text(encoding="utf-8").splitlines() if sidecar.is_file() else []
        labels = [rel.parent.name] if labels_from_dirs and rel.parent != Path(".") else []
        pending.append(_Pending(item_id, path, caps, labels, split))
    return _finish("folder", pending, len(files))


def _str_list(value: Any, path: Path, line: int, name: str) -> list[str]:
    """A field holding a string or a list of strings (None / absent: empty)."""
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise MetadataError(path, f"field {name!r}: expected a string or a list of strings, got {value!r:.80}", line)
    return [v for v in values if v.strip()]


def jsonl_caption_label(
    root: str | os.PathLike, audio_dir: str | os.PathLike | None = None, split: str = "train",
    path_field: str = "path", caption_field: str = "caption", label_field: str = "label",
) -> AdapterResult:
    """An in-house "caption + category" library: ``root`` is a JSONL file, one object per clip with
    the audio path (``path_field``, relative to ``audio_dir``, default the file's folder), its
    caption(s) (``caption_field``) and label(s) (``label_field``; absent: no labels), each a string
    or a list of strings. Ids are the audio paths without extension; a row's ``split`` field, if
    present, overrides ``split``. Bad rows raise `MetadataError` naming the line and field."""
    root = Path(root)
    if not root.is_file():
        raise MetadataError(root, "not a JSONL file (give the file, not its folder)" if root.is_dir() else "not found")
    base = Path(audio_dir) if audio_dir else root.parent
    pending: list[_Pending] = []
    seen: dict[str, int] = {}
    rows = 0
    with root.open("rb") as fh:
        for line, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MetadataError(root, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})", line) from exc
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise MetadataError(root, f"invalid JSON ({exc.msg} at column {exc.colno})", line) from exc
            if not isinstance(row, dict):
                raise MetadataError(root, f"expected a JSON object, got {type(row).__name__}", line)
            rows += 1
            rel = row.get(path_field)
            if not isinstance(rel, str) or not rel.strip():
                raise MetadataError(root, f"field {path_field!r} (--path-field): expected the audio path, got "
                                    f"{rel!r:.80}", line)
            item_id = Path(rel).with_suffix("").as_posix()
            if item_id in seen:
                raise MetadataError(root, f"id {item_id!r} (from {path_field!r}) is also on line {seen[item_id]}", line)
            seen[item_id] = line
            row_split = row.get("split", split)
            if not isinstance(row_split, str):
                raise MetadataError(root, f"field 'split': expected a string, got {row_split!r:.80}", line)
            audio = base / rel
            pending.append(_Pending(item_id, audio if audio.is_file() else None,
                                    _str_list(row.get(caption_field), root, line, caption_field),
                                    _str_list(row.get(label_field), root, line, label_field), row_split))
    return _finish("jsonl-caption-label", pending, rows)


ADAPTERS: dict[str, Callable[..., AdapterResult]] = {
    "audiocaps": audiocaps,
    "clotho": clotho,
    "wavcaps": wavcaps,
    "esc50": esc50,
    "us8k": us8k,
    "folder": folder,
    "jsonl-caption-label": jsonl_caption_label,
}


def build_manifest(fmt: str, root: str | os.PathLike, **options: Any) -> AdapterResult:
    """Run the adapter ``fmt`` (one of `ADAPTERS`) on ``root`` with adapter-specific options."""
    if fmt not in ADAPTERS:
        raise ValueError(f"unknown dataset format {fmt!r}; formats: {', '.join(ADAPTERS)}")
    return ADAPTERS[fmt](root, **options)
