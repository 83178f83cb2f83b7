"""Streaming shards: explicit rank and worker splitting, a fixed epoch length per rank, resume.

The order of an epoch is pure index arithmetic on the shards' item counts (no data is read to
plan it), so every rank and worker computes the same plan on its own:

1. **Shard sequence** of epoch ``e``: the shards in index order, or a permutation seeded by
   ``(seed, e)`` (``shuffle``), or shards drawn *with replacement* seeded by ``(seed, e)``
   (``resample``); repeated / drawn until it holds ``world * per_rank`` items.
2. **Rank (node) splitter**: the concatenated item sequence is cut into ``world`` contiguous
   ranges of exactly ``per_rank`` items (default ``N // world``; ``pad``: ``ceil(N / world)``,
   wrapping around). Ranks split *items*, not shards, so uneven shard counts or sizes never give
   ranks different lengths (the known DDP hang). A rank reads only the shards its range touches.
3. **Shuffle buffer**: with ``shuffle``, items are permuted inside consecutive windows of
   ``shuffle_buffer`` items of the rank's range (seeded by ``(seed, e, rank, window)``).
4. **Batches**: the rank's sequence is cut into ``num_batches`` batches of ``batch_size`` (the
   remainder dropped with ``drop_last``, else a last short batch). Equal on every rank.
5. **Worker splitter**: after ``start`` batches already consumed, DataLoader worker ``k`` of
   ``K`` builds the batches ``start + k, start + k + K, ...``. The DataLoader takes one batch
   from each worker in turn, so the loader yields the rank's batches exactly in order, whatever
   ``K`` is (batching happens in the workers; the loader's ``batch_size`` is None).

`ShardLoader` is the DataLoader: it advances the data epoch on every ``iter()`` and implements
Lightning's loader ``state_dict`` / ``load_state_dict`` (``{"epoch", "consumed"}``), so a run
resumed mid-epoch continues with the next unconsumed batch (also with another worker count).
Per-item randomness (crop, caption) is seeded by ``(seed, epoch, position in the epoch)``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tta.data.audio import AudioLoadError
from tta.data.check import mel_min_samples
from tta.data.mel import MelConfig, MelFrontend
from tta.data.shards import (
    ShardError,
    ShardIndex,
    ShardReader,
    caption_index,
    caption_rows,
    crop_segment,
    decode_audio,
    item_captions,
    whole_clip,
)

__all__ = ["ClipSettings", "ShardLoader", "ShardStream", "StreamSpec", "item_seed"]

log = logging.getLogger(__name__)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def item_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the crop and caption of the item at ``position`` of epoch ``epoch``'s sequence."""
    return int(_rng(seed, epoch, 3, position).integers(0, 2**31 - 1))


@dataclass(frozen=True)
class StreamSpec:
    """Everything that fixes the order of a rank's stream (see the module doc)."""

    counts: tuple[int, ...]
    batch_size: int
    world: int = 1
    rank: int = 0
    seed: int = 0
    shuffle: bool = True
    resample: bool = False
    samples_per_rank: int | None = None
    shuffle_buffer: int = 1000
    drop_last: bool = True
    pad: bool = False

    def __post_init__(self) -> None:
        if not self.counts or min(self.counts) < 1:
            raise ValueError(f"every shard needs at least one item, got counts {self.counts[:10]}")
        if self.batch_size < 1 or self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"bad batch_size / rank / world: {self.batch_size}, {self.rank}, {self.world}")
        if self.samples_per_rank is not None and self.samples_per_rank < 1:
            raise ValueError(f"samples_per_rank must be >= 1, got {self.samples_per_rank}")
        if self.per_rank < 1:
            raise ValueError(f"{sum(self.counts)} items cannot give each of {self.world} ranks one")
        if self.num_batches < 1:
            raise ValueError(f"{self.per_rank} items per rank make no full batch of {self.batch_size} "
                             "(lower batch_size or set drop_last=false)")

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    @property
    def per_rank(self) -> int:
        """Items of one rank in one epoch."""
        if self.samples_per_rank is not None:
            return self.samples_per_rank
        return -(-self.total // self.world) if self.pad else self.total // self.world

    @property
    def num_batches(self) -> int:
        """Batches of one rank in one epoch (the same on every rank)."""
        n, b = self.per_rank, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def shard_sequence(self, epoch: int) -> np.ndarray:
        """The shards of epoch ``epoch`` in order, enough of them to hold ``world * per_rank`` items."""
        counts = np.asarray(self.counts, dtype=np.int64)
        need, n = self.world * self.per_rank, len(counts)
        if self.resample:
            rng = _rng(self.seed, epoch, 1)
            parts, have = [], 0
            while have < need:
                draw = rng.integers(0, n, size=max(1, -(-(need - have) * n // max(int(counts.sum()), 1))))
                parts.append(draw)
                have += int(counts[draw].sum())
            return np.concatenate(parts)
        order = _rng(self.seed, epoch, 0).permutation(n) if self.shuffle else np.arange(n)
        passes = -(-need // int(counts.sum()))
        return np.tile(order, passes)

    def rank_items(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(shard, position in shard, position in the epoch)`` of this rank's items, in stream order."""
        seq = self.shard_sequence(epoch)
        sizes = np.asarray(self.counts, dtype=np.int64)[seq]
        ends = np.cumsum(sizes)
        pos = np.arange(self.rank * self.per_rank, (self.rank + 1) * self.per_rank, dtype=np.int64)
        which = np.searchsorted(ends, pos, side="right")
        shard = seq[which]
        within = pos - (ends[which] - sizes[which])
        if self.shuffle and self.shuffle_buffer > 1:
            w = self.shuffle_buffer
            order = np.concatenate([lo + _rng(self.seed, epoch, 2, self.rank, lo // w).permutation(min(w, len(pos) - lo))
                                    for lo in range(0, len(pos), w)])
            shard, within, pos = shard[order], within[order], pos[order]
        return shard, within, pos

    def batch_slices(self) -> list[slice]:
        b, n = self.batch_size, self.per_rank
        return [slice(j * b, min((j + 1) * b, n)) for j in range(self.num_batches)]


@dataclass(frozen=True)
class ClipSettings:
    """How records become training examples (the audio datamodule's clip preparation).

    ``arrays``: cached arrays to put in the batch, ``(array name, batch key)`` pairs (``"mel"``
    replaces the live mel front-end). ``per_caption``: those of them holding one row per caption
    (`caption_rows`); an example gets the row of the caption it draws, so the cached text
    embedding always belongs to the batch's ``caption``."""

    mel: MelConfig
    segment_frames: int | None
    random_crop: bool
    first_caption: bool = False
    pad_short_clips: bool = False
    arrays: tuple[tuple[str, str], ...] = ()
    per_caption: tuple[str, ...] = ()


class ShardStream(IterableDataset):
    """Batches (the audio datamodule's batch dict, plus cached arrays) of one rank's stream.

    ``epoch`` and ``start`` (batches already consumed) are set by `ShardLoader` before each
    iteration; workers receive them with their copy of the dataset."""

    def __init__(self, index: ShardIndex, spec: StreamSpec, clip: ClipSettings) -> None:
        if tuple(index.counts) != tuple(spec.counts):
            raise ValueError("the stream spec's counts differ from the index's")
        missing = [name for name, _ in clip.arrays if name not in index.arrays]
        if missing:
            raise ShardError(f"{index.root}: no cached arrays {missing} (it has {index.arrays})")
        self.root = index.root
        self.names = [s.name for s in index.shards]
        self.spec = spec
        self.clip = clip
        self.epoch = 0
        self.start = 0

    def __len__(self) -> int:
        return self.spec.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self._batches(self.epoch, self.start, workers, worker)

    def _batches(self, epoch: int, start: int, workers: int, worker: int) -> Iterator[dict[str, Any]]:
        from tta.data.datamodule import collate_clips

        shard, within, pos = self.spec.rank_items(epoch)
        slices = self.spec.batch_slices()
        readers: OrderedDict[int, ShardReader] = OrderedDict()
        frontend = MelFrontend.from_config(self.clip.mel)
        minimum = mel_min_samples(self.clip.mel)
        try:
            for j in range(start + worker, len(slices), workers):
                sl = slices[j]
                examples = [self._example(self._reader(readers, int(s)), int(s), int(w), epoch, int(p), frontend, minimum)
                            for s, w, p in zip(shard[sl], within[sl], pos[sl], strict=True)]
                batch = collate_clips(examples)
                good = [e for e in examples if e is not None]
                for _, key in self.clip.arrays:
                    if key != "mel" and good:
                        batch[key] = torch.stack([e[key] for e in good])
                yield batch
        finally:
            for reader in readers.values():
                reader.close()

    def _reader(self, readers: OrderedDict[int, ShardReader], shard: int) -> ShardReader:
        if shard in readers:
            readers.move_to_end(shard)
            return readers[shard]
        reader = ShardReader(self.root / self.names[shard], [name for name, _ in self.clip.arrays])
        if len(reader) != self.spec.counts[shard]:
            raise ShardError(f"{reader.path}: holds {len(reader)} items, the index says {self.spec.counts[shard]}")
        readers[shard] = reader
        while len(readers) > 2:  # a worker moves forward through its shards: keep the current and the last
            readers.popitem(last=False)[1].close()
        return reader

    def _example(self, reader: ShardReader, shard: int, within: int, epoch: int, pos: int, frontend: MelFrontend,
                 minimum: int) -> dict[str, Any] | None:
        record = reader.read(within)
        clip = self.clip
        name = f"{reader.path}:{record.key}.{record.audio_ext} ({record.id})"
        seed = item_seed(self.spec.seed, epoch, pos)
        try:
            wav = whole_clip(decode_audio(record.audio, name, clip.mel.sample_rate), clip.mel, minimum,
                             clip.pad_short_clips, name)
        except AudioLoadError as exc:
            log.warning("skipping clip %s: %s", record.id, exc)
            return None
        cached = dict(clip.arrays)
        if "mel" in cached:
            mel = torch.from_numpy(record.arrays["mel"])
            if mel.ndim != 2 or mel.shape[0] != clip.mel.n_mels:
                raise ShardError(f"{name}: cached mel has shape {tuple(mel.shape)}, expected ({clip.mel.n_mels}, frames)")
        else:
            with torch.no_grad():
                mel = frontend(wav)[0]
        start, wav, mel = crop_segment(wav, mel, clip.mel, clip.segment_frames, seed, clip.random_crop)
        captions = item_captions(record.item)
        rows = caption_rows(captions)
        row = caption_index(len(captions), seed, clip.first_caption)
        out = {"id": record.id, "start": start, "wav": wav, "mel": mel, "caption": rows[row], "captions": captions,
               "labels": [str(label) for label in record.item.get("labels") or []]}
        for array, key in clip.arrays:
            if array == "mel":
                continue
            value = record.arrays[array]
            if array in clip.per_caption:
                if value.ndim == 0 or value.shape[0] != len(rows):
                    raise ShardError(f"{name}: cached {array!r} has {value.shape[:1]} rows for {len(rows)} caption "
                                     "row(s); the shard does not match its item's captions")
                value = value[row]
            out[key] = torch.from_numpy(np.ascontiguousarray(value))
        return out


def _identity(batch: Any) -> Any:
    return batch


class ShardLoader(DataLoader):
    """The DataLoader of a `ShardStream`: one data epoch per ``iter()``, resumable mid-epoch.

    ``consumed`` counts batches the training loop used (the datamodule calls `mark_consumed`);
    workers are not persistent, so every epoch's workers get the current epoch and position."""

    def __init__(self, stream: ShardStream, num_workers: int = 0) -> None:
        super().__init__(stream, batch_size=None, num_workers=num_workers, collate_fn=_identity,
                         persistent_workers=False)
        self.epoch = 0
        self.consumed = 0
        self._next_epoch = 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        if self._resume is not None:
            epoch, start = self._resume
            self._resume = None
        else:
            epoch, start = self._next_epoch, 0
        stream: ShardStream = self.dataset  # type: ignore[assignment]
        stream.epoch, stream.start = epoch, start
        self.epoch, self.consumed, self._next_epoch = epoch, start, epoch + 1
        return super().__iter__()

    def mark_consumed(self) -> None:
        self.consumed += 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "consumed": int(self.consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        self.epoch, self.consumed = epoch, consumed
        if consumed >= len(self):  # a finished epoch: the next iteration starts the next one
            self._resume, self._next_epoch = None, epoch + 1
        else:
            self._resume = (epoch, consumed)
