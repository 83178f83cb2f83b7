"""JSONL manifests: one clip per line (audiocraft style).

Each line is a JSON object::

    {"id": "clip1", "audio": "audio/clip1.wav", "captions": ["a dog barks"], "labels": ["dog"],
     "duration": 4.0, "sample_rate": 16000, "split": "train"}

Only ``id`` and ``audio`` are required. ``audio`` paths in the file are relative to the manifest's
directory (absolute paths are allowed). `read_manifest` returns items whose ``audio`` is an
absolute `Path`; `write_manifest` writes paths relative to the manifest's directory again.
Unknown keys are kept in ``ManifestItem.extra`` and written back unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tta.utils.files import atomic_path

__all__ = ["FIELDS", "ManifestError", "ManifestItem", "filter_split", "read_manifest", "select_split",
           "write_manifest"]

FIELDS = ("id", "audio", "captions", "labels", "duration", "sample_rate", "split")


class ManifestError(ValueError):
    """A manifest line is invalid; the message names the file, the line and the field."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str, field: str | None = None) -> None:
        self.path = Path(path)
        self.line = line
        self.field = field
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{message}")


@dataclass
class ManifestItem:
    """One clip of a manifest.

    ``audio`` is an absolute path after `read_manifest`. When building items in code, give an
    absolute path (or one already relative to the manifest's directory).
    """

    id: str
    audio: Path
    captions: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    duration: float | None = None
    sample_rate: int | None = None
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.audio = Path(self.audio)

    def audio_path(self, root: str | os.PathLike) -> Path:
        """The audio path resolved against ``root`` (the manifest's directory) if relative."""
        return self.audio if self.audio.is_absolute() else Path(os.path.normpath(Path(root) / self.audio))

    def to_json(self, root: str | os.PathLike) -> dict[str, Any]:
        """The JSON object of this item with ``audio`` relative to ``root`` (posix separators)."""
        audio = self.audio
        if audio.is_absolute():
            audio = Path(os.path.relpath(audio, Path(root).absolute()))
        obj: dict[str, Any] = {
            "id": self.id,
            "audio": audio.as_posix(),
            "captions": list(self.captions),
            "labels": list(self.labels),
            "duration": self.duration,
            "sample_rate": self.sample_rate,
            "split": self.split,
        }
        for key in sorted(self.extra):
            if key in obj:
                raise ValueError(f"manifest item {self.id!r}: extra key {key!r} shadows a standard field")
            obj[key] = self.extra[key]
        return obj


def _check_str_list(value: Any, path: Path, lineno: int, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(path, lineno, f"expected a list of strings, got {value!r:.80}", name)
    return list(value)


def _parse_line(obj: Any, path: Path, lineno: int, root: Path) -> ManifestItem:
    if not isinstance(obj, dict):
        raise ManifestError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
    for name in ("id", "audio"):
        if name not in obj:
            raise ManifestError(path, lineno, "missing required field", name)
        if not isinstance(obj[name], str) or not obj[name].strip():
            raise ManifestError(path, lineno, f"expected a non-empty string, got {obj[name]!r:.80}", name)
    captions = _check_str_list(obj.get("captions"), path, lineno, "captions")
    labels = _check_str_list(obj.get("labels"), path, lineno, "labels")
    duration = obj.get("duration")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration < 0):
        raise ManifestError(path, lineno, f"expected a non-negative number or null, got {duration!r}", "duration")
    sample_rate = obj.get("sample_rate")
    if sample_rate is not None and (
        isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0
    ):
        raise ManifestError(path, lineno, f"expected a positive integer or null, got {sample_rate!r}", "sample_rate")
    split = obj.get("split")
    if split is not None and not isinstance(split, str):
        raise ManifestError(path, lineno, f"expected a string or null, got {split!r}", "split")
    audio = Path(obj["audio"])
    if not audio.is_absolute():
        audio = Path(os.path.normpath(root / audio))
    extra = {k: v for k, v in obj.items() if k not in FIELDS}
    return ManifestItem(
        id=obj["id"],
        audio=audio,
        captions=captions,
        labels=labels,
        duration=None if duration is None else float(duration),
        sample_rate=sample_rate,
        split=split,
        extra=extra,
    )


def read_manifest(path: str | os.PathLike) -> list[ManifestItem]:
    """Read and validate a JSONL manifest; ``audio`` becomes an absolute path.

    Blank lines are skipped. Raises `ManifestError` (file, line, field) for a line that is not
    UTF-8, invalid JSON, a missing ``id``/``audio``, wrongly typed fields and duplicate ids; `FileNotFoundError` if the
    manifest does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    root = path.parent.absolute()
    items: list[ManifestItem] = []
    seen: dict[str, int] = {}
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ManifestError(path, lineno, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                                  f"{exc.start + 1})") from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(path, lineno, f"invalid JSON ({exc.msg} at column {exc.colno})") from exc
            item = _parse_line(obj, path, lineno, root)
            if item.id in seen:
                raise ManifestError(path, lineno, f"duplicate id {item.id!r} (first on line {seen[item.id]})", "id")
            seen[item.id] = lineno
            items.append(item)
    return items


def write_manifest(items: Iterable[ManifestItem], path: str | os.PathLike) -> Path:
    """Write ``items`` as JSONL to ``path`` atomically (temporary file + rename).

    Lines keep the order of ``items``; keys are in a fixed order (standard fields, then extra keys
    sorted); ``ensure_ascii=False``. Absolute audio paths are written relative to the manifest's
    directory. Raises `ManifestError` for duplicate or empty ids.
    """
    path = Path(path)
    root = path.parent.absolute()
    lines: list[str] = []
    seen: set[str] = set()
    for n, item in enumerate(items, start=1):
        if not isinstance(item.id, str) or not item.id:
            raise ManifestError(path, n, f"item has an empty or non-string id {item.id!r}", "id")
        if item.id in seen:
            raise ManifestError(path, n, f"duplicate id {item.id!r}", "id")
        seen.add(item.id)
        lines.append(json.dumps(item.to_json(root), ensure_ascii=False) + "\n")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(lines)
    return path


def filter_split(items: Iterable[ManifestItem], split: str | Iterable[str]) -> list[ManifestItem]:
    """Items whose ``split`` equals ``split`` (or is one of several given splits)."""
    wanted = {split} if isinstance(split, str) else set(split)
    return [item for item in items if item.split in wanted]


def select_split(items: list[ManifestItem], split: str | None, path: str | os.PathLike) -> list[ManifestItem]:
    """The items of the manifest at ``path`` in ``split`` (every item for None); `ManifestError`
    naming the manifest and the splits it has when none is left."""
    chosen = items if split is None else filter_split(items, split)
    if not chosen:
        have = ", ".join(sorted({str(item.split) for item in items})) or "none: the manifest is empty"
        wanted = "no items" if split is None else f"no items of split {split!r}"
        raise ManifestError(path, None, f"{wanted} (its splits: {have})", None if split is None else "split")
    return chosen
