"""CLAP loss and retrieval / zero-shot metrics on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from tta.encoders.clap.network import clip_loss
from tta.metrics.retrieval import (
    retrieval_metrics,
    zero_shot_accuracy,
    zero_shot_multilabel_map,
)


def test_clip_loss_matches_hand_computation_2x2() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    scale = torch.tensor(math.log(2.0))  # exp(scale) = 2
    # logits = 2 * a @ t.T = [[1.2, 0.0], [1.6, 2.0]]
    def ce(row: list[float], target: int) -> float:
        return -row[target] + math.log(sum(math.exp(x) for x in row))
    rows = [[1.2, 0.0], [1.6, 2.0]]
    cols = [[1.2, 1.6], [0.0, 2.0]]
    expected = 0.5 * ((ce(rows[0], 0) + ce(rows[1], 1)) / 2 + (ce(cols[0], 0) + ce(cols[1], 1)) / 2)
    assert float(clip_loss(a, t, scale)) == pytest.approx(expected, rel=1e-6)


def test_clip_loss_prefers_matching_pairs_and_checks_shapes() -> None:
    e = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    scale = torch.tensor(math.log(1 / 0.07))
    assert clip_loss(e, e, scale) < clip_loss(e, e.roll(1, 0), scale)
    with pytest.raises(ValueError, match="differ"):
        clip_loss(e, e[:4], scale)


def test_retrieval_metrics_exact_values() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.0],   # query 0: relevant 0 at rank 1
                        [0.8, 0.1, 0.7],   # query 1: relevant 1 at rank 3
                        [0.1, 0.2, 0.3]])  # query 2: relevant {0, 2} at ranks 3 and 1
    out = retrieval_metrics(sim, [{0}, {1}, {0, 2}], ks=(1, 2), map_k=3)
    assert out["R@1"] == pytest.approx(2 / 3)
    assert out["R@2"] == pytest.approx(2 / 3)
    ap = [1.0, 1 / 3, (1.0 + 2 / 3) / 2]
    assert out["mAP@3"] == pytest.approx(sum(ap) / 3)
    with pytest.raises(ValueError, match="at least one relevant"):
        retrieval_metrics(sim, [{0}, set(), {1}])


def test_zero_shot_metrics() -> None:
    classes = torch.eye(3)
    audio = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.9], [0.1, 0.8, 0.3]])
    assert zero_shot_accuracy(audio, classes, torch.tensor([0, 2, 2])) == pytest.approx(2 / 3)
    targets = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 1, 1]])
    # class 0: AP 1; class 1: clip 2 ranked first -> 1; class 2: clips 1 (0.9), 2 (0.3) ranked 1, 2 -> 1
    assert zero_shot_multilabel_map(audio, classes, targets) == pytest.approx(1.0)


def test_caption_retrieval_uses_every_caption() -> None:
    from tta.metrics.retrieval import caption_retrieval_metrics

    audio = torch.eye(3)  # clip i points along axis i
    # clip 0 owns captions 0 (its axis) and 1 (clip 1's axis); clip 1 owns caption 2 (clip 2's
    # axis); clip 2 owns caption 3 (mostly its axis); no ties anywhere
    captions = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0.2, 0.9]])
    out = caption_retrieval_metrics(audio, captions, owners=[0, 0, 1, 2], ks=(1, 2), map_k=2)
    # t2a: captions 0 and 3 find their clip first, captions 1 and 2 another clip
    assert out["t2a_R@1"] == pytest.approx(2 / 4)
    # a2t top-2: clip 0 -> (0, *) hit; clip 1 -> (1, 3), its caption 2 absent; clip 2 -> (2, 3): hit at 2
    assert out["a2t_R@1"] == pytest.approx(1 / 3)
    assert out["a2t_R@2"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="3 owners for 4 captions"):
        caption_retrieval_metrics(audio, captions, owners=[0, 1, 2])
    with pytest.raises(ValueError, match="outside the 3 clips"):
        caption_retrieval_metrics(audio, captions, owners=[0, 1, 2, 5])
