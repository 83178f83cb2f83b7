"""Spectrogram PSNR and spectrogram FID ("Diverse and Vivid Sound Generation", VQGAN paper).

Both work on log-mels of one `MelFrontend`, mapped to [0, 1] as SpecVQGAN normalises its
spectrograms: ``dB = 20 log10(mel)``, ``x = clip((dB - ref_db + range_db) / range_db, 0, 1)`` with
``ref_db = 20`` and ``range_db = 100``.

- **PSNR** (paired, per clip): ``10 log10(1 / MSE)`` between the normalised spectrograms of a
  generated clip and its target (both cropped to the shorter), averaged over clips.
- **Spectrogram FID**: the Fréchet distance (`tta.metrics.fad.frechet_distance`) between the
  distributions of a per-clip spectrogram feature. By default the feature is model-free: the mean
  and the standard deviation over time of every normalised mel band (``2 * n_mels`` values);
  any ``feature_fn`` mapping spectrograms ``(B, n_mels, F)`` to ``(B, D)`` (a mel classifier's
  embedding, as Melception in the paper) can replace it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from tta.data.mel import MelFrontend
from tta.metrics.fad import GaussianStats, frechet_distance
from tta.metrics.pairing import IdMetric, PairedIdMetric
from tta.registry import register

__all__ = [
    "SpectrogramFID",
    "SpectrogramPSNR",
    "band_statistics",
    "normalize_log_mel",
    "spectrogram_psnr",
]

REF_DB = 20.0
RANGE_DB = 100.0


def normalize_log_mel(
    log_mel: torch.Tensor, ref_db: float = REF_DB, range_db: float = RANGE_DB
) -> torch.Tensor:
    """Natural-log mel (as `MelFrontend` returns) -> SpecVQGAN's [0, 1] scale."""
    db = log_mel.float() * (20.0 / math.log(10.0))
    return ((db - ref_db + range_db) / range_db).clamp(0.0, 1.0)


def spectrogram_psnr(target: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Per-clip PSNR ``(N,)`` in dB of [0, 1] spectrograms ``(N, n_mels, F)`` (cropped to the shorter)."""
    if (
        target.dim() != 3
        or generated.dim() != 3
        or target.shape[:2] != generated.shape[:2]
    ):
        raise ValueError(f"spectrogram_psnr: expected (N, n_mels, F) pairs, got {tuple(target.shape)} and "
                         f"{tuple(generated.shape)}")  # fmt: skip
    frames = min(target.shape[-1], generated.shape[-1])
    mse = (
        (target[..., :frames].double() - generated[..., :frames].double())
        .pow(2)
        .mean(dim=(1, 2))
    )
    return 10.0 * torch.log10(1.0 / mse.clamp(min=1e-12))


def band_statistics(spec: torch.Tensor) -> torch.Tensor:
    """Mean and standard deviation over time of each band: ``(B, n_mels, F)`` -> ``(B, 2 n_mels)``."""
    return torch.cat([spec.mean(dim=-1), spec.std(dim=-1, unbiased=False)], dim=1)


class _SpecMetric(IdMetric):
    is_differentiable = False

    def __init__(self, frontend: MelFrontend | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.frontend = frontend

    def _spec(self, x: torch.Tensor) -> torch.Tensor:
        """Waveforms (with a frontend) or natural-log mels -> normalised spectrograms."""
        mel = self.frontend(x) if self.frontend is not None else x
        if mel.dim() != 3:
            raise ValueError(
                f"{type(self).__name__}: spectrograms must be (B, n_mels, F), got {tuple(mel.shape)}"
            )
        return normalize_log_mel(mel)


@register("metric", "spec_psnr")
class SpectrogramPSNR(_SpecMetric, PairedIdMetric):
    """Mean PSNR between generated and target spectrograms, paired in each call.

    ``update(generated, target, ids)``: waveforms (with ``frontend``) or log-mels of the same clips.
    """

    higher_is_better = True

    def __init__(self, frontend: MelFrontend | None = None, **kwargs: Any) -> None:
        super().__init__(frontend, **kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("ids", default=[], dist_reduce_fx="cat")

    @torch.no_grad()
    def update(
        self,
        generated: torch.Tensor,
        target: torch.Tensor,
        ids: list[str] | None = None,
    ) -> None:
        values = spectrogram_psnr(self._spec(target), self._spec(generated))
        self.values.append(values.to(self.device))
        self.ids.append(self._hashes(ids, values.shape[0], "pairs"))

    def _values(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not len(self.values):
            raise ValueError("SpectrogramPSNR: no pairs were given")
        return self.unique(self.ids, self.values)


@register("metric", "spec_fid")
class SpectrogramFID(_SpecMetric):
    """Fréchet distance between per-clip spectrogram features of generated and reference clips.

    ``update(x, ids=None, real=False)``; ``feature_fn`` defaults to `band_statistics`.
    """

    higher_is_better = False

    def __init__(self, frontend: MelFrontend | None = None,
                 feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(frontend, **kwargs)
        self.feature_fn = feature_fn or band_statistics
        for side in ("gen", "ref"):
            self.add_state(f"{side}_feat", default=[], dist_reduce_fx="cat")
            self.add_state(f"{side}_ids", default=[], dist_reduce_fx="cat")

    @torch.no_grad()
    def update(
        self, x: torch.Tensor, ids: list[str] | None = None, real: bool = False
    ) -> None:
        feat = self.feature_fn(self._spec(x))
        side = "ref" if real else "gen"
        getattr(self, f"{side}_feat").append(
            feat.detach().to(self.device, torch.float64)
        )
        getattr(self, f"{side}_ids").append(self._hashes(ids, feat.shape[0], "clips"))

    def compute(self) -> torch.Tensor:
        if not len(self.gen_feat) or not len(self.ref_feat):
            raise ValueError("SpectrogramFID: needs both generated and reference clips")
        gen = GaussianStats.from_embeddings(self.unique(self.gen_ids, self.gen_feat)[1])
        ref = GaussianStats.from_embeddings(self.unique(self.ref_ids, self.ref_feat)[1])
        return torch.tensor(
            frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma), dtype=torch.float64
        )
