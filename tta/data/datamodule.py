"""Audio datamodule: manifest (or the synthetic default) -> (waveform segment, log-mel) batches.

- Splits come from the manifest's ``split`` field.
- Bad clips are skipped, never zero-filled: headers are checked in ``setup`` (missing,
  unreadable, truncated, empty, or shorter than the mel front-end can analyse:
  `tta.data.check.mel_min_samples`) and clips that fail to decode later are dropped from their
  batch; both are named, counted and logged, and more than ``max_bad_fraction`` of a split being
  unusable aborts with the offending ids. ``pad_short_clips=True`` zero-pads too-short clips to
  the minimum instead.
- Mels of whole clips can be cached on disk (``cache_dir``); segments are cropped in the frame
  domain, so cached and uncached runs see identical data.
- ``predict_dataloader`` (``tta predict``, e.g. feature extraction) yields every usable clip of
  ``predict_splits`` (default: all splits) exactly once, in manifest order, cropped from its start
  (no random crop) and with its *first* caption; under DDP Lightning shards it without repeats.
- ``text_cache`` (a ``tta data text-cache`` folder, `tta.data.text_cache`): train / val / test
  batches also carry the cached T5 token states of their captions (``t5_tokens``, ``t5_mask``),
  which models read instead of running their frozen T5; every caption of the three splits must be
  cached (checked in ``setup``), and `cached_sources` gives the producer models check at fit start.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset

from tta.data.audio import AudioLoadError, load_audio, truncation
from tta.data.check import mel_min_samples, resampled_length
from tta.data.manifest import ManifestItem, read_manifest
from tta.data.mel import MelConfig, MelFrontend
from tta.data.sampling import EpochSampler, ResumableDataLoader
from tta.data.shards import caption_rows
from tta.data.synth import ensure_synth
from tta.data.text_cache import INDEX_NAME as TEXT_CACHE_INDEX
from tta.data.text_cache import T5_TOKENS_KEY, CachedTextCollate, TextCache
from tta.registry import register
from tta.utils.weights import atomic_save, load_checkpoint

log = logging.getLogger(__name__)


class TooManyBadClipsError(RuntimeError):
    """More clips of a split are unusable than the configured threshold allows."""


def default_cache_root() -> Path:
    """``$TTA_CACHE`` or ``~/.cache/tta``: where synthetic data and caches live by default."""
    return Path(os.environ.get("TTA_CACHE", Path.home() / ".cache" / "tta")).expanduser()


@dataclass
class SynthSpec:
    """Arguments of the synthetic dataset used when no manifest is given."""

    n: int = 256
    seed: int = 0
    duration: float = 4.0
    zipf: float = 1.0
    heldout: int = 4


class ClipDataset(Dataset):
    """Clips of a manifest as ``{"id", "start", "wav", "mel", "caption", "captions", "labels"}``; indexed by
    (index, seed). ``start`` is the crop's first mel frame in the clip, so (id, start) names the
    segment (frozen-encoder caches key on it).

    The caption is drawn from the clip's captions with the item seed, or is always the first one
    with ``first_caption=True`` (prediction / feature extraction).
    """

    def __init__(
        self,
        items: list[ManifestItem],
        mel: MelConfig,
        segment_frames: int | None,
        random_crop: bool,
        cache_dir: Path | None = None,
        first_caption: bool = False,
        pad_short_clips: bool = False,
    ) -> None:
        self.items = items
        self.pad_short_clips = pad_short_clips
        self.min_samples = mel_min_samples(mel)
        self.first_caption = first_caption
        self.mel_config = mel
        self.frontend = MelFrontend.from_config(mel)
        self.segment_frames = segment_frames
        self.random_crop = random_crop
        self.cache_dir = cache_dir
        self._mel_key = hashlib.sha1(repr(sorted(mel.to_dict().items())).encode()).hexdigest()[:12]

    def __len__(self) -> int:
        return len(self.items)

    def _cache_path(self, item: ManifestItem) -> Path:
        assert self.cache_dir is not None
        st = Path(item.audio).stat()
        key = hashlib.sha1(f"{item.audio}|{st.st_size}|{st.st_mtime_ns}|{self._mel_key}".encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.pt"

    def _full_clip(self, item: ManifestItem) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-clip waveform and log-mel (mel from the cache when enabled)."""
        wav, _ = load_audio(item.audio, target_sr=self.mel_config.sample_rate)
        hop = self.mel_config.hop_length
        if wav.shape[0] < self.min_samples:
            if not self.pad_short_clips:
                raise AudioLoadError(item.audio, _too_short(wav.shape[0], self.min_samples, self.mel_config))
            wav = torch.nn.functional.pad(wav, (0, self.min_samples - wav.shape[0]))
        wav = wav[: (wav.shape[0] // hop) * hop]
        if self.cache_dir is None:
            return wav, self.frontend(wav)[0]
        path = self._cache_path(item)
        if path.is_file():
            return wav, load_checkpoint(path)
        mel = self.frontend(wav)[0]
        atomic_save(mel, path)
        return wav, mel

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any] | None:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        item = self.items[index]
        try:
            wav, mel = self._full_clip(item)
        except AudioLoadError as exc:
            log.warning("skipping clip %s: %s", item.id, exc)
            return None
        hop = self.mel_config.hop_length
        frames = mel.shape[-1]
        start = 0
        if self.segment_frames is not None:
            seg = self.segment_frames
            if frames >= seg:
                start = int(np.random.default_rng(seed).integers(0, frames - seg + 1)) if self.random_crop else 0
                mel = mel[:, start : start + seg]
                wav = wav[start * hop : (start + seg) * hop]
            else:  # a short clip: pad with the log floor / silence to the segment length
                floor = float(np.log(self.mel_config.log_floor))
                mel = torch.nn.functional.pad(mel, (0, seg - frames), value=floor)
                wav = torch.nn.functional.pad(wav, (0, (seg - frames) * hop))
        if not item.captions:
            caption = ""
        elif self.first_caption:
            caption = item.captions[0]
        else:
            caption = item.captions[int(np.random.default_rng(seed + 1).integers(len(item.captions)))]
        return {"id": item.id, "start": start, "wav": wav, "mel": mel, "caption": caption,
                "captions": list(item.captions), "labels": list(item.labels)}


def _too_short(samples: int, minimum: int, mel: MelConfig) -> str:
    return (f"too short for the mel front-end: {samples} samples at {mel.sample_rate} Hz, it needs at least "
            f"{minimum} (n_fft {mel.n_fft}, hop {mel.hop_length}); run `tta data check`, or set "
            "pad_short_clips=true to zero-pad such clips")


def collate_clips(batch: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack clips, dropping the ones that failed to load (counted in ``n_skipped``)."""
    good = [b for b in batch if b is not None]
    out: dict[str, Any] = {"n_skipped": len(batch) - len(good), "id": [b["id"] for b in good]}
    out["start"] = [b["start"] for b in good]
    out["caption"] = [b["caption"] for b in good]
    out["captions"] = [b["captions"] for b in good]  # every caption of the clip (retrieval / captioning protocols)
    out["labels"] = [b["labels"] for b in good]
    if good:
        out["wav"] = torch.stack([b["wav"] for b in good])
        out["mel"] = torch.stack([b["mel"] for b in good])
    return out


@register("datamodule", "audio")
class AudioDataModule(L.LightningDataModule):
    """Clips of a JSONL manifest, or of the synthetic captioned dataset when ``manifest`` is None.

    Args:
        manifest: path of a JSONL manifest; None builds/reuses the synthetic dataset.
        mel: mel preset name (see `tta.data.mel.PRESETS`) or a `MelConfig` dict.
        segment_seconds: training crop length (None = whole clips, batch size 1 recommended).
        batch_size: per-device batch size.
        synth: `SynthSpec` fields for the synthetic dataset.
        data_dir: where the synthetic dataset is written (default ``$TTA_CACHE/synth/...``).
        cache_dir: enable the on-disk mel cache in this directory.
        max_bad_fraction: abort when more than this fraction of a split is unusable.
        pad_short_clips: zero-pad clips shorter than the mel front-end's minimum
            (`tta.data.check.mel_min_samples`) instead of refusing them.
        predict_splits: manifest splits served by ``predict_dataloader`` (None: every clip).
        text_cache: a ``tta data text-cache`` folder: batches carry the cached T5 token states of
            their captions (see the module docstring); None: none.
    """

    def __init__(
        self,
        manifest: str | None = None,
        mel: str | dict[str, Any] = "audioldm",
        segment_seconds: float | None = 2.0,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        synth: SynthSpec | None = None,
        data_dir: str | None = None,
        cache_dir: str | None = None,
        max_bad_fraction: float = 0.01,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        predict_splits: list[str] | None = None,
        pad_short_clips: bool = False,
        text_cache: str | None = None,
    ) -> None:
        super().__init__()
        self.manifest = manifest
        self.mel_config = MelConfig.preset(mel) if isinstance(mel, str) else MelConfig.from_dict(mel)
        self.segment_frames = (
            None if segment_seconds is None else int(round(segment_seconds * self.mel_config.sample_rate)) // self.mel_config.hop_length
        )
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.synth = synth or SynthSpec()
        self.data_dir = data_dir
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.max_bad_fraction = max_bad_fraction
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.predict_splits = None if predict_splits is None else list(predict_splits)
        self.pad_short_clips = pad_short_clips
        self.text_cache = text_cache
        self._text_cache: TextCache | None = None
        self.datasets: dict[str, ClipDataset] = {}
        self.skipped = {"header": 0, "decode": 0}
        self._train_loader: ResumableDataLoader | None = None

    # ------------------------------------------------------------------ data
    def manifest_path(self) -> Path:
        """The manifest in use, generating the synthetic dataset on first use."""
        if self.manifest is not None:
            return Path(self.manifest).expanduser()
        s = self.synth
        root = Path(self.data_dir).expanduser() if self.data_dir else default_cache_root() / "synth" / (
            f"sr{self.mel_config.sample_rate}_n{s.n}_seed{s.seed}_d{s.duration:g}_z{s.zipf:g}_h{s.heldout}"
        )
        return ensure_synth(root, n=s.n, seed=s.seed, sample_rate=self.mel_config.sample_rate,
                            duration=s.duration, zipf=s.zipf, heldout=s.heldout)

    def prepare_data(self) -> None:
        self.manifest_path()

    def _usable(self, items: list[ManifestItem], split: str) -> list[ManifestItem]:
        good, bad = [], []
        minimum = mel_min_samples(self.mel_config)
        for item in items:
            try:
                reason = truncation(item.audio)
                info = sf.info(str(item.audio))
            except (RuntimeError, OSError, sf.LibsndfileError) as exc:  # unreadable header / missing file
                reason = f"unreadable: {exc}"
            else:
                samples = resampled_length(int(info.frames), int(info.samplerate), self.mel_config.sample_rate)
                if info.frames == 0:
                    reason = "zero-length audio"
                elif reason is None and samples < minimum and not self.pad_short_clips:
                    reason = _too_short(samples, minimum, self.mel_config)
            if reason is not None:
                log.warning("clip %s (%s) is unusable: %s", item.id, item.audio, reason)
            (good if reason is None else bad).append(item)
        self.skipped["header"] += len(bad)
        if bad:
            log.warning("%s split: %d of %d clips unusable and skipped", split, len(bad), len(items))
        if items and len(bad) / len(items) > self.max_bad_fraction:
            raise TooManyBadClipsError(
                f"{len(bad)} of {len(items)} clips of split {split!r} in {self.manifest_path()} are unusable "
                f"(max_bad_fraction={self.max_bad_fraction}); first: {', '.join(i.id for i in bad[:5])}. "
                "Run `tta data check` on the manifest."
            )
        return good

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            items = read_manifest(self.manifest_path())
            for role, split in self.splits.items():
                chosen = [i for i in items if i.split == split]
                chosen = self._usable(chosen, split)
                self.datasets[role] = ClipDataset(
                    chosen, self.mel_config, self.segment_frames, random_crop=(role == "train"), cache_dir=self.cache_dir,
                    pad_short_clips=self.pad_short_clips,
                )
            if not self.datasets["train"].items and stage in (None, "fit"):
                raise ValueError(f"manifest {self.manifest_path()} has no clips in split {self.splits['train']!r}")
            self.require_cached("captions", {
                role: [t for i in self.datasets[role].items for t in caption_rows(list(i.captions))]
                for role in self.splits})
        if stage == "predict" and "predict" not in self.datasets:
            self._setup_predict()

    def _setup_predict(self) -> None:
        wanted = self.predict_splits
        name = "all" if wanted is None else ",".join(wanted)
        chosen = [i for i in read_manifest(self.manifest_path()) if wanted is None or i.split in wanted]
        chosen = self._usable(chosen, f"predict ({name})")
        if not chosen:
            raise ValueError(f"manifest {self.manifest_path()} has no usable clip in predict splits {name!r}")
        self.datasets["predict"] = ClipDataset(
            chosen, self.mel_config, self.segment_frames, random_crop=False, cache_dir=self.cache_dir, first_caption=True,
            pad_short_clips=self.pad_short_clips,
        )

    # ------------------------------------------------------------ text cache
    def text_cache_reader(self) -> TextCache | None:
        """The ``text_cache`` folder, loaded and checked on first use (None without one)."""
        if self.text_cache is not None and self._text_cache is None:
            self._text_cache = TextCache.load(self.text_cache)
        return self._text_cache

    def require_cached(self, what: str, texts: dict[str, list[str]]) -> None:
        """With a text cache: refuse (naming the split) texts of a role's clips that it lacks."""
        cache = self.text_cache_reader()
        if cache is None:
            return
        for role, role_texts in texts.items():
            cache.require(role_texts, f"{what} of split {self.splits[role]!r}")

    def cached_sources(self, role: str = "train") -> dict[str, dict[str, Any]]:
        """``{batch key: producer metadata}`` of the cached model outputs the batches carry (the
        text cache's T5 states; empty without one): models check it against their encoder."""
        cache = self.text_cache_reader()
        return {} if cache is None else {T5_TOKENS_KEY: cache.meta}

    def index_path(self, role: str = "train") -> Path:
        """The text cache's ``index.json`` (named in errors about the cache)."""
        if self.text_cache is None:
            raise ValueError("this datamodule has no text_cache, hence no cache index")
        return Path(self.text_cache).expanduser() / TEXT_CACHE_INDEX

    def batch_collate(self, collate: Any = collate_clips) -> Any:
        """``collate``, adding the cached T5 states of the batch's captions when a text cache is set."""
        cache = self.text_cache_reader()
        return collate if cache is None else CachedTextCollate(collate, cache)

    # ----------------------------------------------------------- dataloaders
    def _loader(self, role: str, shuffle: bool) -> ResumableDataLoader:
        ds = self.datasets[role]
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = EpochSampler(ds, shuffle=shuffle, seed=self.seed, num_replicas=world, rank=rank,
                               batch_size=self.batch_size, pad=role != "train")  # evaluation sees every clip
        return ResumableDataLoader(
            ds, sampler, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self.batch_collate(),
            persistent_workers=self.num_workers > 0, drop_last=(role == "train"),
        )

    def train_dataloader(self) -> DataLoader:
        self._train_loader = self._loader("train", shuffle=True)
        if self.trainer is not None:
            world, accum = self.trainer.world_size, self.trainer.accumulate_grad_batches
            log.info("batch size %d per device x %d devices x %d accumulation = global batch %d",
                     self.batch_size, world, accum, self.batch_size * world * accum)
        return self._train_loader

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Every clip of ``predict_splits`` once, in order (Lightning shards it over ranks without repeats)."""
        if "predict" not in self.datasets:
            self._setup_predict()
        return DataLoader(
            self.datasets["predict"], batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
            collate_fn=collate_clips, drop_last=False,
        )

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        return count_skipped_and_consumed(self, batch)


def count_skipped_and_consumed(datamodule: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The ``on_after_batch_transfer`` of tta's datamodules: count (and log) the clips the batch's
    collate skipped as undecodable, and mark a training batch consumed on the resumable train loader
    (so a checkpoint taken now resumes after it)."""
    n = batch.get("n_skipped", 0)
    if n:
        datamodule.skipped["decode"] += n
        log.warning("%d clips failed to decode and were skipped (%d so far)", n, datamodule.skipped["decode"])
    trainer = datamodule.trainer
    if trainer is not None and trainer.training and datamodule._train_loader is not None:
        datamodule._train_loader.mark_consumed()
    return batch
