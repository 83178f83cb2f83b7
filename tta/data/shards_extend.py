"""Adding model-made arrays to an existing shard folder, whole shards per rank (``tta predict``).

`tta data shard --with` computes its caches in one process while it writes the shards. For
paper-sized sets the same arrays are computed afterwards, on every GPU of a job, by
``tta predict --config configs/shard_cache.yaml`` (the ``shard_cache`` module,
`tta.training.shard_cache`), reading the shards themselves:

- `ShardChunkData` (datamodule ``shard_chunks``) serves the shards of ``root``: rank r of W reads
  the shards n with n % W == r (whole shards, so that each rank writes its own files), and its
  DataLoader worker k of K every K-th of those. A batch is a chunk of at most ``chunk_size``
  consecutive items of one shard with what the array sources read: the fixed training segments'
  log-mels and waveforms (with ``segment_seconds``), computed as `tta.data.shards_write` computes
  them, and the items' caption rows. A shard's chunks come from one worker, in order.
- `ShardExtender` writes one shard into the output folder, chunk by chunk: each item's members
  byte for byte, then its new arrays, so that the result is what `tta data shard --with` of all
  the arrays writes. Memory holds one chunk, not a shard.
- `finish_index` writes the output's ``index.json`` once every shard is there: the input's index
  with the new shards' hashes, the arrays and their producers.

Ranks run no collective between batches, so unequal shard counts per rank cannot hang.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tta.data.audio import AudioLoadError
from tta.data.check import mel_min_samples
from tta.data.mel import MelConfig, MelFrontend
from tta.data.shards import (
    INDEX_NAME,
    ShardError,
    ShardIndex,
    ShardReader,
    caption_rows,
    crop_segment,
    decode_audio,
    item_captions,
    split_member_name,
    whole_clip,
)
from tta.data.shards_write import npy_bytes, tar_member
from tta.registry import register
from tta.utils.files import atomic_path, file_sha256

__all__ = ["ShardChunkData", "ShardChunks", "ShardExtender", "finish_index", "rank_shards"]

log = logging.getLogger(__name__)


def rank_shards(n_shards: int, rank: int, world: int) -> list[int]:
    """The shards rank ``rank`` of ``world`` extends: ``rank, rank + world, ...``."""
    return list(range(rank, n_shards, world))


class ShardChunks(IterableDataset):
    """Chunks of the ``shards`` of ``index`` (see the module doc); one chunk is one batch.

    It has no ``__len__`` on purpose: Lightning skips the predict loop, hooks included, for a loader
    of length 0, and a rank with no shard (more ranks than shards) must still reach the final barrier.

    A chunk: ``shard`` (its number), ``start`` (position of its first item in the shard),
    ``items`` (the shard's item count), ``keys``, ``ids``, ``text`` (the items' caption rows,
    flat) and ``text_counts`` (rows per item); with ``segment_frames`` also ``mel``
    ``(B, n_mels, segment_frames)`` and ``wav`` ``(B, segment_frames * hop)``."""

    def __init__(self, index: ShardIndex, shards: list[int], chunk_size: int, mel: MelConfig | None = None,
                 segment_frames: int | None = None, pad_short_clips: bool = False) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if segment_frames is not None and mel is None:
            raise ValueError("segments need the mel front-end")
        self.index, self.shards, self.chunk_size = index, list(shards), int(chunk_size)
        self.mel, self.segment_frames, self.pad_short_clips = mel, segment_frames, pad_short_clips

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        frontend = MelFrontend.from_config(self.mel) if self.segment_frames is not None else None
        for shard in self.shards[worker::workers]:
            reader = ShardReader(self.index.path(shard))
            try:
                if len(reader) != self.index.shards[shard].items:
                    raise ShardError(f"{reader.path}: {len(reader)} items, but {self.index.root / INDEX_NAME} "
                                     f"lists {self.index.shards[shard].items}")
                for start in range(0, len(reader), self.chunk_size):
                    stop = min(len(reader), start + self.chunk_size)
                    yield self._chunk(reader, shard, start, stop, frontend)
            finally:
                reader.close()

    def _chunk(self, reader: ShardReader, shard: int, start: int, stop: int,
               frontend: MelFrontend | None) -> dict[str, Any]:
        records = [reader.read(p) for p in range(start, stop)]
        rows = [caption_rows(item_captions(r.item)) for r in records]
        chunk: dict[str, Any] = {"shard": shard, "start": start, "items": len(reader), "keys": [r.key for r in records],
                                 "ids": [r.id for r in records], "text": [t for row in rows for t in row],
                                 "text_counts": [len(row) for row in rows]}
        if frontend is not None:
            mel, minimum = self.mel, mel_min_samples(self.mel)  # type: ignore[arg-type]
            wavs, mels = [], []
            for r in records:
                name = f"{reader.path}: item {r.key} ({r.id})"
                try:
                    wav = whole_clip(decode_audio(r.audio, name, mel.sample_rate), mel, minimum,  # type: ignore[union-attr]
                                     self.pad_short_clips, name)
                except AudioLoadError as exc:
                    raise ShardError(f"{name}: {exc.reason}") from exc
                with torch.no_grad():
                    spec = frontend(wav)[0]
                _, wav, spec = crop_segment(wav, spec, mel, self.segment_frames, 0, False)  # type: ignore[arg-type]
                wavs.append(wav)
                mels.append(spec)
            chunk["wav"], chunk["mel"] = torch.stack(wavs), torch.stack(mels)
        return chunk


class ShardExtender:
    """Writes shard ``src`` as ``dst`` with arrays ``names`` added to every item, chunk by chunk
    (`add` in item order, then `close`); the file appears only when complete."""

    def __init__(self, src: str | os.PathLike, dst: str | os.PathLike, names: list[str]) -> None:
        self.src, self.dst, self.names = Path(src), Path(dst), sorted(names)
        self._in = ShardReader(self.src)
        added = {f"{n}.npy" for n in self.names}
        for position in range(len(self._in)):
            for m in self._in.members(position)[1]:
                suffix = split_member_name(m.name)[1]
                if suffix in added:
                    self._in.close()
                    raise ShardError(f"{self.src}: member {m.name!r} already holds array {suffix[:-4]!r}")
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.dst))
        self._out = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.next = 0

    def __len__(self) -> int:
        return len(self._in)

    def add(self, start: int, keys: list[str], arrays: Mapping[str, np.ndarray]) -> None:
        """Append the items ``start, start + 1, ...`` (their ``keys``, checked) with row i of each
        array of ``arrays`` (one per name; text arrays as one ``(rows, ...)`` array per item)."""
        if start != self.next:
            raise ShardError(f"{self.src}: chunk at item {start} arrived, expected item {self.next} (chunks of a "
                             "shard must come in order)")
        if sorted(arrays) != self.names:
            raise ValueError(f"arrays {sorted(arrays)} given, {self.names} expected")
        for i, key in enumerate(keys):
            have, members = self._in.members(start + i)
            if have != key:
                raise ShardError(f"{self.src}: item {start + i} is {have!r}, the chunk says {key!r}")
            for m in members:
                tar_member(self._out, m.name, self._in.member_bytes(m))
            for name in self.names:
                tar_member(self._out, f"{key}.{name}.npy", npy_bytes(arrays[name][i]))
        self.next = start + len(keys)

    def close(self) -> dict[str, Any]:
        """Finish the shard; returns its index entry ``{name, items, sha256}``."""
        if self.next != len(self._in):
            self.abort()
            raise ShardError(f"{self.src}: only {self.next} of {len(self._in)} items were extended")
        self._out.close()
        self._in.close()
        self._stack.close()
        return {"name": self.dst.name, "items": len(self._in), "sha256": file_sha256(self.dst)}

    def abort(self) -> None:
        """Drop the partial output."""
        self._out.close()
        self._in.close()
        self._stack.__exit__(ShardError, ShardError("aborted"), None)


def finish_index(index: ShardIndex, out: str | os.PathLike, shards: list[dict[str, Any]],
                 sources: Mapping[str, Mapping[str, Any]], mel: MelConfig | None,
                 segment_frames: int | None) -> ShardIndex:
    """Write ``out/index.json``: ``index``'s with the extended ``shards`` entries (every shard of
    ``index``, once), the new arrays and their producers (``sources``: name -> meta with ``inputs``),
    and the mel front-end and segment of the segment arrays. Returns the new index."""
    out = Path(out)
    names = [s.name for s in index.shards]
    got = sorted(s["name"] for s in shards)
    if got != sorted(names):
        raise ShardError(f"{out}: extended shards {got[:5]} ... do not match the input's {len(names)} shards "
                         f"(missing {sorted(set(names) - set(got))[:5]}, extra {sorted(set(got) - set(names))[:5]})")
    data = json.loads((index.root / INDEX_NAME).read_text(encoding="utf-8"))
    by_name = {s["name"]: s for s in shards}
    data["shards"] = [by_name[n] for n in names]
    data["arrays"] = sorted(set(index.arrays) | set(sources))
    data["sources"] = {**index.sources, **{k: dict(v) for k, v in sources.items()}}
    if any(v.get("inputs") != "text" for v in sources.values()):
        data["mel"], data["segment_frames"] = mel.to_dict() if mel is not None else None, segment_frames
    with atomic_path(out / INDEX_NAME) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return ShardIndex.load(out)


@register("datamodule", "shard_chunks")
class ShardChunkData(L.LightningDataModule):
    """The shards of ``root`` in chunks, for ``tta predict`` with the ``shard_cache`` module.

    Args:
        root: a ``tta data shard`` folder.
        mel: mel preset or `MelConfig` dict of the segment arrays (None: the shards' own, if any);
            must equal the shards' when they cache segment arrays already.
        segment_seconds: the training segment of the segment arrays (latent, clap_audio); must
            equal the shards' when they cache segment arrays already. None: text arrays only.
        chunk_size: items per batch (of one shard).
        num_workers: DataLoader workers per rank (each reads whole shards).
        pad_short_clips: zero-pad clips too short for the mel (as `tta data shard --pad-short-clips`).
    """

    def __init__(self, root: str, mel: str | dict[str, Any] | None = None, segment_seconds: float | None = None,
                 chunk_size: int = 16, num_workers: int = 0, pad_short_clips: bool = False) -> None:
        super().__init__()
        if chunk_size < 1 or num_workers < 0:
            raise ValueError(f"chunk_size must be >= 1 and num_workers >= 0, got {chunk_size}, {num_workers}")
        if segment_seconds is not None and not segment_seconds > 0:
            raise ValueError(f"segment_seconds must be > 0, got {segment_seconds}")
        self.root, self.chunk_size, self.num_workers = root, int(chunk_size), int(num_workers)
        self.segment_seconds, self.pad_short_clips = segment_seconds, pad_short_clips
        self.index = ShardIndex.load(root)
        if mel is None:
            self.mel_config = self.index.mel
        else:
            self.mel_config = MelConfig.preset(mel) if isinstance(mel, str) else MelConfig.from_dict(mel)
        if segment_seconds is not None and self.mel_config is None:
            raise ValueError(f"segment_seconds needs the mel front-end: give mel (the shards {root} record none)")
        self.segment_frames = None if segment_seconds is None else \
            round(segment_seconds * self.mel_config.sample_rate) // self.mel_config.hop_length  # type: ignore[union-attr]
        self._check_against_index()

    def _check_against_index(self) -> None:
        where = self.index.root / INDEX_NAME
        cached_segments = [a for a in self.index.arrays if self.index.inputs(a) != "text"]
        if self.segment_frames is None or not cached_segments:
            return
        if self.index.mel is not None and self.mel_config is not None and self.index.mel != self.mel_config:
            raise ShardError(f"{where}: the shards' arrays {cached_segments} use another mel front-end than mel="
                             f"{self.mel_config.to_dict()}; one folder holds one front-end")
        seg = self.index.segment_frames
        if seg is not None and seg != self.segment_frames:
            raise ShardError(f"{where}: the shards' arrays {cached_segments} are of {seg}-frame segments, "
                             f"segment_seconds={self.segment_seconds} gives {self.segment_frames}")

    def predict_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        shards = rank_shards(len(self.index.shards), rank, world)
        log.info("rank %d of %d extends %d of %d shards: %s", rank, world, len(shards), len(self.index.shards),
                 ", ".join(self.index.shards[n].name for n in shards))
        data = ShardChunks(self.index, shards, self.chunk_size, self.mel_config, self.segment_frames,
                           self.pad_short_clips)
        workers = min(self.num_workers, len(shards))
        return DataLoader(data, batch_size=None, num_workers=workers, persistent_workers=False)
