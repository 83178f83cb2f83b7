"""CLAP under DDP (2 gloo processes on CPU) equals one process on the global batch.

Training: each rank embeds its half of the batch, `CLAPModule.contrastive_loss` gathers every
rank's embeddings with Lightning's DDP ``all_gather(sync_grads=True)`` (the strategy `tta fit`
uses), and the loss, and the weight gradients after DDP's averaging (all-reduce sum / world size),
must equal the loss and gradients of the whole batch in one process. Without gradients through
the other ranks' copies (the classic ``all_gather`` bug) every rank would give 1/world of the
gradient of its own embeddings and the logit scale would be off by the same factor.

Evaluation: the retrieval and zero-shot metrics over the records of both ranks (rank 1 holds a
padding copy of a rank-0 clip, as the sampler pads) equal the metrics of the split in one process.

The modules run in eval mode: dropout off and HTSAT's BatchNorm on its running statistics
(BatchNorm in training mode normalises per rank, which no loss gather can change).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.hf_fixtures import CORPUS, make_bert_folder
from tta.encoders.clap.module import CLAPModule
from tta.encoders.clap.network import CLAP
from tta.encoders.htsat import HTSAT
from tta.encoders.text import BertTextEncoder

WORLD, PER_RANK = 2, 3
LABELS = [["dog"], ["car"], ["rain"], ["dog", "rain"], ["bell"], ["car"]]


def _module(bert: Path) -> CLAPModule:
    torch.manual_seed(0)
    audio = HTSAT(dim=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, spec_frames=64,
                  freq_ratio=4, drop_path=0.0, window_seconds=1.0, mel_preset="demo")
    text = BertTextEncoder(bert, max_length=16, trainable=True)
    module = CLAPModule(CLAP(audio, text, joint_dim=16, temperature=0.07, dropout=0.0), mel="demo")
    module.eval()
    module.log_dict = lambda *args, **kwargs: None  # metrics are compared, not logged
    return module


def _batch(indices: list[int]) -> dict[str, Any]:
    """Clips ``indices`` of a fixed set of 6: 1 s at 22.05 kHz, a tone of its own over noise; two
    captions each, no caption shared by two of the evaluated clips 0-4 (a shared caption would tie
    in the rankings, and ties break by position, which differs between the gathered and the
    one-process order)."""
    t = torch.arange(22050) / 22050
    noise = torch.randn(6, 22050, generator=torch.Generator().manual_seed(1)) * 0.05
    wav = torch.stack([0.3 * torch.sin(2 * torch.pi * (220 + 310 * i) * t) for i in range(6)]) + noise
    return {"id": [f"clip{i}" for i in indices], "wav": wav[indices],
            "caption": [CORPUS[i] for i in indices],
            "captions": [[CORPUS[i], CORPUS[(i + 5) % len(CORPUS)]] for i in indices],
            "labels": [LABELS[i] for i in indices]}


# what each rank holds: training halves of the global batch; evaluation as the padding sampler
# deals 5 clips to 2 ranks (rank 1's last clip repeats clip 0)
TRAIN_SHARDS = [list(range(r * PER_RANK, (r + 1) * PER_RANK)) for r in range(WORLD)]
EVAL_SHARDS = [[0, 2, 4], [1, 3, 0]]


class _DDPTrainer:
    """The two things `CLAPModule` asks its trainer for: world size and the strategy's all_gather."""

    def __init__(self, world: int) -> None:
        from lightning.pytorch.strategies import DDPStrategy

        self.world_size = world
        self.strategy = DDPStrategy()


def _train_and_evaluate(module: CLAPModule, train: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    loss, global_batch = module.contrastive_loss(train)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.clap.named_parameters() if p.requires_grad}
    if dist.is_initialized():  # what DDP does to every gradient bucket: sum over ranks / world size
        for g in grads.values():
            dist.all_reduce(g)
            g /= dist.get_world_size()
    with torch.no_grad():
        module.test_step(evaluation, 0)
        metrics = module._finish("test")
    return {"loss": loss.detach(), "global_batch": global_batch, "grads": grads, "metrics": metrics}


def _rank(rank: int, world: int, init: str, out: str, bert: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        module = _module(Path(bert))
        module.trainer = _DDPTrainer(world)
        result = _train_and_evaluate(module, _batch(TRAIN_SHARDS[rank]), _batch(EVAL_SHARDS[rank]))
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("clap_ddp")
    bert = make_bert_folder(tmp / "bert")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _train_and_evaluate(_module(bert), _batch(list(range(WORLD * PER_RANK))), _batch([0, 1, 2, 3, 4]))
    finally:
        torch.set_num_threads(threads)
    # fork: the ranks inherit the imported modules (a spawned rank would import torch + tta again)
    mp.start_processes(_rank, args=(WORLD, f"file://{tmp / 'rendezvous'}", str(tmp), str(bert)), nprocs=WORLD,
                       join=True, start_method="fork")
    return single, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_gathered_loss_and_gradients_equal_one_process(results) -> None:
    single, ranks = results
    assert single["global_batch"] == WORLD * PER_RANK
    for r, res in enumerate(ranks):
        assert res["global_batch"] == WORLD * PER_RANK, r
        torch.testing.assert_close(res["loss"], single["loss"], rtol=0, atol=1e-6)
        assert res["grads"].keys() == single["grads"].keys()
        for name, g in single["grads"].items():
            # float32 sums in another order: measured max differences up to 2e-6 of the tensor's largest
            # gradient (one element at 1.1e-6 relative to itself); the 1e-8 floor is for gradients that
            # are zero in exact arithmetic (attention key biases: ~1e-11 of rounding noise)
            scale, err = g.abs().max().item(), (res["grads"][name] - g).abs().max().item()
            assert err <= 1e-5 * scale + 1e-8, f"rank {r}, {name}: max difference {err:.3g}, max |gradient| {scale:.3g}"
    # a real comparison: the loss moves the temperature and both projections
    for name in ("logit_scale", "audio_projection.linear1.weight", "text_projection.linear1.weight"):
        assert single["grads"][name].abs().max() > 1e-4, name


def test_gathered_metrics_equal_one_process(results) -> None:
    single, ranks = results
    metrics = single["metrics"]
    assert metrics["n_clips"] == 5 and metrics["n_captions"] == 10  # the padding copy counts once
    assert {"t2a_R@1", "a2t_R@1", "t2a_mAP@10", "zero_shot_acc", "zero_shot_mAP", "loss"} <= metrics.keys()
    for res in ranks:
        assert res["metrics"].keys() == metrics.keys()
        for key, value in metrics.items():
            assert res["metrics"][key] == pytest.approx(value, abs=1e-6), key
