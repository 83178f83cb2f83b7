"""Embed a manifest's clips and captions with a trained CLAP (the datastore of Re-AudioLDM)."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tta.data.audio import AudioLoadError, load_audio
from tta.data.manifest import ManifestItem, read_manifest

log = logging.getLogger(__name__)


@dataclass
class Datastore:
    """Ids, first captions and L2-normalised CLAP embeddings of a manifest's usable clips."""

    ids: list[str]
    captions: list[str]
    audio: np.ndarray
    text: np.ndarray
    skipped: list[str]


def file_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file (identifies the embedding model in index metadata)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def embed_items(clap: torch.nn.Module, items: list[ManifestItem], clip_seconds: float | None = None,
                batch_size: int = 32) -> Datastore:
    """Embed every item (audio: whole clip or its first ``clip_seconds``; text: first caption).

    Clips that cannot be read are skipped and listed in ``Datastore.skipped`` (logged), never
    embedded as silence.
    """
    clap.eval()
    sr = clap.sample_rate
    ids, captions, audio, skipped = [], [], [], []
    for item in items:
        try:
            wav, _ = load_audio(item.audio, target_sr=sr)
        except AudioLoadError as exc:
            log.warning("index: skipping %s: %s", item.id, exc)
            skipped.append(item.id)
            continue
        if clip_seconds is not None:
            wav = wav[: int(clip_seconds * sr)]
        audio.append(clap.embed_audio(wav[None].to(_device(clap)))[0].float().cpu())
        ids.append(item.id)
        captions.append(item.captions[0] if item.captions else "")
    text = [clap.embed_text(captions[i : i + batch_size]).float().cpu() for i in range(0, len(captions), batch_size)]
    if not ids:
        raise ValueError("no usable clip to embed")
    return Datastore(ids, captions, torch.stack(audio).numpy(), torch.cat(text).numpy(), skipped)


def embed_manifest(clap: torch.nn.Module, manifest: str | os.PathLike, splits: list[str] | None = None,
                   clip_seconds: float | None = None) -> Datastore:
    """`embed_items` over the manifest's clips (of ``splits`` when given)."""
    items = read_manifest(Path(manifest))
    if splits:
        items = [i for i in items if i.split in splits]
    return embed_items(clap, items, clip_seconds=clip_seconds)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
