"""Training-time augmentation of DreamAudio reference concepts (paper section III-E).

Pure functions on tensors, no model knowledge. A batch's references are ``refs`` of shape
``(B, K, ...)`` (waveforms ``(B, K, T)``, log-mels ``(B, K, n_mels, frames)``, VAE latents
``(B, K, C, frames, F)``, ...) with ``present`` ``(B, K)`` bool marking real references (False:
padding or an empty reference, as general items have).

- **content masking** (`mask_reference_content`, paper rate 10 %): each present reference is,
  with probability ``p``, hidden over a random contiguous time span covering a fraction drawn
  uniformly from ``span`` of its length (set to ``value``); its caption is kept. The reference
  is still present, but the model cannot copy it whole.
- **dropping** (`drop_references`, paper rate 40 %): with probability ``p`` a sample loses all its
  references (``per_reference=True``: each reference independently): their content is set to
  ``value`` and ``present`` becomes False, so the conditioner sees its null, as for a general item.

Random numbers come from ``generator`` (on its device; the default CPU generator when None) and
are moved to the tensors' device, so a seeded generator gives the same decisions on CPU and CUDA.
The interpretation of the paper's wording is discussed in ``docs/dreamaudio_data.md``.
"""

from __future__ import annotations

import torch

__all__ = ["DROP_P", "MASK_P", "MASK_SPAN", "augment_references", "drop_references", "mask_reference_content"]

MASK_P = 0.1
DROP_P = 0.4
MASK_SPAN = (0.2, 0.5)


def _check(refs: torch.Tensor, present: torch.Tensor, p: float, name: str) -> None:
    if refs.ndim < 3:
        raise ValueError(f"{name}: refs must be (B, K, ..., T), got shape {tuple(refs.shape)}")
    if present.dtype != torch.bool or tuple(present.shape) != tuple(refs.shape[:2]):
        raise ValueError(f"{name}: present must be a bool tensor of shape {tuple(refs.shape[:2])}, "
                         f"got {present.dtype} {tuple(present.shape)}")  # fmt: skip
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}: probability p must be in [0, 1], got {p}")


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=where).to(device)


def mask_reference_content(
    refs: torch.Tensor, present: torch.Tensor, p: float = MASK_P, generator: torch.Generator | None = None,
    span: tuple[float, float] = MASK_SPAN, time_dim: int = -1, value: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Mask a random time span of each present reference with probability ``p``.

    ``time_dim`` is the time axis of ``refs`` (-1 for waveforms and log-mels, -2 for latents
    ``(B, K, C, frames, F)``). Returns ``(masked refs, masked (B, K) bool)``; ``refs`` is not
    modified."""
    _check(refs, present, p, "mask_reference_content")
    lo, hi = span
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"mask_reference_content: span must satisfy 0 < low <= high <= 1, got {span}")
    axis = time_dim % refs.ndim
    if axis < 2:
        raise ValueError(f"mask_reference_content: time_dim {time_dim} is a batch/reference axis of {refs.ndim}-d refs")
    b, k, t = refs.shape[0], refs.shape[1], refs.shape[axis]
    u = _rand((3, b, k), generator, refs.device)
    masked = (u[0] < p) & present
    length = torch.clamp(torch.round((lo + (hi - lo) * u[1]) * t), 1, t).long()
    start = torch.floor(u[2] * (t - length + 1)).long().clamp_max(t - length)
    steps = torch.arange(t, device=refs.device)
    hide = (steps >= start[..., None]) & (steps < (start + length)[..., None]) & masked[..., None]  # (B, K, T)
    hide = hide.reshape(b, k, *([1] * (axis - 2)), t, *([1] * (refs.ndim - axis - 1)))
    return torch.where(hide, torch.as_tensor(value, dtype=refs.dtype, device=refs.device), refs), masked


def drop_references(
    refs: torch.Tensor, present: torch.Tensor, p: float = DROP_P, generator: torch.Generator | None = None,
    per_reference: bool = False, value: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Drop all references of a sample with probability ``p`` (each reference with
    ``per_reference``). Returns ``(refs with dropped ones set to value, new present, dropped)``,
    ``dropped`` being the draws: ``(B,)`` bool, or ``(B, K)`` with ``per_reference``."""
    _check(refs, present, p, "drop_references")
    b, k = present.shape
    dropped = _rand((b, k) if per_reference else (b,), generator, refs.device) < p
    gone = dropped if per_reference else dropped[:, None].expand(b, k)
    keep = present & ~gone
    fill = torch.as_tensor(value, dtype=refs.dtype, device=refs.device)
    out = torch.where(gone.reshape(b, k, *([1] * (refs.ndim - 2))), fill, refs)
    return out, keep, dropped


def augment_references(
    refs: torch.Tensor, present: torch.Tensor, generator: torch.Generator | None = None, mask_p: float = MASK_P,
    drop_p: float = DROP_P, span: tuple[float, float] = MASK_SPAN, time_dim: int = -1, value: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Content masking then dropping with the paper's rates; returns ``(refs, present)``."""
    refs, _ = mask_reference_content(refs, present, mask_p, generator, span, time_dim, value)
    refs, present, _ = drop_references(refs, present, drop_p, generator, value=value)
    return refs, present
