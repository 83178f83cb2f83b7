"""Batches with DreamAudio references: the ``reference_audio`` datamodule.

`ReferenceAudioDataModule` is `AudioDataModule` (same manifests, splits, crops, bad-clip policy)
whose train / val / test batches also carry each item's K reference concepts (the manifest's
``references`` field, `tta.data.customize_refs`; docs/dreamaudio_data.md):

- ``reference_wav`` ``(B, K, T_ref)`` float: each reference clip resampled to the mel front-end's
  rate, from its start, cropped or zero-padded to ``reference_seconds``; zeros where absent;
- ``reference_present`` ``(B, K)`` bool: False for the padding of items with fewer than K
  references (a general item has none);
- ``reference_captions``: B lists of K captions (``""`` where absent).

References are checked in ``setup`` (`check_references`: malformed field, missing or unreadable
file): such items are named, counted with the unusable clips and skipped, and the split's
``max_bad_fraction`` applies to both. An item with more than K references is an error naming it.
``predict_dataloader`` serves plain clips (feature extraction needs no references).

With ``text_cache`` (`tta.data.text_cache`) the batches also carry the cached T5 states of the
reference captions, ``reference_t5_tokens`` ``(B, K, L, D)`` and ``reference_t5_mask``
``(B, K, L)`` (besides the prompt's ``t5_tokens`` / ``t5_mask``); ``setup`` refuses a cache that
lacks any of them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import Dataset

from tta.data.audio import AudioLoadError, load_audio, pad_or_crop
from tta.data.customize_refs import Reference, check_references, item_references, manifest_lines
from tta.data.datamodule import AudioDataModule, ClipDataset, TooManyBadClipsError, collate_clips
from tta.data.manifest import ManifestError
from tta.data.sampling import ResumableDataLoader
from tta.data.text_cache import REF_T5_TOKENS_KEY, T5_TOKENS_KEY
from tta.registry import register

log = logging.getLogger(__name__)

__all__ = ["ReferenceAudioDataModule", "ReferenceClipDataset", "collate_references"]


class ReferenceClipDataset(Dataset):
    """A `ClipDataset` whose items also carry their K references (see the module docstring).

    Args:
        clips: the clips (their items keep their order).
        references: each item's references by id (at most ``num_references``).
        num_references: K.
        reference_samples: samples of each reference waveform.
    """

    def __init__(self, clips: ClipDataset, references: dict[str, list[Reference]], num_references: int,
                 reference_samples: int) -> None:
        self.clips, self.references = clips, references
        self.num_references, self.reference_samples = num_references, reference_samples

    @property
    def items(self) -> list[Any]:
        return self.clips.items

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any] | None:
        out = self.clips[key]
        if out is None:
            return None
        index = key[0] if isinstance(key, tuple) else key
        refs = self.references.get(self.clips.items[index].id, [])
        k = self.num_references
        wav = torch.zeros(k, self.reference_samples)
        present = torch.zeros(k, dtype=torch.bool)
        captions = [""] * k
        sr = self.clips.mel_config.sample_rate
        for j, ref in enumerate(refs):
            try:
                audio, _ = load_audio(ref.audio, target_sr=sr)
                wav[j] = pad_or_crop(audio, self.reference_samples)
            except (AudioLoadError, ValueError) as exc:
                log.warning("skipping clip %s: its reference %d cannot be used: %s", out["id"], j, exc)
                return None
            present[j], captions[j] = True, ref.caption
        return {**out, "reference_wav": wav, "reference_present": present, "reference_captions": captions}


def collate_references(batch: list[dict[str, Any] | None]) -> dict[str, Any]:
    """`collate_clips` plus the stacked references of the clips that loaded."""
    out = collate_clips(batch)
    good = [b for b in batch if b is not None]
    out["reference_captions"] = [b["reference_captions"] for b in good]
    if good:
        out["reference_wav"] = torch.stack([b["reference_wav"] for b in good])
        out["reference_present"] = torch.stack([b["reference_present"] for b in good])
    return out


@register("datamodule", "reference_audio")
class ReferenceAudioDataModule(AudioDataModule):
    """`AudioDataModule` whose batches carry K references per clip (DreamAudio training).

    Args:
        num_references: K (items with fewer are padded with absent references).
        reference_seconds: length of every reference waveform.
        **kwargs: `AudioDataModule`'s (``manifest``, ``mel``, ``segment_seconds``, ...).
    """

    def __init__(self, num_references: int = 3, reference_seconds: float = 10.24, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_references < 1 or not reference_seconds > 0:
            raise ValueError(f"num_references must be >= 1 and reference_seconds > 0, got {num_references}, "
                             f"{reference_seconds}")
        self.num_references, self.reference_seconds = int(num_references), float(reference_seconds)
        self.reference_samples = round(self.reference_seconds * self.mel_config.sample_rate)

    def _references(self) -> tuple[dict[str, list[Reference]], set[str]]:
        """Every item's references by id, and the ids of items whose references are unusable."""
        path = self.manifest_path()
        root = path.parent
        refs: dict[str, list[Reference]] = {}
        bad = {problem.item_id: str(problem) for problem in check_references(path)}
        for problem in bad.values():
            log.warning("unusable reference: %s", problem)
        for line, item in manifest_lines(path):
            if item.id in bad:
                continue
            refs[item.id] = item_references(item, root, manifest=path, line=line)
            if len(refs[item.id]) > self.num_references:
                raise ManifestError(path, line, f"item {item.id!r} has {len(refs[item.id])} references, more than "
                                    f"num_references = {self.num_references}", "references")
        return refs, set(bad)

    def setup(self, stage: str | None = None) -> None:
        fresh = not self.datasets
        super().setup(stage)
        if not fresh:
            return
        refs, bad = self._references()
        for role in ("train", "val", "test"):
            clips = self.datasets[role]
            dropped = [i.id for i in clips.items if i.id in bad]
            total = len(clips.items)
            clips.items = [i for i in clips.items if i.id not in bad]
            self.skipped["header"] += len(dropped)
            if dropped:
                log.warning("%s split: %d clips skipped for unusable references", self.splits[role], len(dropped))
            if total and len(dropped) / total > self.max_bad_fraction:
                raise TooManyBadClipsError(
                    f"{len(dropped)} of {total} clips of split {self.splits[role]!r} in {self.manifest_path()} have "
                    f"unusable references (max_bad_fraction={self.max_bad_fraction}); first: {', '.join(dropped[:5])}. "
                    "Run `tta data check` on the manifest.")
            self.datasets[role] = ReferenceClipDataset(clips, refs, self.num_references, self.reference_samples)
        self.require_cached("reference captions", {
            role: [r.caption for i in self.datasets[role].items for r in refs.get(i.id, [])] for role in self.splits})

    def cached_sources(self, role: str = "train") -> dict[str, dict[str, Any]]:
        """`AudioDataModule.cached_sources` plus the reference captions' states (the same producer)."""
        sources = super().cached_sources(role)
        if T5_TOKENS_KEY in sources:
            sources[REF_T5_TOKENS_KEY] = dict(sources[T5_TOKENS_KEY])
        return sources

    def _loader(self, role: str, shuffle: bool) -> ResumableDataLoader:
        base = super()._loader(role, shuffle)  # the sampler, batch size and worker settings
        return ResumableDataLoader(base.dataset, base.sampler, batch_size=base.batch_size,
                                   num_workers=base.num_workers, collate_fn=self.batch_collate(collate_references),
                                   persistent_workers=base.persistent_workers, drop_last=base.drop_last)
