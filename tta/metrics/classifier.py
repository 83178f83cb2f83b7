"""Classifier-based metrics: paired KL divergence (AudioLDM; MMKL of the VQGAN paper) and IS.

All take classifier *logits* ``(B, C)`` of an AudioSet-style classifier (YAMNet, CNN14).

- **KL** is paired: the label distribution of the reference (target) clip ``p`` against that of
  the clip generated for it ``q``, ``KL(p || q)`` per pair, averaged over pairs. Pairs are matched
  by clip id; unmatched ids raise `IdMismatchError`. Variants:

  - ``softmax``: ``p = softmax(target)``, ``q = softmax(gen)``, ``sum_c p_c log(p_c / q_c)``;
  - ``sigmoid`` (AudioLDM's ``kl_sigmoid``; MMKL of "Diverse and Vivid Sound Generation" with its
    sigmoid multi-label classifier): ``p = sigmoid(target)``, ``q = sigmoid(gen)`` and the same
    sum over classes (the vectors are not normalised, as in audioldm_eval);
  - ``bernoulli``: the sum over classes of the KL between the per-class Bernoulli distributions.

  Logs are taken in closed form (``log_softmax``, ``logsigmoid``), so identical inputs give
  exactly 0 and no epsilon is needed.
- **IS** (Inception Score): ``exp(E_x KL(p(y|x) || p(y)))`` with ``p(y|x) = softmax(logits)``,
  the mean and standard deviation over ``splits`` consecutive splits (10 as in AudioLDM; fewer
  when there are fewer clips than splits).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from tta.metrics.pairing import IdMetric, PairedIdMetric
from tta.registry import register

__all__ = ["MMKL", "InceptionScore", "KLDivergence", "inception_score", "paired_kl"]

Variant = Literal["softmax", "sigmoid", "bernoulli"]
VARIANTS = ("softmax", "sigmoid", "bernoulli")


def paired_kl(
    target_logits: torch.Tensor, gen_logits: torch.Tensor, variant: Variant = "softmax"
) -> torch.Tensor:
    """``KL(p_target || q_gen)`` per row ``(N,)`` in float64 (see the module docstring)."""
    if target_logits.shape != gen_logits.shape or target_logits.dim() != 2:
        raise ValueError(
            f"paired_kl: logits must be two (N, C) tensors of one shape, got {tuple(target_logits.shape)} "
            f"and {tuple(gen_logits.shape)}"
        )
    t, g = target_logits.double(), gen_logits.double()
    if variant == "softmax":
        log_p, log_q = F.log_softmax(t, dim=1), F.log_softmax(g, dim=1)
        return (log_p.exp() * (log_p - log_q)).sum(dim=1)
    if variant == "sigmoid":
        log_p, log_q = F.logsigmoid(t), F.logsigmoid(g)
        return (log_p.exp() * (log_p - log_q)).sum(dim=1)
    if variant == "bernoulli":
        log_p, log_q = F.logsigmoid(t), F.logsigmoid(g)
        log_np, log_nq = F.logsigmoid(-t), F.logsigmoid(-g)
        return (log_p.exp() * (log_p - log_q) + log_np.exp() * (log_np - log_nq)).sum(
            dim=1
        )
    raise ValueError(
        f"paired_kl: unknown variant {variant!r}; variants: {', '.join(VARIANTS)}"
    )


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation of the Inception Score over ``splits`` consecutive splits."""
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(
            f"inception_score: logits must be a non-empty (N, C) tensor, got {tuple(logits.shape)}"
        )
    splits = max(1, min(int(splits), logits.shape[0]))
    log_p = F.log_softmax(logits.double(), dim=1)
    scores = []
    for chunk in torch.tensor_split(log_p, splits):
        log_marginal = torch.logsumexp(chunk, dim=0) - torch.log(
            torch.tensor(float(chunk.shape[0]), dtype=torch.float64)
        )
        kl = (chunk.exp() * (chunk - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))


@register("metric", "kl")
class KLDivergence(PairedIdMetric):
    """Paired KL between reference and generated label distributions (a `torchmetrics.Metric`).

    ``update(logits, ids, real)``: logits ``(B, C)`` of reference (``real=True``) or generated
    clips; ids pair them (any order, any batch, any rank). ``compute()`` is the mean over pairs;
    `per_item` returns ``(ids, values)``. Ids repeated by DDP padding count once.
    """

    higher_is_better = False
    is_differentiable = False

    def __init__(self, variant: Variant = "softmax", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if variant not in VARIANTS:
            raise ValueError(
                f"KLDivergence: unknown variant {variant!r}; variants: {', '.join(VARIANTS)}"
            )
        self.variant = variant
        for side in ("gen", "ref"):
            self.add_state(f"{side}_logits", default=[], dist_reduce_fx="cat")
            self.add_state(f"{side}_ids", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, ids: list[str], real: bool = False) -> None:
        if ids is None:
            raise ValueError(
                f"{type(self).__name__}.update: ids are required to pair generated and reference clips"
            )
        if logits.dim() != 2:
            raise ValueError(
                f"{type(self).__name__}.update: logits must be (B, C), got {tuple(logits.shape)}"
            )
        side = "ref" if real else "gen"
        getattr(self, f"{side}_logits").append(
            logits.detach().to(self.device, torch.float64)
        )
        getattr(self, f"{side}_ids").append(
            self._hashes(ids, logits.shape[0], "logits")
        )

    def _values(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not len(self.gen_logits) or not len(self.ref_logits):
            raise ValueError(
                f"{type(self).__name__}: needs both generated and reference logits"
            )
        gen_ids, gen = self.unique(self.gen_ids, self.gen_logits)
        ref_ids, ref = self.unique(self.ref_ids, self.ref_logits)
        i_gen, i_ref = self.pair_by_id(gen_ids, ref_ids)
        return gen_ids[i_gen], paired_kl(ref[i_ref], gen[i_gen], self.variant)


@register("metric", "mmkl")
class MMKL(KLDivergence):
    """MMKL ("Diverse and Vivid Sound Generation"): paired KL with a sigmoid multi-label classifier."""

    def __init__(self, variant: Variant = "sigmoid", **kwargs: Any) -> None:
        super().__init__(variant=variant, **kwargs)


@register("metric", "inception_score")
class InceptionScore(IdMetric):
    """Inception Score of generated clips from classifier logits; ``compute()`` -> ``(mean, std)``."""

    higher_is_better = True
    is_differentiable = False

    def __init__(self, splits: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.splits = splits
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("ids", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, ids: list[str] | None = None) -> None:
        if logits.dim() != 2:
            raise ValueError(
                f"InceptionScore.update: logits must be (B, C), got {tuple(logits.shape)}"
            )
        self.logits.append(logits.detach().to(self.device, torch.float64))
        self.ids.append(self._hashes(ids, logits.shape[0], "logits"))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not len(self.logits):
            raise ValueError("InceptionScore: no clips were given")
        hashes, logits = self.unique(self.ids, self.logits)
        # a fixed order (by id hash) so that the splits do not depend on how ranks interleave
        order = hashes.argsort()
        mean, std = inception_score(logits[order], self.splits)
        return torch.tensor(mean, dtype=torch.float64), torch.tensor(
            std, dtype=torch.float64
        )
