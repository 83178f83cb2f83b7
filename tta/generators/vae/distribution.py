"""Diagonal Gaussian posterior of the KL autoencoder."""

from __future__ import annotations

import math

import torch

__all__ = ["LOGVAR_MAX", "LOGVAR_MIN", "DiagonalGaussian"]

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Upcast half / bfloat16 to float32; leave float32 / float64 alone."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) built from encoder moments ``(B, 2C, ...)``.

    The first C channels are the mean, the last C the log-variance (clamped to
    ``[LOGVAR_MIN, LOGVAR_MAX]``, as LDM). Reductions (`kl`, `nll`) sum over every
    non-batch dimension and return one value per sample, shape ``(B,)``; they are computed in
    float32 (at least) even when the parameters are half precision (autocast), since sums over
    tens of thousands of latent elements lose too much in bf16.
    """

    def __init__(self, parameters: torch.Tensor) -> None:
        if parameters.ndim < 2 or parameters.shape[1] % 2 != 0:
            raise ValueError(
                "DiagonalGaussian expects parameters of shape (B, 2C, ...) with an even channel "
                f"count (mean and logvar stacked); got {tuple(parameters.shape)}"
            )
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @property
    def shape(self) -> torch.Size:
        """Shape of a sample, ``(B, C, ...)``."""
        return self.mean.shape

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample ``mean + std * eps`` (differentiable w.r.t. the parameters).

        ``eps`` is drawn on the generator's device (tta's seeded generators live on the CPU, so a
        seed gives the same sample on every device) and moved to the parameters' device."""
        device = self.mean.device if generator is None else generator.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * eps.to(self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        """The mean (the mode of a Gaussian)."""
        return self.mean

    def _reduce_dims(self) -> list[int]:
        return list(range(1, self.mean.ndim))

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self || other) per sample, ``(B,)``; ``other=None`` means N(0, I)."""
        dims = self._reduce_dims()
        mean, logvar = _f32(self.mean), _f32(self.logvar)
        if other is None:
            return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=dims)
        if other.mean.shape != self.mean.shape:
            raise ValueError(f"KL between Gaussians of shapes {tuple(self.shape)} and {tuple(other.shape)}")
        o_mean, o_logvar = _f32(other.mean), _f32(other.logvar)
        o_var = o_logvar.exp()
        return 0.5 * torch.sum(
            (mean - o_mean).pow(2) / o_var + logvar.exp() / o_var - 1.0 - logvar + o_logvar, dim=dims
        )

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of ``x`` (same shape as a sample) per sample, ``(B,)``."""
        if x.shape != self.mean.shape:
            raise ValueError(f"nll of a sample of shape {tuple(x.shape)} under a Gaussian of shape {tuple(self.shape)}")
        logvar = _f32(self.logvar)
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + logvar + (_f32(x) - _f32(self.mean)).pow(2) / logvar.exp(),
            dim=self._reduce_dims(),
        )

    def to(self, *args: object, **kwargs: object) -> DiagonalGaussian:
        """A copy with the parameters moved/cast by ``Tensor.to``."""
        return DiagonalGaussian(self.parameters.to(*args, **kwargs))  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"DiagonalGaussian(shape={tuple(self.shape)}, dtype={self.mean.dtype})"
