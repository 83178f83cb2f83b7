"""Cross-modal retrieval and zero-shot classification metrics (MS-CLAP evaluation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def retrieval_metrics(sim: torch.Tensor, positives: Sequence[set[int]], ks: Sequence[int] = (1, 10),
                      map_k: int = 10) -> dict[str, float]:
    """Recall@k and mAP@``map_k`` of a query x candidate similarity matrix.

    ``positives[q]`` holds the candidate indices relevant to query ``q`` (several captions may
    describe one clip). R@k is the fraction of queries with a relevant candidate in the top k;
    AP@k averages precision at each relevant rank within the top k, divided by
    ``min(k, #relevant)``.
    """
    if sim.dim() != 2 or sim.shape[0] != len(positives):
        raise ValueError(f"retrieval_metrics: sim {tuple(sim.shape)} does not match {len(positives)} queries")
    if any(not p for p in positives):
        raise ValueError("retrieval_metrics: every query needs at least one relevant candidate")
    k_max = min(max(max(ks), map_k), sim.shape[1])
    top = sim.topk(k_max, dim=1).indices.tolist()
    out: dict[str, float] = {}
    for k in ks:
        out[f"R@{k}"] = sum(bool(set(row[:k]) & pos) for row, pos in zip(top, positives)) / len(positives)
    aps = []
    for row, pos in zip(top, positives):
        hits, precisions = 0, []
        for rank, idx in enumerate(row[:map_k], start=1):
            if idx in pos:
                hits += 1
                precisions.append(hits / rank)
        aps.append(sum(precisions) / min(map_k, len(pos)))
    out[f"mAP@{map_k}"] = sum(aps) / len(aps)
    return out


def zero_shot_accuracy(audio: torch.Tensor, class_text: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy of single-label zero-shot classification (softmax over class prompts).

    ``audio`` (N, D) and ``class_text`` (C, D) are normalised embeddings; ``targets`` (N,) class
    indices.
    """
    if targets.numel() == 0:
        raise ValueError("zero_shot_accuracy: no clips")
    pred = (audio @ class_text.T).argmax(dim=1)
    return float((pred == targets).float().mean())


def zero_shot_multilabel_map(audio: torch.Tensor, class_text: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean average precision of multi-label zero-shot scores (sigmoid of similarities).

    ``targets`` (N, C) is a 0/1 matrix; classes with no positive clip are left out.
    """
    scores = torch.sigmoid(audio @ class_text.T)
    aps = []
    for c in range(targets.shape[1]):
        t = targets[:, c].bool()
        if not t.any():
            continue
        order = scores[:, c].argsort(descending=True)
        hits = t[order].float()
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        aps.append(float((precision * hits).sum() / hits.sum()))
    if not aps:
        raise ValueError("zero_shot_multilabel_map: no class has a positive clip")
    return sum(aps) / len(aps)


def caption_retrieval_metrics(audio: torch.Tensor, captions: torch.Tensor, owners: Sequence[int],
                              ks: Sequence[int] = (1, 10), map_k: int = 10) -> dict[str, float]:
    """Text->audio and audio->text retrieval with every caption of every clip (the AudioCaps /
    Clotho protocol: 5 captions a test clip).

    ``audio`` (N, D) and ``captions`` (M, D) are normalised embeddings; ``owners[m]`` is the clip
    of caption ``m``. Text->audio queries every caption against the N clips (one relevant clip);
    audio->text queries every clip against the M captions, all of its own captions relevant.
    Keys: ``t2a_R@k``, ``t2a_mAP@k``, ``a2t_R@k``, ``a2t_mAP@k``.
    """
    n, m = audio.shape[0], captions.shape[0]
    if len(owners) != m:
        raise ValueError(f"caption_retrieval_metrics: {len(owners)} owners for {m} captions")
    if any(not 0 <= o < n for o in owners):
        raise ValueError(f"caption_retrieval_metrics: an owner index is outside the {n} clips")
    own: list[set[int]] = [set() for _ in range(n)]
    for c, o in enumerate(owners):
        own[o].add(c)
    sim = audio @ captions.T
    out = {f"t2a_{k}": v for k, v in retrieval_metrics(sim.T, [{o} for o in owners], ks, map_k).items()}
    out.update({f"a2t_{k}": v for k, v in retrieval_metrics(sim, own, ks, map_k).items()})
    return out
