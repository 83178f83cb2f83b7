"""DreamAudio reference concepts in a manifest: the ``references`` field, its readers and its check.

A customized item carries its reference concepts (audio clip + caption pairs) as the extra
manifest field ``references``, a JSON list (possibly empty) of objects::

    "references": [{"audio": "references/concat_train_00000_0.wav", "caption": "a dog barks",
                    "sources": ["synth_00012"]}, ...]

- ``audio`` (string, required): the reference clip, relative to the manifest's folder (absolute
  paths allowed), like the item's own ``audio``;
- ``caption`` (non-empty string, required): the reference caption;
- ``sources`` (list of strings, optional): ids of the base-manifest clips it was made from.

No other key is allowed (a typo such as ``"captions"`` is an error, not ignored). An item
without the field, or with ``[]``, has no references (a "general" item). See
``docs/dreamaudio_data.md``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tta.data.audio import AudioLoadError, audio_info
from tta.data.manifest import ManifestError, ManifestItem, read_manifest

__all__ = ["REFERENCES_KEY", "Reference", "ReferenceProblem", "check_references", "item_references",
           "manifest_lines", "references_field"]

REFERENCES_KEY = "references"
_KEYS = frozenset({"audio", "caption", "sources"})


@dataclass(frozen=True)
class Reference:
    """One reference concept: an audio clip (absolute path once read) and its caption."""

    audio: Path
    caption: str
    sources: tuple[str, ...] = ()


def _reference(entry: Any, k: int, root: Path, where: Path, line: int | None) -> Reference:
    field = f"{REFERENCES_KEY}[{k}]"
    if not isinstance(entry, dict):
        raise ManifestError(where, line, f"expected an object with 'audio' and 'caption', got {entry!r:.80}", field)
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise ManifestError(where, line, f"unknown key(s) {unknown} (allowed: {sorted(_KEYS)})", field)
    audio, caption, sources = entry.get("audio"), entry.get("caption"), entry.get("sources", [])
    if not isinstance(audio, str) or not audio.strip():
        raise ManifestError(where, line, f"expected a non-empty path string, got {audio!r:.80}", f"{field}.audio")
    if not isinstance(caption, str) or not caption.strip():
        raise ManifestError(where, line, f"expected a non-empty string, got {caption!r:.80}", f"{field}.caption")
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise ManifestError(where, line, f"expected a list of strings, got {sources!r:.80}", f"{field}.sources")
    path = Path(audio)
    if not path.is_absolute():
        path = Path(os.path.normpath(root / path))
    return Reference(audio=path, caption=caption, sources=tuple(sources))


def item_references(
    item: ManifestItem, root: str | os.PathLike, *, manifest: str | os.PathLike | None = None,
    line: int | None = None,
) -> list[Reference]:  # fmt: skip
    """The references of ``item`` with absolute audio paths (relative ones resolved against ``root``,
    the manifest's folder). An item without the field has none.

    Raises `ManifestError` naming ``manifest`` (default ``root``), ``line`` and the field
    (``references[1].audio``) for a malformed field. Files are not opened (`check_references`)."""
    root = Path(root).absolute()
    where = Path(manifest) if manifest is not None else root
    value = item.extra.get(REFERENCES_KEY, [])
    if not isinstance(value, list):
        raise ManifestError(where, line, f"expected a list of objects, got {value!r:.80}", REFERENCES_KEY)
    return [_reference(entry, k, root, where, line) for k, entry in enumerate(value)]


def references_field(refs: list[Reference], root: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON value of ``references`` for ``refs``: audio paths relative to ``root`` (posix)."""
    out: list[dict[str, Any]] = []
    for ref in refs:
        audio = ref.audio
        if audio.is_absolute():
            audio = Path(os.path.relpath(audio, Path(root).absolute()))
        entry: dict[str, Any] = {"audio": audio.as_posix(), "caption": ref.caption}
        if ref.sources:
            entry["sources"] = list(ref.sources)
        out.append(entry)
    return out


def manifest_lines(path: str | os.PathLike) -> list[tuple[int, ManifestItem]]:
    """`read_manifest` items paired with their 1-based line numbers (blank lines skipped as there)."""
    items = read_manifest(path)
    with Path(path).open("r", encoding="utf-8") as fh:
        lines = [n for n, text in enumerate(fh, start=1) if text.strip()]
    return list(zip(lines, items))


@dataclass(frozen=True)
class ReferenceProblem:
    """A reference that cannot be used: ``kind`` is ``malformed``, ``missing`` or ``unreadable``."""

    manifest: Path
    line: int
    item_id: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.manifest}:{self.line}: item {self.item_id!r}: {self.kind}: {self.message}"


def check_references(manifest_path: str | os.PathLike) -> list[ReferenceProblem]:
    """Every problem of the references of the manifest at ``manifest_path``, in line order.

    A malformed ``references`` field, a reference file that does not exist and one whose header
    cannot be read (`tta.data.audio.audio_info`) are each reported with the item id and line;
    an empty list means every reference is usable. The manifest itself must be valid
    (`read_manifest` errors propagate)."""
    path = Path(manifest_path)
    root = path.parent.absolute()
    problems: list[ReferenceProblem] = []
    for line, item in manifest_lines(path):
        try:
            refs = item_references(item, root, manifest=path, line=line)
        except ManifestError as exc:
            problems.append(ReferenceProblem(path, line, item.id, "malformed", str(exc)))
            continue
        for k, ref in enumerate(refs):
            if not ref.audio.is_file():
                message = f"references[{k}]: no such file {ref.audio}"
                problems.append(ReferenceProblem(path, line, item.id, "missing", message))
                continue
            try:
                audio_info(ref.audio)
            except AudioLoadError as exc:
                message = f"references[{k}]: {exc.reason}: {ref.audio}"
                problems.append(ReferenceProblem(path, line, item.id, "unreadable", message))
    return problems
