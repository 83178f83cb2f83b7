"""`ShardCacheExtractor` (module ``shard_cache``): frozen-model arrays added to shards by ``tta predict``.

The distributed counterpart of `tta data shard --with latent,clap,clap_audio,t5`: with the
``shard_chunks`` datamodule (`tta.data.shards_extend`) each rank reads whole shards of an existing
shard folder, runs the frozen models on them (on its device: the sources' networks are this
module's submodules), and `ShardCacheWriter` writes the shards with the new arrays into
``out_dir``, one at a time, as their chunks arrive. At the end every rank lists what it wrote in
a part file, and rank 0, after a barrier, writes ``out_dir/index.json`` (`finish_index`). The
result is the shard folder ``tta data shard --with`` of the same arrays writes, so training reads
it unchanged (``shards`` datamodule, ``use_cached``), and `tta fit` checks its producers as usual.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn

from tta.data.mel import MelConfig
from tta.data.shards_extend import ShardExtender, finish_index
from tta.data.shards_sources import MODEL_ARRAYS, array_sources
from tta.data.shards_write import ArraySource, apply_sources, prepare_out
from tta.registry import register
from tta.utils.errors import UsageError

__all__ = ["ShardCacheExtractor", "ShardCacheWriter"]

log = logging.getLogger(__name__)

_OPTION = {"with": "model.init_args.arrays", "segment_seconds": "data.init_args.segment_seconds"}


def _part_path(out: Path, rank: int) -> Path:
    return out / f".shard-cache-rank{rank}.json"


class ShardCacheWriter(BasePredictionWriter):
    """Writes each batch's arrays into its shard's `ShardExtender`; merges the index at the end."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self._open: dict[int, ShardExtender] = {}
        self._written: list[dict[str, Any]] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: ShardCacheExtractor) -> None:
        trainer.predict_loop.return_predictions = False  # the arrays go to disk, not into memory
        out = Path(pl_module.out_dir)
        if trainer.is_global_zero:
            prepare_out(out, pl_module.overwrite, "model.init_args.out_dir", "model.init_args.overwrite=true")
            for stale in out.glob(".shard-cache-rank*.json"):
                stale.unlink()
        trainer.strategy.barrier("shard_cache_out")
        self._open, self._written = {}, []

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: ShardCacheExtractor, prediction: Any,
                           batch_indices: Any, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        index = pl_module.index
        shard = int(batch["shard"])
        extender = self._open.get(shard)
        if extender is None:
            extender = self._open[shard] = ShardExtender(index.path(shard), Path(pl_module.out_dir) / index.shards[shard].name,
                                                         sorted(prediction))
        extender.add(int(batch["start"]), list(batch["keys"]), prediction)
        if extender.next == len(extender):
            self._written.append(extender.close())
            del self._open[shard]
            log.info("rank %d wrote %s (%d items)", trainer.global_rank, self._written[-1]["name"], len(extender))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: ShardCacheExtractor) -> None:
        if self._open:
            raise RuntimeError(f"rank {trainer.global_rank}: shards {sorted(self._open)} received only part of "
                               "their items")
        out = Path(pl_module.out_dir)
        part = {"rank": trainer.global_rank, "shards": self._written}
        _part_path(out, trainer.global_rank).write_text(json.dumps(part), encoding="utf-8")
        trainer.strategy.barrier("shard_cache_parts")
        if trainer.is_global_zero:
            parts = [json.loads(_part_path(out, r).read_text(encoding="utf-8")) for r in range(trainer.world_size)]
            written = [s for p in parts for s in p["shards"]]
            dm = trainer.datamodule
            index = finish_index(pl_module.index, out, written, pl_module.source_meta(), dm.mel_config,
                                 dm.segment_frames)
            for r in range(trainer.world_size):
                _part_path(out, r).unlink()
            log.info("%d items in %d shards with arrays %s under %s (%d ranks: %s)", index.total, len(index.shards),
                     sorted(pl_module.sources), out, trainer.world_size,
                     "; ".join(f"rank {p['rank']}: {len(p['shards'])} shards" for p in parts))
        trainer.strategy.barrier("shard_cache_done")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        for extender in self._open.values():  # no half-written shard is left behind
            extender.abort()
        self._open = {}


@register("module", "shard_cache")
class ShardCacheExtractor(L.LightningModule):
    """Predict-only: adds the ``arrays`` of frozen models to the shards of the ``shard_chunks``
    datamodule's ``root``, writing a complete shard folder to ``out_dir`` (see the module doc).

    Args:
        out_dir: the output shard folder (new or empty; with ``overwrite`` a shard folder is replaced).
        arrays: any of ``latent`` (needs ``vae`` and the datamodule's ``segment_seconds``), ``clap``
            (needs ``clap``), ``clap_audio`` (``clap`` and ``segment_seconds``), ``t5`` (needs ``t5``).
        vae: a ``vae`` checkpoint; clap: the model's CLAP (checkpoint or LAION folder); t5: a local
            (Flan-)T5 folder; t5_length: its tokens per caption (default 50).
        overwrite: replace the shards already in ``out_dir``.
    """

    def __init__(self, out_dir: str, arrays: list[Literal["latent", "clap", "clap_audio", "t5"]], vae: str | None = None, clap: str | None = None,
                 t5: str | None = None, t5_length: int | None = None, overwrite: bool = False) -> None:
        super().__init__()
        unknown = sorted(set(arrays) - set(MODEL_ARRAYS))  # the CLI checks the names; a direct call too
        if unknown or not arrays:
            raise UsageError(f"{_OPTION['with']}: unknown arrays {unknown}; choose one or more of "
                             f"{', '.join(MODEL_ARRAYS)}" if unknown else f"{_OPTION['with']} is empty")
        self.out_dir, self.arrays, self.overwrite = str(out_dir), sorted(set(arrays)), bool(overwrite)
        self.paths = {"vae": vae, "clap": clap, "t5": t5, "t5_length": t5_length}
        self.sources: dict[str, ArraySource] = {}
        self.networks = nn.ModuleDict()  # the sources' frozen networks, moved to the device with this module
        self.index: Any = None

    def configure_callbacks(self) -> list[L.Callback]:
        return [ShardCacheWriter()]

    def setup(self, stage: str) -> None:
        if stage != "predict":
            raise UsageError(f"the shard_cache module only predicts (tta predict), not {stage}")
        dm = self.trainer.datamodule
        if not all(hasattr(dm, a) for a in ("index", "mel_config", "segment_frames")):
            raise UsageError(f"the shard_cache module reads the shard_chunks datamodule, got {type(dm).__name__}")
        self.index = dm.index
        if Path(self.out_dir).resolve() == self.index.root.resolve():
            raise UsageError(f"model.init_args.out_dir {self.out_dir} is the input shard folder: give a new folder")
        clash = sorted(set(self.arrays) & set(self.index.arrays))
        if clash:
            raise UsageError(f"the shards {self.index.root} already hold arrays {clash}")
        # text arrays use no mel front-end; the preset only fills the argument then
        mel = dm.mel_config if dm.mel_config is not None else MelConfig.preset("audioldm")
        self.sources = array_sources(self.arrays, mel, segment=dm.segment_frames is not None,
                                     flag=lambda n: _OPTION.get(n, f"model.init_args.{n}"), **self.paths)
        for name, source in self.sources.items():
            if source.module is not None and not any(source.module is m for m in self.networks.values()):
                self.networks[name] = source.module.eval().requires_grad_(False)

    def source_meta(self) -> dict[str, dict[str, Any]]:
        """What the index records of each new array: its producer's meta and inputs."""
        return {name: {**s.meta, "inputs": s.inputs} for name, s in self.sources.items()}

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, list]:
        """The new arrays of one chunk (name -> one array per item)."""
        inputs = {"text": list(batch["text"]), "mel": batch.get("mel"), "wav": batch.get("wav")}
        return apply_sources(self.sources, inputs, [int(c) for c in batch["text_counts"]])
