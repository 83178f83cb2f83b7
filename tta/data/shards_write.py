"""`write_shards`: a manifest (one split) -> deterministic WebDataset-layout tar shards + ``index.json``.

Items keep the manifest's order; each shard holds ``shard_size`` usable items (the last one
fewer). Unusable clips (missing, unreadable, truncated, empty, an unsupported container, too
short for the mel front-end, undecodable) are never written: each is logged, listed with its
reason under ``skipped`` in the index, and with ``strict=True`` the command fails instead.

Cached arrays: ``store_mel`` stores the whole clip's log-mel (``<key>.mel.npy``, float32
``(n_mels, frames)``), computed exactly as the audio datamodule computes it, so training crops it
in the frame domain with the same result. Further arrays come from ``sources`` (`ArraySource`):
callables that map either the items' *fixed* training segments (the first ``segment_frames``
frames, padded like a short clip; as log-mels or waveforms) to one row per item, or the items'
captions to one row per caption (an item's array is ``(len(caption_rows(captions)), ...)``, row i
for caption i, so the reader picks the row of the caption it draws). They run frozen models,
which live outside ``tta.data`` (`tta.generators.vae.shard_latents`,
`tta.generators.ldm.shard_conditions`), so this module imports no model code.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
import torch

from tta.data.audio import AudioLoadError, load_audio, truncation
from tta.data.check import mel_min_samples
from tta.data.manifest import ManifestItem, read_manifest, select_split
from tta.data.mel import MelConfig, MelFrontend
from tta.data.shards import (
    AUDIO_EXTENSIONS,
    FORMAT,
    INDEX_NAME,
    VERSION,
    ShardError,
    ShardIndex,
    caption_rows,
    crop_segment,
    item_captions,
    whole_clip,
)
from tta.utils.errors import UsageError
from tta.utils.files import atomic_path, file_sha256

__all__ = ["ArraySource", "SourceInputs", "apply_sources", "npy_bytes", "prepare_out", "shard_name", "tar_member", "write_shards"]

log = logging.getLogger(__name__)


SourceInputs = Literal["mel", "wav", "text"]


@dataclass
class ArraySource:
    """A cached array made by a frozen model; ``meta`` (the model's identity) is recorded in the
    index, with ``inputs``. ``fn`` maps, by ``inputs``:

    - ``"mel"``: the fixed segments' log-mels ``(B, n_mels, segment_frames)`` to ``(B, ...)``;
    - ``"wav"``: the same segments' waveforms ``(B, segment_frames * hop)`` at the mel front-end's
      rate to ``(B, ...)``;
    - ``"text"``: N captions (a list of strings) to ``(N, ...)``; the items' `caption_rows`.
    """

    fn: Callable[[Any], torch.Tensor]
    meta: dict[str, Any]
    inputs: SourceInputs = "mel"
    #: the frozen network ``fn`` runs (None: none); whoever runs ``fn`` on an accelerator moves it
    #: there (`tta.training.shard_cache`), and ``fn`` computes on its device
    module: torch.nn.Module | None = None


def shard_name(n: int) -> str:
    """File name of shard ``n``."""
    return f"shard-{n:06d}.tar"


def tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add ``data`` as ``name`` with fixed metadata (byte-identical output for identical input)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as float32 ``.npy`` bytes (the cached arrays' member format)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _problem(item: ManifestItem, mel: MelConfig | None, pad_short: bool) -> str | None:
    """Why ``item``'s audio cannot be sharded (header checks only), or None."""
    path = Path(item.audio)
    ext = path.suffix.lower().lstrip(".")
    if ext not in AUDIO_EXTENSIONS:
        return f"unsupported audio container {path.suffix!r} (shards hold {', '.join(AUDIO_EXTENSIONS)})"
    if not path.is_file():
        return "missing file" if not path.exists() else "not a file"
    try:
        cut = truncation(path)
        info = sf.info(str(path))
    except (RuntimeError, OSError, sf.LibsndfileError) as exc:
        return f"unreadable: {exc}"
    if cut is not None:
        return cut
    if info.frames == 0:
        return "zero-length audio"
    if mel is not None and not pad_short:
        samples = info.frames if info.samplerate == mel.sample_rate else -(-info.frames * mel.sample_rate
                                                                           // info.samplerate)
        if samples < mel_min_samples(mel):
            return f"too short for the mel front-end ({samples} samples at {mel.sample_rate} Hz)"
    return None


def apply_sources(sources: dict[str, ArraySource], inputs: dict[str, Any], text_counts: list[int]) -> dict[str, list[np.ndarray]]:
    """Each source's array per item: ``inputs`` holds the source inputs (``"mel"`` / ``"wav"``
    segments of the items, ``"text"`` their caption rows, flat; ``text_counts`` rows per item).
    A segment source gives an item one row, a text source the rows of its captions."""
    out: dict[str, list[np.ndarray]] = {}
    for name, source in sources.items():
        x = inputs.get(source.inputs)
        if x is None:
            raise ValueError(f"array source {name!r} reads {source.inputs!r}, which these items lack (segment "
                             "arrays need a training segment)")
        with torch.no_grad():
            values = source.fn(x)
        if values.shape[0] != len(x):
            what = "captions" if source.inputs == "text" else "clips"
            raise ValueError(f"array source {name!r} returned {values.shape[0]} rows for {len(x)} {what}")
        array = values.detach().float().cpu().numpy()
        if source.inputs == "text":
            out[name] = np.split(array, np.cumsum(text_counts)[:-1])
        else:
            out[name] = list(array)
    return out


def _source_rows(sources: dict[str, ArraySource], pending: list[tuple[ManifestItem, Any, Any]],
                 texts: list[list[str]], mel: MelConfig | None, segment_frames: int | None) -> dict[str, list[np.ndarray]]:
    """Each source's array of every pending item (`apply_sources` of their segments and ``texts``)."""
    inputs: dict[str, Any] = {"text": [t for rows in texts for t in rows]}
    if any(s.inputs != "text" for s in sources.values()):
        cropped = [crop_segment(wav, m, mel, segment_frames, 0, False) for _, wav, m in pending]  # type: ignore[arg-type]
        inputs["wav"] = torch.stack([c[1] for c in cropped])
        inputs["mel"] = torch.stack([c[2] for c in cropped])
    return apply_sources(sources, inputs, [len(rows) for rows in texts])


def prepare_out(out: Path, force: bool, out_option: str = "--out", force_option: str = "--force") -> None:
    """Make ``out`` ready for shards: created, or empty of shards (with ``force``); other files refused."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out_option} {out} exists and is not a folder")
    if not out.exists():
        out.mkdir(parents=True)
        return
    ours = [p for p in out.iterdir() if p.name == INDEX_NAME or (p.name.startswith("shard-") and p.suffix == ".tar")]
    others = [p.name for p in out.iterdir() if p not in ours and not p.name.startswith(".")]
    if others:
        raise UsageError(f"{out_option} {out} holds other files ({others[:3]}); give an empty or new folder")
    if ours and not force:
        raise UsageError(f"{out_option} {out} already holds shards; pass {force_option} to replace them")
    for p in ours:
        p.unlink()


class _Writer:
    """Appends items to numbered shards of ``shard_size`` items (temporary file + rename each)."""

    def __init__(self, out: Path, shard_size: int) -> None:
        self.out, self.shard_size = out, shard_size
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._ctx: Any = None
        self._count = 0
        self.written = 0

    def add(self, members: list[tuple[str, bytes]]) -> None:
        if self._tar is None:
            self._ctx = atomic_path(self.out / shard_name(len(self.shards)))
            tmp = self._ctx.__enter__()
            self._tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in close())
        for name, data in members:
            tar_member(self._tar, name, data)
        self._count += 1
        self.written += 1
        if self._count == self.shard_size:
            self.close()

    def close(self, failed: BaseException | None = None) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = shard_name(len(self.shards))
        if failed is not None:
            self._ctx.__exit__(type(failed), failed, failed.__traceback__)
        else:
            self._ctx.__exit__(None, None, None)
            self.shards.append({"name": name, "items": self._count, "sha256": file_sha256(self.out / name)})
            log.info("wrote %s (%d items)", self.out / name, self._count)
        self._tar, self._ctx, self._count = None, None, 0


def write_shards(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shard_size: int = 1000,
    split: str | None = None,
    mel: MelConfig | None = None,
    store_mel: bool = False,
    sources: dict[str, ArraySource] | None = None,
    segment_frames: int | None = None,
    pad_short_clips: bool = False,
    strict: bool = False,
    force: bool = False,
    batch_size: int = 16,
) -> ShardIndex:
    """Shard the items of ``split`` (None: all) of ``manifest`` into ``out``; see the module doc.

    ``mel`` is the front-end of the cached arrays and of the too-short check (required with
    ``store_mel`` or segment ``sources``); ``segment_frames`` is the fixed training segment of the
    segment (``"mel"`` / ``"wav"``) ``sources``. Returns the written index."""
    manifest, out = Path(manifest), Path(out)
    sources = dict(sources or {})
    bad = {name: s.inputs for name, s in sources.items() if s.inputs not in ("mel", "wav", "text")}
    if bad:
        raise ValueError(f"array sources {bad}: inputs must be 'mel', 'wav' or 'text'")
    segment_sources = sorted(name for name, s in sources.items() if s.inputs != "text")
    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    if (store_mel or segment_sources) and mel is None:
        raise UsageError("cached arrays need the mel front-end (--mel)")
    if segment_sources and segment_frames is None:
        raise UsageError(f"cached model outputs {segment_sources} are computed on a fixed training segment: "
                         "give --segment-seconds")
    clash = {"mel"} & set(sources)
    if clash:
        raise UsageError(f"array name {sorted(clash)} is reserved for the cached log-mel")
    items = select_split(read_manifest(manifest), split, manifest)
    prepare_out(out, force)
    frontend = MelFrontend.from_config(mel) if mel is not None else None
    minimum = mel_min_samples(mel) if mel is not None else 0
    skipped: list[dict[str, str]] = []
    writer = _Writer(out, shard_size)
    pending: list[tuple[ManifestItem, torch.Tensor | None, torch.Tensor | None]] = []

    def flush() -> None:
        objs = [item.to_json(manifest.parent.absolute()) for item, _, _ in pending]
        rows = _source_rows(sources, pending, [caption_rows(item_captions(obj)) for obj in objs], mel,
                            segment_frames) if pending else {}
        for i, ((item, _, m), obj) in enumerate(zip(pending, objs, strict=True)):
            key = f"{writer.written:09d}"
            members = [(f"{key}.json", json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8")),
                       (f"{key}.{Path(item.audio).suffix.lower().lstrip('.')}", Path(item.audio).read_bytes())]
            if store_mel:
                members.append((f"{key}.mel.npy", npy_bytes(m.numpy())))  # type: ignore[union-attr]
            members += [(f"{key}.{name}.npy", npy_bytes(rows[name][i])) for name in sorted(rows)]
            writer.add(members)
        pending.clear()

    try:
        for item in items:
            reason = _problem(item, mel, pad_short_clips)
            wav = mel_spec = None
            if reason is None and frontend is not None and (store_mel or segment_sources):
                try:
                    wav = whole_clip(load_audio(item.audio, target_sr=mel.sample_rate)[0], mel, minimum,  # type: ignore[union-attr]
                                     pad_short_clips, str(item.audio))
                    with torch.no_grad():
                        mel_spec = frontend(wav)[0]
                except AudioLoadError as exc:
                    reason = exc.reason
            if reason is not None:
                log.warning("clip %s (%s) left out: %s", item.id, item.audio, reason)
                skipped.append({"id": item.id, "reason": reason})
                continue
            pending.append((item, wav, mel_spec))
            if len(pending) >= batch_size:
                flush()
        flush()
    except BaseException as exc:
        writer.close(failed=exc)
        raise
    writer.close()
    if strict and skipped:
        for p in out.glob("shard-*.tar"):
            p.unlink()
        raise ShardError(f"--strict: {len(skipped)} of {len(items)} clips of {manifest} are unusable "
                         f"(first: {', '.join(s['id'] for s in skipped[:5])}); no shards written")
    if not writer.shards:
        raise ShardError(f"no usable clip in {manifest} (split {split!r}); {len(skipped)} left out")
    arrays = sorted((["mel"] if store_mel else []) + list(sources))
    index = {
        "format": FORMAT, "version": VERSION, "split": split, "shard_size": shard_size,
        "manifest": {"name": manifest.name, "sha256": file_sha256(manifest), "items": len(items)},
        "items": writer.written, "shards": writer.shards, "arrays": arrays,
        "mel": mel.to_dict() if mel is not None and arrays else None,
        "segment_frames": segment_frames if segment_sources else None,
        "sources": {name: {**sources[name].meta, "inputs": sources[name].inputs} for name in sorted(sources)},
        "skipped": skipped,
    }  # fmt: skip
    with atomic_path(out / INDEX_NAME) as tmp:
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    if skipped:
        log.warning("%d of %d clips left out (listed under 'skipped' in %s)", len(skipped), len(items),
                    out / INDEX_NAME)
    log.info("%d items in %d shards under %s", writer.written, len(writer.shards), out)
    return ShardIndex.load(out)
