"""No evaluation audio in Re-AudioLDM training: a datastore of the training split serves
validation (retrieval by caption, never a table row), and `tta fit` refuses a datastore that
holds any non-training clip of its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.hf_fixtures import make_bert_folder
from tests.ldm_fixtures import (
    CLAP_DIM,
    CTX_DIM,
    build,
    make_store_and_table,
    tiny_clap_config,
    tiny_unet_config,
    tiny_vae_config,
)
from tta.data.manifest import ManifestItem, read_manifest, write_manifest
from tta.retrieval.leakage import DatastoreLeakError, check_datastore


def test_check_datastore_names_every_leaking_split(tmp_path: Path) -> None:
    items = [ManifestItem(id=f"{split}{i}", audio=tmp_path / f"{split}{i}.wav", split=split)
             for split in ("train", "val", "test", "heldout") for i in range(3)]
    manifest = tmp_path / "m.jsonl"
    write_manifest(items, manifest)
    assert check_datastore(["train0", "train2", "elsewhere"], manifest, "train", "store/") == 2
    with pytest.raises(DatastoreLeakError) as err:
        check_datastore(["train0", "val1", "test0", "test2", "heldout1"], manifest, "train", "store/")
    message = str(err.value)
    for part in ("store/", "1 of split 'heldout'", "2 of split 'test' (e.g. 'test0', 'test2')", "1 of split 'val'",
                 "tta index build --splits train", str(manifest)):
        assert part in message


def _datastore(manifest: Path, out: Path, splits: set[str]) -> tuple[Path, Path, list[str]]:
    """Feature store + neighbour table + flat index over the clips of ``splits``."""
    from tta.retrieval.index import IndexSpec, build_index

    ids = [i.id for i in read_manifest(manifest) if i.split in splits]
    features, index = make_store_and_table(ids, out, k=3)
    vectors = torch.nn.functional.normalize(torch.randn(len(ids), CLAP_DIM, generator=torch.Generator().manual_seed(1)),
                                            dim=-1).numpy()
    build_index(np.ascontiguousarray(vectors), ids, IndexSpec(type="flat")).save(index)
    return features, index, ids


def _fit(manifest: Path, features: Path, index: Path, root: Path) -> tuple[Any, list[list[str]]]:
    """One training step and one validation batch of a tiny Re-AudioLDM; the neighbours each
    validation batch used."""
    import lightning as L

    from tta.data.datamodule import AudioDataModule
    from tta.generators.ldm.module import LatentDiffusionModule
    from tta.generators.ldm.retrieval import RetrievalConditioner

    torch.manual_seed(0)
    module = LatentDiffusionModule(
        unet=build(tiny_unet_config(True)), vae=build(tiny_vae_config()), scale_factor=1.0,
        clap=build(tiny_clap_config(make_bert_folder(root / "bert"))), mel="demo",
        retrieval=RetrievalConditioner(str(features), str(index), k=2, context_dim=CTX_DIM),
    )
    used: list[list[str]] = []
    neighbours = module._neighbours

    def record(ids: list[str], captions: list[str]) -> Any:
        out = neighbours(ids, captions)
        if not module.training:
            used.extend(out)
        return out

    module._neighbours = record  # type: ignore[method-assign]
    dm = AudioDataModule(manifest=str(manifest), mel="demo", segment_seconds=0.75, batch_size=4)
    trainer = L.Trainer(max_steps=1, limit_val_batches=1, val_check_interval=1, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, datamodule=dm)
    return trainer, used


def test_training_split_datastore_serves_validation(tiny_synth: Path, tmp_path: Path, single_thread: None) -> None:
    features, index, train_ids = _datastore(tiny_synth, tmp_path, {"train"})
    trainer, used = _fit(tiny_synth, features, index, tmp_path)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    val_ids = {i.id for i in read_manifest(tiny_synth) if i.split == "val"}
    assert used and all(len(row) == 2 for row in used)
    assert {n for row in used for n in row} <= set(train_ids)  # validation retrieves training clips only
    assert not {n for row in used for n in row} & val_ids


def test_fit_refuses_a_datastore_with_evaluation_clips(tiny_synth: Path, tmp_path: Path) -> None:
    features, index, _ = _datastore(tiny_synth, tmp_path, {"train", "val", "test"})
    with pytest.raises(DatastoreLeakError, match=r"of split 'test'.*of split 'val'.*--splits train"):
        _fit(tiny_synth, features, index, tmp_path)
