"""Fréchet Audio Distance (Kilgour et al. 2019) and its extrapolation FAD-inf (Gui et al. 2024).

``FAD = |mu_g - mu_r|^2 + tr(S_g) + tr(S_r) - 2 tr((S_g S_r)^(1/2))`` between Gaussians fitted to
the clip embeddings of generated and reference audio. Statistics are computed in float64 (under
any autocast). The trace of the matrix square root uses the symmetric form
``tr((S_g S_r)^(1/2)) = sum_i sqrt(lambda_i(A S_r A))`` with ``A = S_g^(1/2)`` from an
eigendecomposition (negative eigenvalues of the PSD matrices, round-off, are clamped to 0): no
complex parts, no ``sqrtm`` iterations, and singular covariances (fewer clips than dimensions)
are fine.

FAD-inf: FAD is biased upwards for finite sets, approximately linearly in ``1/N``. `fad_infinity`
evaluates FAD on random subsets of the generated embeddings of sizes ``N_1 .. N_k`` against the
full reference statistics, fits ``FAD = a + b / N`` by least squares and reports the intercept.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tta.metrics.pairing import IdMetric
from tta.registry import register
from tta.utils.weights import atomic_save, load_checkpoint

__all__ = [
    "FrechetAudioDistance",
    "GaussianStats",
    "fad_infinity",
    "frechet_distance",
    "frechet_distance_sets",
    "frechet_distance_to",
]


@dataclass
class GaussianStats:
    """Mean ``(D,)`` and covariance ``(D, D)`` (float64) of ``n`` embeddings, with provenance."""

    mu: torch.Tensor
    sigma: torch.Tensor
    n: int
    meta: dict[str, Any] = field(default_factory=dict)
    _root: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def sigma_root(self) -> torch.Tensor:
        """The PSD square root of ``sigma`` (computed once)."""
        if self._root is None:
            self._root = _psd_sqrt(self.sigma.double())
        return self._root

    @classmethod
    def from_embeddings(
        cls, x: torch.Tensor, meta: dict[str, Any] | None = None
    ) -> GaussianStats:
        """Unbiased (``N - 1``) statistics of embeddings ``(N, D)``; needs ``N >= 2``."""
        if x.dim() != 2:
            raise ValueError(
                f"GaussianStats: embeddings must be (N, D), got {tuple(x.shape)}"
            )
        if x.shape[0] < 2:
            raise ValueError(
                f"GaussianStats: FAD needs at least 2 clips per set, got {x.shape[0]}"
            )
        x = x.detach().to(torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError("GaussianStats: embeddings contain NaN/inf")
        mu = x.mean(dim=0)
        xc = x - mu
        sigma = xc.T @ xc / (x.shape[0] - 1)
        return cls(mu=mu, sigma=sigma, n=int(x.shape[0]), meta=dict(meta or {}))

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic ``torch.save`` (loadable with ``weights_only=True``)."""
        return atomic_save({"mu": self.mu.cpu(), "sigma": self.sigma.cpu(), "n": self.n,
                            "meta": json.dumps(self.meta, sort_keys=True)}, path)  # fmt: skip

    @classmethod
    def load(cls, path: str | os.PathLike) -> GaussianStats:
        data = load_checkpoint(path)
        missing = {"mu", "sigma", "n", "meta"} - set(data)
        if missing:
            raise KeyError(
                f"{path}: not a GaussianStats file (missing {sorted(missing)})"
            )
        return cls(
            mu=data["mu"].double(),
            sigma=data["sigma"].double(),
            n=int(data["n"]),
            meta=json.loads(data["meta"]),
        )


def _psd_sqrt(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``tr((S1 S2)^(1/2))`` of two PSD matrices, in float64, by symmetric eigendecompositions."""
    s1 = sigma1.to(torch.float64)
    s2 = sigma2.to(torch.float64)
    root = _psd_sqrt((s1 + s1.T) / 2)
    m = root @ s2 @ root
    return torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (float64)."""
    if (
        mu1.shape != mu2.shape
        or sigma1.shape != sigma2.shape
        or sigma1.shape != (mu1.shape[0],) * 2
    ):
        raise ValueError(
            f"frechet_distance: shapes disagree: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
            f"sigma {tuple(sigma1.shape)} / {tuple(sigma2.shape)}"
        )
    with torch.autocast(device_type=mu1.device.type, enabled=False):
        mu1, mu2 = mu1.double(), mu2.to(mu1.device).double()
        sigma1, sigma2 = sigma1.double(), sigma2.to(sigma1.device).double()
        diff = mu1 - mu2
        value = (
            diff @ diff
            + sigma1.trace()
            + sigma2.trace()
            - 2.0 * trace_sqrt_product(sigma1, sigma2)
        )
    return float(value)


def frechet_distance_to(embeddings: torch.Tensor, reference: GaussianStats) -> float:
    """FAD of embeddings ``(N, D)`` against reference statistics, without forming their covariance.

    With ``Xc`` the centred embeddings and ``A`` the square root of the reference covariance, the
    non-zero eigenvalues of ``A S A`` are those of the ``N x N`` Gram matrix of ``Xc A / sqrt(N-1)``,
    so sets smaller than the dimension cost an ``N x N`` eigendecomposition (the reference's root
    is computed once and cached).
    """
    x = embeddings.detach().to(torch.float64)
    n = x.shape[0]
    if x.dim() != 2 or n < 2 or x.shape[1] != reference.mu.shape[0]:
        raise ValueError(
            f"frechet_distance_to: need (N >= 2, {reference.mu.shape[0]}) embeddings, got {tuple(x.shape)}"
        )
    with torch.autocast(device_type=x.device.type, enabled=False):
        mu = x.mean(dim=0)
        xc = (x - mu) / (n - 1) ** 0.5
        y = xc @ reference.sigma_root.to(x.device)
        gram = y @ y.T if n < x.shape[1] else y.T @ y
        tr_sqrt = torch.linalg.eigvalsh((gram + gram.T) / 2).clamp(min=0).sqrt().sum()
        diff = mu - reference.mu.to(x.device).double()
        value = (
            diff @ diff
            + xc.pow(2).sum()
            + reference.sigma.to(x.device).double().trace()
            - 2.0 * tr_sqrt
        )
    return float(value)


def frechet_distance_sets(x: torch.Tensor, y: torch.Tensor) -> float:
    """FAD between two embedding sets ``(N, D)`` and ``(M, D)``.

    With centred, ``1/sqrt(N-1)``-scaled embeddings ``X`` and ``Y``, ``tr((S_x S_y)^(1/2))`` is the
    nuclear norm of ``X Y^T`` (``N x M``), which is cheaper than ``D x D`` eigendecompositions
    while ``N M min(N, M) < D^3``; larger sets go through `frechet_distance`.
    """
    if (
        x.dim() != 2
        or y.dim() != 2
        or x.shape[1] != y.shape[1]
        or min(x.shape[0], y.shape[0]) < 2
    ):
        raise ValueError(
            f"frechet_distance_sets: need (N >= 2, D) and (M >= 2, D), got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    if n * m * min(n, m) >= d**3:
        sx, sy = GaussianStats.from_embeddings(x), GaussianStats.from_embeddings(y)
        return frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = x.detach().double(), y.detach().to(x.device).double()
        mx, my = x.mean(dim=0), y.mean(dim=0)
        xc, yc = (x - mx) / (n - 1) ** 0.5, (y - my) / (m - 1) ** 0.5
        nuclear = torch.linalg.svdvals(xc @ yc.T).sum()
        value = (
            (mx - my) @ (mx - my) + xc.pow(2).sum() + yc.pow(2).sum() - 2.0 * nuclear
        )
    return float(value)


def fad_infinity(
    generated: torch.Tensor, reference: GaussianStats, num_points: int = 15, min_n: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """FAD extrapolated to infinitely many generated clips (intercept of FAD vs ``1/N``).

    Subsets of ``N`` in ``linspace(min_n, len(generated), num_points)`` are drawn without
    replacement (seeded). Returns ``{"fad_inf", "slope", "r2", "ns", "fads"}``.
    """
    total = generated.shape[0]
    min_n = max(2, min_n if min_n is not None else total // 4)
    if total < 3 or min_n >= total:
        raise ValueError(
            f"fad_infinity: needs at least 3 clips and min_n < N, got N={total}, min_n={min_n}"
        )
    ns = sorted({round(v) for v in torch.linspace(min_n, total, num_points).tolist()})
    g = torch.Generator().manual_seed(seed)
    fads = []
    for n in ns:
        idx = torch.randperm(total, generator=g)[:n]
        fads.append(frechet_distance_to(generated[idx], reference))
    x = torch.tensor([1.0 / n for n in ns], dtype=torch.float64)
    y = torch.tensor(fads, dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], dim=1)
    coef = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    pred = design @ coef
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return {
        "fad_inf": float(coef[0]),
        "slope": float(coef[1]),
        "r2": r2,
        "ns": ns,
        "fads": fads,
    }


@register("metric", "fad")
class FrechetAudioDistance(IdMetric):
    """FAD between generated and reference clip embeddings (a `torchmetrics.Metric`).

    ``update(x, ids=None, real=False)`` takes waveforms ``(B, T)`` when an ``embedder`` is given
    (at its sample rate), else embeddings ``(B, D)``, or ``(B, P, D)``: ``P`` samples of the
    distribution per clip (VGGish's 0.96 s patches in google-research's FAD). Items repeated
    across DDP ranks (same id) count once. With ``reference_stats`` (e.g. cached `GaussianStats`) no reference items are
    needed. ``compute()`` returns the FAD as a float64 scalar tensor; `details` adds the set sizes
    and, with ``infinity=True``, FAD-inf.
    """

    higher_is_better = False
    is_differentiable = False

    def __init__(self, embedder: Any | None = None, reference_stats: GaussianStats | None = None,
                 infinity: bool = False, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.embedder = embedder
        self.reference_stats = reference_stats
        self.infinity = infinity
        for side in ("gen", "ref"):
            self.add_state(f"{side}_emb", default=[], dist_reduce_fx="cat")
            self.add_state(f"{side}_ids", default=[], dist_reduce_fx="cat")

    def update(
        self, x: torch.Tensor, ids: list[str] | None = None, real: bool = False
    ) -> None:
        emb = self.embedder.embed(x) if self.embedder is not None else x
        if emb.dim() not in (2, 3):
            raise ValueError(
                f"FrechetAudioDistance.update: embeddings must be (B, D) or (B, P, D), got {tuple(emb.shape)}"
            )
        if emb.dim() == 3:  # P samples per clip, each with its own id "clip#p" (DDP repeats still count once)
            b, frames = emb.shape[:2]
            if ids is not None:  # without ids every frame is anonymous (never de-duplicated) anyway
                if len(ids) != b:
                    raise ValueError(f"FrechetAudioDistance.update: {len(ids)} ids for {b} clips")
                ids = [f"{i}#{p}" for i in ids for p in range(frames)]
            emb = emb.reshape(b * frames, emb.shape[-1])
        side = "ref" if real else "gen"
        getattr(self, f"{side}_emb").append(emb.detach().to(self.device, torch.float64))
        getattr(self, f"{side}_ids").append(
            self._hashes(ids, emb.shape[0], "embeddings")
        )

    def _reference_items(self) -> torch.Tensor | None:
        if self.reference_stats is not None:
            return None
        if not len(self.ref_emb):
            raise ValueError(
                "FrechetAudioDistance: no reference clips and no reference_stats"
            )
        return self.unique(self.ref_ids, self.ref_emb)[1]

    def _fad(self) -> tuple[float, torch.Tensor, torch.Tensor | None]:
        if not len(self.gen_emb):
            raise ValueError("FrechetAudioDistance: no generated clips were given")
        gen = self.unique(self.gen_ids, self.gen_emb)[1]
        ref = self._reference_items()
        value = (
            frechet_distance_sets(gen, ref)
            if ref is not None
            else frechet_distance_to(gen, self.reference_stats)
        )
        return value, gen, ref

    def _stats(self) -> tuple[GaussianStats, torch.Tensor]:
        if not len(self.gen_emb):
            raise ValueError("FrechetAudioDistance: no generated clips were given")
        _, gen = self.unique(self.gen_ids, self.gen_emb)
        if gen.shape[0] < 2:
            raise ValueError(
                f"FrechetAudioDistance: FAD needs at least 2 generated clips, got {gen.shape[0]}"
            )
        if self.reference_stats is not None:
            return self.reference_stats, gen
        if not len(self.ref_emb):
            raise ValueError(
                "FrechetAudioDistance: no reference clips and no reference_stats"
            )
        return GaussianStats.from_embeddings(
            self.unique(self.ref_ids, self.ref_emb)[1]
        ), gen

    def compute(self) -> torch.Tensor:
        return torch.tensor(self._fad()[0], dtype=torch.float64)

    def reference(self) -> GaussianStats:
        """The reference statistics (given, or from the synced reference items)."""
        with self.synced():
            return self._stats()[0]

    def items(self, real: bool = False) -> tuple[list[str], torch.Tensor]:
        """Clip ids and embeddings (float64) of one side, synced over ranks, repeats dropped."""
        side = "ref" if real else "gen"
        with self.synced():
            if not len(getattr(self, f"{side}_emb")):
                return [], torch.zeros(0, 0, dtype=torch.float64)
            hashes, emb = self.unique(
                getattr(self, f"{side}_ids"), getattr(self, f"{side}_emb")
            )
        return [self.name_of(h) for h in hashes.tolist()], emb

    def details(self) -> dict[str, Any]:
        """``{"fad", "n_generated", "n_reference"}`` and FAD-inf fields when ``infinity``."""
        with self.synced():
            value, emb, ref = self._fad()
        n_ref = ref.shape[0] if ref is not None else self.reference_stats.n
        out: dict[str, Any] = {
            "fad": value,
            "n_generated": emb.shape[0],
            "n_reference": n_ref,
        }
        if self.infinity:
            stats = (
                self.reference_stats
                if ref is None
                else GaussianStats.from_embeddings(ref)
            )
            out.update(fad_infinity(emb, stats))
        return out
