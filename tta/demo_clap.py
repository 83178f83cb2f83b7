"""The CLAP stage of ``tta demo``: train the CPU-sized CLAP of ``configs/demo/clap.yaml`` on the
synthetic dataset, then report zero-shot accuracy on the held-out classes, text->audio retrieval
on the test split and three example retrievals from a FAISS index of the training clips (the
retrieval datastore of Re-AudioLDM)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tta.data.manifest import read_manifest
from tta.encoders.clap.module import label_prompt
from tta.metrics.retrieval import retrieval_metrics, zero_shot_accuracy
from tta.retrieval.embed import embed_items

log = logging.getLogger(__name__)


def instantiate_config(config: Path, root: Path, steps: int | None, data_dir: Path | None,
                       extra: list[str] | tuple[str, ...] = ()) -> tuple[Any, Any, Any]:
    """(module, datamodule, trainer) of a demo config through the `tta fit` code path
    (``extra``: further ``--key=value`` overrides)."""
    from tta.cli import build_cli

    argv = ["--config", str(config), f"--trainer.default_root_dir={root}", "--trainer.enable_model_summary=false",
            *extra]
    if steps is not None:
        argv.append(f"--trainer.max_steps={steps}")
    if data_dir is not None:
        argv.append(f"--data.init_args.data_dir={data_dir}")
    cli = build_cli(argv, run=False)
    return cli.model, cli.datamodule, cli.trainer


def run_clap_stage(out: Path, config: Path, steps: int | None = None, data_dir: Path | None = None,
                   n_examples: int = 3) -> dict[str, Any]:
    """Train the demo CLAP, build its index under ``out/index`` and return the report section."""
    from tta.retrieval.compat import clap_content_hashes
    from tta.retrieval.index import IndexSpec, build_index
    from tta.retrieval.neighbours import build_neighbour_table, save_neighbour_table

    module, datamodule, trainer = instantiate_config(config, out / "train_clap", steps, data_dir)
    log.info("training the demo CLAP for %s steps", trainer.max_steps)
    t0 = time.time()
    trainer.fit(module, datamodule=datamodule)
    train_seconds = time.time() - t0
    checkpoint = out / "train_clap" / "clap_final.ckpt"
    trainer.save_checkpoint(checkpoint)  # with the run config: later stages rebuild the CLAP from it
    module.eval()
    items = read_manifest(datamodule.manifest_path())
    clap = module.clap
    store = embed_items(clap, items)
    by_id = {i.id: i for i in items}

    # text -> audio retrieval on the test split (each caption's own clip is the positive)
    test = [k for k, i in enumerate(store.ids) if by_id[i].split == "test"]
    sim = torch.from_numpy(store.text[test] @ store.audio[test].T)
    t2a = retrieval_metrics(sim, [{j} for j in range(len(test))])

    # zero-shot on the held-out split: single-event clips of classes never seen in training
    classes = sorted({c for i in items for c in i.labels})
    with torch.no_grad():
        class_text = clap.embed_text([label_prompt(c, module.zero_shot_template) for c in classes]).float()
    held = [k for k, i in enumerate(store.ids) if by_id[i].split == "heldout" and len(by_id[i].labels) == 1]
    zero_shot = None
    if held:
        targets = torch.tensor([classes.index(by_id[store.ids[k]].labels[0]) for k in held])
        zero_shot = zero_shot_accuracy(torch.from_numpy(store.audio[held]), class_text, targets)

    # the retrieval datastore is the training split only: Re-AudioLDM never sees validation, test or
    # held-out audio as a neighbour, in training (the table) or at test time (the index)
    train = [k for k, i in enumerate(store.ids) if by_id[i].split == "train"]
    train_ids = [store.ids[k] for k in train]
    index = build_index(store.audio[train], train_ids, IndexSpec(type="flat"),
                        meta={"embedding_model": "demo CLAP", "embedding_checkpoint": str(checkpoint),
                              "embedding_content": clap_content_hashes(clap), "dim": int(store.audio.shape[1])})
    index.save(out / "index")
    # neighbour table (text query -> audio neighbours, the clip itself excluded) of every training clip
    save_neighbour_table(build_neighbour_table(index, store.text[train], train_ids, k=min(10, len(train) - 1)),
                         out / "index")
    queries = [store.captions[k] for k in test[:n_examples]]
    with torch.no_grad():
        qv = clap.embed_text(queries).float().numpy()
    hit_ids, scores = index.search(np.ascontiguousarray(qv, dtype=np.float32), k=3)
    examples = [
        {"query": q, "results": [{"id": i, "caption": by_id[i].captions[0] if by_id[i].captions else "",
                                  "score": round(float(s), 4)} for i, s in zip(ids, row)]}
        for q, ids, row in zip(queries, hit_ids, scores)
    ]
    return {
        "training": {"steps": int(module.batches_trained), "seconds": round(train_seconds, 1)},
        "zero_shot_heldout_accuracy": zero_shot,
        "zero_shot_heldout_clips": len(held),
        "zero_shot_chance": 1.0 / len(classes),
        "text_to_audio_test": {"R@1": t2a["R@1"], "R@10": t2a["R@10"], "clips": len(test)},
        "example_retrievals": examples,
        "index_dir": str(out / "index"),
        "checkpoint": str(checkpoint),
    }
