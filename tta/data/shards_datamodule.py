"""`ShardDataModule` (registered ``shards``): training from `tta data shard` folders, streamed.

Batches are the audio datamodule's (``id``, ``start``, ``wav``, ``mel``, ``caption``,
``captions``, ``labels``, ``n_skipped``; same mel front-end and crop rules), so every module
trains from it unchanged; cached arrays of the shards are used when present:

- ``mel`` (whole-clip log-mels): replaces the live front-end (random crops are cut from it,
  identical to computing it);
- per-segment model outputs (e.g. ``latent``, VAE posterior moments; ``clap_audio``) appear in
  the batch under the key their producer recorded (``latent_moments``, ``clap_audio``); they were
  computed on the clip's fixed segment (its first ``segment_frames`` frames), so training crops
  are fixed to frame 0 then;
- per-caption model outputs (``clap``, ``t5`` + ``t5_mask``: one row per caption) appear under
  their batch key as the row of the example's drawn ``caption`` (`ClipSettings.per_caption`);
  they depend on neither the crop nor the mel front-end.

Splitting, epoch length and resume: `tta.data.shards_stream`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from tta.data.datamodule import count_skipped_and_consumed
from tta.data.mel import MelConfig
from tta.data.shards import ShardError, ShardIndex
from tta.data.shards_stream import ClipSettings, ShardLoader, ShardStream, StreamSpec
from tta.registry import register

__all__ = ["ShardDataModule"]

log = logging.getLogger(__name__)


@register("datamodule", "shards")
class ShardDataModule(L.LightningDataModule):
    """Streams the shard folders ``train`` (and ``val`` / ``test``) written by ``tta data shard``.

    Args:
        train / val / test: shard folders (``index.json`` + ``shard-*.tar``); val / test optional.
        mel: mel preset name or `MelConfig` dict (must equal the shards' when cached arrays are used).
        segment_seconds: training crop length (None = whole clips, batch size 1).
        batch_size: per-device batch size; num_workers: DataLoader workers per rank.
        seed: shuffling / resampling / crop seed.
        shuffle: permute the shards and shuffle items in windows of ``shuffle_buffer`` each epoch.
        resample: draw shards with replacement each epoch (seeded by the epoch).
        samples_per_rank: items per rank per epoch (default: training items // world size).
        drop_last: drop the last short batch of a rank's epoch (training).
        use_cached: cached arrays to use (None: every array the training shards have; []: none).
        pad_short_clips: zero-pad clips too short for the mel front-end instead of skipping them.
    """

    def __init__(
        self,
        train: str,
        val: str | None = None,
        test: str | None = None,
        mel: str | dict[str, Any] = "audioldm",
        segment_seconds: float | None = 2.0,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        resample: bool = False,
        samples_per_rank: int | None = None,
        shuffle_buffer: int = 1000,
        drop_last: bool = True,
        use_cached: list[str] | None = None,
        pad_short_clips: bool = False,
    ) -> None:
        super().__init__()
        self.folders = {"train": train, "val": val, "test": test}
        self.mel_config = MelConfig.preset(mel) if isinstance(mel, str) else MelConfig.from_dict(mel)
        hop = self.mel_config.hop_length
        self.segment_frames = None if segment_seconds is None else round(segment_seconds * self.mel_config.sample_rate) // hop
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.shuffle, self.resample, self.samples_per_rank = shuffle, resample, samples_per_rank
        self.shuffle_buffer, self.drop_last = shuffle_buffer, drop_last
        self.use_cached = None if use_cached is None else list(use_cached)
        self.pad_short_clips = pad_short_clips
        self.indexes: dict[str, ShardIndex] = {}
        self.skipped = {"decode": 0}
        self._train_loader: ShardLoader | None = None

    def setup(self, stage: str | None = None) -> None:
        for role, folder in self.folders.items():
            if folder is not None and role not in self.indexes:
                self.indexes[role] = ShardIndex.load(Path(folder))

    def _arrays(self, index: ShardIndex) -> tuple[tuple[str, str], ...]:
        """``(array, batch key)`` pairs used from ``index``; refuses caches made for other settings."""
        wanted = list(index.arrays) if self.use_cached is None else self.use_cached
        unknown = [a for a in wanted if a not in index.arrays]
        if unknown:
            raise ShardError(f"use_cached: {index.root} has no cached arrays {unknown} (it has {index.arrays})")
        alone = sorted({str(r) for a in wanted for r in index.sources.get(a, {}).get("requires", [])} - set(wanted))
        if alone:
            raise ShardError(f"use_cached: the cached arrays {wanted} of {index.root} need {alone} too (one "
                             "producer's outputs go together); add them or leave their partners out")
        audio = [a for a in wanted if index.inputs(a) != "text"]
        if audio and index.mel is not None:
            index.mel.check_compatible(self.mel_config, f"the cached arrays of {index.root} and this datamodule "
                                                        "(set use_cached: [] to compute mels live)")
        segment = [a for a in audio if a != "mel"]
        if segment and index.segment_frames != self.segment_frames:
            raise ShardError(f"{index.root}: cached {segment} were computed on {index.segment_frames}-frame segments, "
                             f"this datamodule crops {self.segment_frames} frames (segment_seconds); reshard with "
                             "a matching --segment-seconds or set use_cached without them")
        return tuple((a, str(index.sources.get(a, {}).get("batch_key", a))) for a in wanted)

    def cached_sources(self, role: str = "train") -> dict[str, dict[str, Any]]:
        """``{batch key: producer metadata}`` of the model-made arrays the ``role`` batches carry
        (models check that the producer matches their frozen component)."""
        if role not in self.indexes:
            self.setup()
        index = self.indexes[role]
        return {key: dict(index.sources.get(name, {})) for name, key in self._arrays(index) if name != "mel"}

    def index_path(self, role: str = "train") -> Path:
        """The ``index.json`` of the ``role`` shards (named in errors about their caches)."""
        return Path(str(self.folders[role])) / "index.json"

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _loader(self, role: str) -> ShardLoader:
        if role not in self.indexes:
            self.setup()
        index = self.indexes[role]
        rank, world = self._rank_world()
        train = role == "train"
        arrays = self._arrays(index)
        if not train and self.folders["train"] is not None:
            self._same_producers(role)
        per_caption = tuple(a for a, _ in arrays if index.inputs(a) == "text")
        fixed = [a for a, _ in arrays if a != "mel" and a not in per_caption]
        if train and fixed and self.shuffle:
            log.info("training crops are fixed to frame 0: the cached %s were computed on that segment", fixed)
        spec = StreamSpec(tuple(index.counts), self.batch_size, world=world, rank=rank, seed=self.seed,
                          shuffle=train and self.shuffle, resample=train and self.resample,
                          samples_per_rank=self.samples_per_rank if train else None,
                          shuffle_buffer=self.shuffle_buffer, drop_last=train and self.drop_last, pad=not train)
        clip = ClipSettings(self.mel_config, self.segment_frames, random_crop=train and not fixed,
                            pad_short_clips=self.pad_short_clips, arrays=arrays, per_caption=per_caption)
        return ShardLoader(ShardStream(index, spec, clip), num_workers=self.num_workers)

    def _same_producers(self, role: str) -> None:
        """Refuse ``role`` shards whose cached model outputs were made by other models than the
        training shards' (the model checks only the training ones against its own components)."""
        def identity(meta: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in meta.items() if k != "checkpoint"}  # the file's name may differ

        train, mine = self.cached_sources("train"), self.cached_sources(role)
        other = sorted(k for k in set(train) & set(mine) if identity(train[k]) != identity(mine[k]))
        if other:
            raise ShardError(f"the cached {other} of {self.index_path(role)} were made by other models or settings "
                             f"than those of {self.index_path('train')}: reshard one of them, or set use_cached "
                             "without them")

    def train_dataloader(self) -> ShardLoader:
        self._train_loader = self._loader("train")
        spec = self._train_loader.dataset.spec  # type: ignore[attr-defined]
        log.info("rank %d of %d: %d items per epoch in %d batches of %d (%d items in %d shards)", spec.rank,
                 spec.world, spec.per_rank, spec.num_batches, spec.batch_size, spec.total, len(spec.counts))
        if self.trainer is not None:
            accum = self.trainer.accumulate_grad_batches
            log.info("batch size %d per device x %d devices x %d accumulation = global batch %d",
                     self.batch_size, spec.world, accum, self.batch_size * spec.world * accum)
        return self._train_loader

    def val_dataloader(self) -> ShardLoader | list:
        return self._loader("val") if self.folders["val"] is not None else []

    def test_dataloader(self) -> ShardLoader | list:
        return self._loader("test") if self.folders["test"] is not None else []

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        return count_skipped_and_consumed(self, batch)
