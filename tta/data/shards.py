"""WebDataset-layout tar shards of a manifest: the index, the reader and the clip preparation.

A shard folder (written by `tta data shard`, `tta.data.shards_write`) holds::

    index.json                 shard names and item counts, manifest hash, mel / cache metadata
    shard-000000.tar           per item, in this order:  <key>.json  <key>.<wav|flac|ogg|mp3>
    shard-000001.tar                                     [<key>.<name>.npy ...]  (cached arrays)
    ...

``<key>`` is the item's 9-digit position in the sharded set (manifest ids may contain ``/`` or
``.``, which WebDataset keys cannot); the id is in the JSON (the manifest item, ``audio`` as
written in the manifest). The audio member holds the file's bytes as stored. Tar headers are
fixed (mtime 0, uid/gid 0, no user names, mode 0644, USTAR) so that the same input gives
byte-identical shards; any WebDataset reader groups the members by key.

`ShardIndex.load` reads and checks ``index.json``; `ShardReader` reads the records of a shard by
position (one header scan per shard, then seeks). `decode_audio` is `tta.data.audio.load_audio`
for bytes, and `whole_clip` / `crop_segment` / `choose_caption` repeat the audio datamodule's
clip preparation (`tta.data.datamodule.ClipDataset`) so that both give identical batches.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from tta.data.audio import AudioLoadError, resample
from tta.data.mel import MelConfig
from tta.utils.errors import TTAError

__all__ = ["AUDIO_EXTENSIONS", "FORMAT", "INDEX_NAME", "VERSION", "ShardError", "ShardIndex", "ShardReader",
           "ShardRecord", "caption_index", "caption_rows", "choose_caption", "crop_segment", "decode_audio",
           "item_captions", "source_inputs", "split_member_name", "whole_clip"]

FORMAT = "tta-shards"
VERSION = 1
INDEX_NAME = "index.json"
AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "mp3")


class ShardError(TTAError, ValueError):
    """A shard folder, shard or member is invalid; the message names the file (and member)."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard of an index: file name, number of items and SHA-256 of the file."""

    name: str
    items: int
    sha256: str


@dataclass
class ShardIndex:
    """The parsed ``index.json`` of a shard folder (see the module doc)."""

    root: Path
    shards: list[ShardInfo]
    arrays: list[str]
    mel: MelConfig | None
    segment_frames: int | None
    split: str | None
    manifest: dict[str, Any]
    sources: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Number of items over all shards."""
        return sum(s.items for s in self.shards)

    @property
    def counts(self) -> list[int]:
        return [s.items for s in self.shards]

    def path(self, shard: int) -> Path:
        return self.root / self.shards[shard].name

    @classmethod
    def load(cls, root: str | os.PathLike) -> ShardIndex:
        """Read ``root/index.json``; `ShardError` naming the file and field for anything invalid,
        `FileNotFoundError` when the folder or its index does not exist."""
        root = Path(root).expanduser()
        path = root / INDEX_NAME
        if not root.is_dir():
            raise FileNotFoundError(f"shard folder not found: {root}")
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: not a `tta data shard` folder (or the command "
                                    "was interrupted before it wrote the index)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ShardError(f"{path}: field 'format': expected {FORMAT!r}")
        if data.get("version") != VERSION:
            raise ShardError(f"{path}: field 'version': {data.get('version')!r}, this tta reads version {VERSION}")
        shards = []
        for n, s in enumerate(data.get("shards") or []):
            if not isinstance(s, dict) or not isinstance(s.get("name"), str) or "/" in s["name"] \
                    or not isinstance(s.get("items"), int) or s["items"] < 1:
                raise ShardError(f"{path}: field 'shards[{n}]': expected {{name, items >= 1, sha256}}, got {s!r:.120}")
            shards.append(ShardInfo(s["name"], s["items"], str(s.get("sha256", ""))))
        if not shards:
            raise ShardError(f"{path}: field 'shards': the folder holds no shard (an empty split?)")
        missing = [s.name for s in shards if not (root / s.name).is_file()]
        if missing:
            raise ShardError(f"{path}: {len(missing)} shard(s) listed in the index are missing: {missing[:5]}")
        mel = data.get("mel")
        try:
            mel_config = None if mel is None else MelConfig.from_dict(mel)
        except (TypeError, ValueError) as exc:
            raise ShardError(f"{path}: field 'mel': {exc}") from exc
        arrays = data.get("arrays") or []
        if not isinstance(arrays, list) or not all(isinstance(a, str) for a in arrays):
            raise ShardError(f"{path}: field 'arrays': expected a list of names, got {arrays!r}")
        sources = dict(data.get("sources") or {})
        audio_arrays = [a for a in arrays if source_inputs(sources, a) != "text"]
        if audio_arrays and mel_config is None:
            raise ShardError(f"{path}: field 'mel': cached arrays {audio_arrays} need the mel front-end they were "
                             "made with")
        return cls(root=root, shards=shards, arrays=list(arrays), mel=mel_config,
                   segment_frames=data.get("segment_frames"), split=data.get("split"),
                   manifest=dict(data.get("manifest") or {}), sources=sources,
                   skipped=list(data.get("skipped") or []))

    def inputs(self, array: str) -> str:
        """What cached ``array`` was computed from: ``"mel"`` (the whole clip's log-mel, or a model's
        output on the fixed segment's log-mel), ``"wav"`` (on the segment's waveform) or ``"text"``
        (one row per caption, `caption_rows`)."""
        return source_inputs(self.sources, array)


def source_inputs(sources: Mapping[str, Any], array: str) -> str:
    """The ``inputs`` recorded for ``array`` in an index's ``sources`` (``"mel"`` when none is:
    the cached log-mel and indexes written before text caches)."""
    return str((sources.get(array) or {}).get("inputs", "mel"))


@dataclass
class ShardRecord:
    """One item of a shard: key, manifest JSON, audio bytes (and their extension), cached arrays."""

    key: str
    item: dict[str, Any]
    audio: bytes
    audio_ext: str
    arrays: dict[str, np.ndarray]

    @property
    def id(self) -> str:
        return str(self.item["id"])


def split_member_name(name: str) -> tuple[str, str]:
    """``(key, suffix)`` of a member name: the key is everything before the basename's first dot."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


class ShardReader:
    """Records of one shard by position. The member table is read once (a header scan); each
    `read` then seeks to its members. ``arrays``: the cached arrays every record must have."""

    def __init__(self, path: str | os.PathLike, arrays: list[str] | tuple[str, ...] = ()) -> None:
        self.path = Path(path)
        self.arrays = tuple(arrays)
        try:
            self._tar = tarfile.open(self.path, "r:")  # noqa: SIM115 (open while the reader lives; close())
            members = self._tar.getmembers()
        except (tarfile.TarError, OSError) as exc:
            raise ShardError(f"{self.path}: not a readable tar file ({exc})") from exc
        self._groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
        for m in members:
            if not m.isfile():
                raise ShardError(f"{self.path}: member {m.name!r} is not a regular file")
            key, suffix = split_member_name(m.name)
            if not self._groups or self._groups[-1][0] != key:
                self._groups.append((key, {}))
            group = self._groups[-1][1]
            if suffix in group:
                raise ShardError(f"{self.path}: member {m.name!r} appears twice")
            group[suffix] = m

    def __len__(self) -> int:
        return len(self._groups)

    def close(self) -> None:
        self._tar.close()

    def member_bytes(self, member: tarfile.TarInfo) -> bytes:
        """The data of ``member`` (one of `members`)."""
        fh = self._tar.extractfile(member)
        if fh is None:
            raise ShardError(f"{self.path}: member {member.name!r} has no data")
        return fh.read()

    def members(self, position: int) -> tuple[str, list[tarfile.TarInfo]]:
        """The key of the item at ``position`` and its members, in file order."""
        key, group = self._groups[position]
        return key, list(group.values())

    def read(self, position: int) -> ShardRecord:
        """The record at ``position`` (0-based) of this shard."""
        key, group = self._groups[position]
        where = f"{self.path}: item {key!r}"
        if "json" not in group:
            raise ShardError(f"{where}: no {key}.json member")
        audio = [s for s in group if s in AUDIO_EXTENSIONS]
        if len(audio) != 1:
            raise ShardError(f"{where}: expected one audio member ({'/'.join(AUDIO_EXTENSIONS)}), found {audio}")
        try:
            item = json.loads(self.member_bytes(group["json"]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardError(f"{where}: {key}.json is not valid JSON ({exc})") from exc
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise ShardError(f"{where}: {key}.json has no string 'id'")
        arrays = {}
        for name in self.arrays:
            member = group.get(f"{name}.npy")
            if member is None:
                raise ShardError(f"{where}: the index lists cached array {name!r} but {key}.{name}.npy is missing")
            arrays[name] = np.load(io.BytesIO(self.member_bytes(member)), allow_pickle=False)
        return ShardRecord(key=key, item=item, audio=self.member_bytes(group[audio[0]]), audio_ext=audio[0], arrays=arrays)


def decode_audio(data: bytes, name: str, target_sr: int | None = None) -> torch.Tensor:
    """Mono float32 ``(T,)`` of encoded audio bytes (resampled to ``target_sr``), as
    `tta.data.audio.load_audio` gives for the file; `AudioLoadError` naming ``name`` otherwise."""
    try:
        samples, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise AudioLoadError(name, f"unreadable ({str(exc).strip().splitlines()[0] if str(exc).strip() else exc})") \
            from exc
    if samples.shape[0] == 0:
        raise AudioLoadError(name, "zero-length audio")
    if not np.isfinite(samples).all():
        raise AudioLoadError(name, f"{int((~np.isfinite(samples)).sum())} non-finite (NaN/inf) samples")
    if samples.shape[1] == 1:
        wav = torch.from_numpy(samples[:, 0].copy())
    else:  # the same mixdown as load_audio (a mat-vec product)
        wav = torch.from_numpy(samples @ np.full(samples.shape[1], 1.0 / samples.shape[1], dtype=np.float32))
    if target_sr is not None:
        wav = resample(wav, int(sr), int(target_sr))
    return wav.contiguous()


def whole_clip(wav: torch.Tensor, mel: MelConfig, min_samples: int, pad_short: bool, name: str) -> torch.Tensor:
    """The waveform the mel of a whole clip is computed from: too-short clips refused
    (`AudioLoadError`) or zero-padded to ``min_samples``, then cut to whole hops."""
    if wav.shape[0] < min_samples:
        if not pad_short:
            raise AudioLoadError(name, f"too short for the mel front-end: {wav.shape[0]} samples at "
                                       f"{mel.sample_rate} Hz, it needs at least {min_samples}; set "
                                       "pad_short_clips=true to zero-pad such clips")
        wav = torch.nn.functional.pad(wav, (0, min_samples - wav.shape[0]))
    hop = mel.hop_length
    return wav[: (wav.shape[0] // hop) * hop]


def crop_segment(wav: torch.Tensor, mel_spec: torch.Tensor, mel: MelConfig, segment_frames: int | None,
                 seed: int, random_crop: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(start frame, wav, mel)`` of a clip's training segment: a crop drawn with ``seed`` (or
    from frame 0), short clips padded with the log floor / silence (as the audio datamodule)."""
    if segment_frames is None:
        return 0, wav, mel_spec
    hop, seg, frames = mel.hop_length, segment_frames, mel_spec.shape[-1]
    if frames >= seg:
        start = int(np.random.default_rng(seed).integers(0, frames - seg + 1)) if random_crop else 0
        return start, wav[start * hop: (start + seg) * hop], mel_spec[:, start: start + seg]
    floor = float(np.log(mel.log_floor))
    return (0, torch.nn.functional.pad(wav, (0, (seg - frames) * hop)),
            torch.nn.functional.pad(mel_spec, (0, seg - frames), value=floor))


def item_captions(item: Mapping[str, Any]) -> list[str]:
    """The captions of a shard item's JSON (the manifest item), as strings."""
    return [str(c) for c in item.get("captions") or []]


def caption_rows(captions: list[str]) -> list[str]:
    """The texts a per-caption cache stores for an item: row i is caption i; an uncaptioned item
    has one row, ``""`` (the caption `choose_caption` gives it)."""
    return list(captions) or [""]


def caption_index(count: int, seed: int, first: bool = False) -> int:
    """Position of the training caption among ``count`` captions (its `caption_rows` row): drawn
    with ``seed + 1``, or 0 (``first``, or at most one caption)."""
    if first or count <= 1:
        return 0
    return int(np.random.default_rng(seed + 1).integers(count))


def choose_caption(captions: list[str], seed: int, first: bool = False) -> str:
    """The caption of a training example: drawn with ``seed + 1`` (or the first one)."""
    return caption_rows(captions)[caption_index(len(captions), seed, first)]
