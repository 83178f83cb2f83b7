"""Vector quantizer (the codebook of VQ-VAE / VQGAN) and the time-major order of a code grid.

`VectorQuantizer` maps every position of an encoder output ``z_e (B, dim, H, W)`` to its nearest
codebook entry (eq. 1 of "Diverse and Vivid Sound Generation from Text Descriptions"), passes
gradients straight through (``z_q = sg[q(z_e)] + z_e - sg[z_e]``: the value is the code exactly,
``dL/dz_e = dL/dz_q``) and returns
the VQ loss of the paper's eq. 3, both terms averaged over elements::

    loss = codebook_term + beta * commitment_term
    codebook_term   = mean((sg[z_e] - z_q)^2)      gradient to the codebook
    commitment_term = mean((z_e - sg[z_q])^2)      gradient to the encoder

``legacy_beta_placement=True`` reproduces taming-transformers' (and SpecVQGAN's) code, which puts
``beta`` on the codebook term instead: ``loss = beta * codebook_term + commitment_term``. With EMA
codebook updates the codebook is a buffer (no gradient), the codebook term is dropped and the
loss is the commitment term with its weight (``beta``, or 1 under the legacy placement).

Options: EMA updates with Laplace smoothing (VQ-VAE appendix / Sonnet), k-means initialisation
from the first training batch, restart of codes unused for ``restart_after`` training steps from
the current encoder outputs, l2-normalised (cosine) codes. Under ``torch.distributed`` the code
counts and sums of the EMA, of the k-means iterations and of the usage statistics are
all-reduced, and the random draws (k-means seeds, restarts) are made on rank 0 and broadcast, so
every rank holds the same codebook; random draws use a generator seeded by ``(seed, steps)``, so
a resumed run repeats them exactly.

Code order: `flatten_time_major` / `unflatten_time_major` turn a ``(B, H=freq, W=time)`` index grid
into the column-major sequence of the paper (all frequency rows of time step 0, then of time
step 1, ...) and back.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tta.registry import register

log = logging.getLogger(__name__)

__all__ = ["VectorQuantizer", "code_statistics", "flatten_time_major", "unflatten_time_major"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op in a single process)."""
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank, in place (a no-op in a single process)."""
    if _distributed():
        dist.broadcast(t, src=0)
    return t


def flatten_time_major(grid: torch.Tensor) -> torch.Tensor:
    """Index grid ``(B, H=freq, W=time)`` -> sequence ``(B, H*W)`` in column-major (time-major) order:
    ``seq[:, w * H + h] = grid[:, h, w]``."""
    if grid.dim() != 3:
        raise ValueError(f"flatten_time_major expects a (B, freq, time) grid, got shape {tuple(grid.shape)}")
    return grid.transpose(1, 2).reshape(grid.shape[0], -1)


def unflatten_time_major(seq: torch.Tensor, freq: int) -> torch.Tensor:
    """Inverse of `flatten_time_major`: ``(B, freq*time)`` -> ``(B, freq, time)``."""
    if seq.dim() != 2 or freq <= 0 or seq.shape[1] % freq:
        raise ValueError(
            f"unflatten_time_major expects a (B, freq*time) sequence with freq={freq} dividing its length, "
            f"got shape {tuple(seq.shape)}"
        )
    return seq.reshape(seq.shape[0], seq.shape[1] // freq, freq).transpose(1, 2)


@register("network", "vector_quantizer")
class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook with straight-through gradients (see the module docstring).

    Args:
        num_codes: codebook size ``|Z|`` (1024 in the paper).
        dim: code dimension ``n_z`` (the encoder's output channels).
        beta: commitment weight (0.25 in VQ-VAE / taming).
        legacy_beta_placement: put ``beta`` on the codebook term as taming-transformers' code does
            (the paper's eq. 3 puts it on the commitment term: False).
        ema_decay: EMA codebook updates with this decay (None: the codebook is learned by gradient).
        ema_epsilon: Laplace smoothing of the EMA cluster sizes.
        kmeans_init: initialise the codebook by k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that initialisation.
        restart_after: re-draw codes unused for this many training steps from the current encoder
            outputs (None: never).
        cosine: l2-normalise encoder outputs and codes (nearest = largest cosine similarity).
        seed: seed of the k-means / restart draws.
    """

    def __init__(
        self,
        num_codes: int = 1024,
        dim: int = 256,
        beta: float = 0.25,
        legacy_beta_placement: bool = False,
        ema_decay: float | None = None,
        ema_epsilon: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        restart_after: int | None = None,
        cosine: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"VectorQuantizer: num_codes and dim must be positive, got {num_codes}, {dim}")
        if beta < 0:
            raise ValueError(f"VectorQuantizer: beta must be >= 0, got {beta}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"VectorQuantizer: ema_decay must be in (0, 1) or None, got {ema_decay}")
        if ema_epsilon <= 0:
            raise ValueError(f"VectorQuantizer: ema_epsilon must be positive, got {ema_epsilon}")
        if kmeans_iters < 1:
            raise ValueError(f"VectorQuantizer: kmeans_iters must be >= 1, got {kmeans_iters}")
        if restart_after is not None and restart_after < 1:
            raise ValueError(f"VectorQuantizer: restart_after must be >= 1 or None, got {restart_after}")
        self.num_codes, self.dim, self.beta = int(num_codes), int(dim), float(beta)
        self.legacy_beta_placement = bool(legacy_beta_placement)
        self.ema_decay, self.ema_epsilon = ema_decay, float(ema_epsilon)
        self.kmeans_init, self.kmeans_iters = bool(kmeans_init), int(kmeans_iters)
        self.restart_after, self.cosine, self.seed = restart_after, bool(cosine), int(seed)
        self.config: dict[str, Any] = {
            "num_codes": self.num_codes, "dim": self.dim, "beta": self.beta,
            "legacy_beta_placement": self.legacy_beta_placement, "ema_decay": ema_decay,
            "ema_epsilon": self.ema_epsilon, "kmeans_init": self.kmeans_init, "kmeans_iters": self.kmeans_iters,
            "restart_after": restart_after, "cosine": self.cosine, "seed": self.seed,
        }
        init = torch.empty(self.num_codes, self.dim).uniform_(-1.0 / self.num_codes, 1.0 / self.num_codes)
        if self.cosine:
            init = F.normalize(init, dim=1)
        if ema_decay is None:
            self.codebook = nn.Parameter(init)
        else:
            self.register_buffer("codebook", init)
            # cluster sizes start at 1 and sums at the codes, so a code never hit keeps its value
            self.register_buffer("ema_cluster_size", torch.ones(self.num_codes))
            self.register_buffer("ema_embed_sum", init.clone())
        self.register_buffer("initialized", torch.tensor(int(not self.kmeans_init), dtype=torch.uint8))
        self.register_buffer("unused_steps", torch.zeros(self.num_codes, dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ lookup
    def codes(self) -> torch.Tensor:
        """The codebook ``(num_codes, dim)`` as used for lookup (l2-normalised when ``cosine``)."""
        return F.normalize(self.codebook, dim=1) if self.cosine else self.codebook

    def nearest(self, flat: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """Index ``(N,)`` of the nearest code of each row of ``flat (N, dim)`` (ties: the lowest index)."""
        codes = self.codes() if codes is None else codes
        flat, codes = flat.detach().float(), codes.detach().float()
        if self.cosine:
            return torch.argmax(flat @ codes.t(), dim=1)
        dist2 = flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ codes.t() + codes.pow(2).sum(1)[None]
        return torch.argmin(dist2, dim=1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices ``(B, H, W)`` -> quantized latents ``(B, dim, H, W)`` (the prior's decoding)."""
        if indices.dim() != 3 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise ValueError(f"indices_to_codes expects integer indices (B, H, W), got {indices.dtype} "
                             f"{tuple(indices.shape)}")  # fmt: skip
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            raise ValueError(f"indices_to_codes: indices must be in [0, {self.num_codes}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")  # fmt: skip
        return F.embedding(indices.long(), self.codes()).permute(0, 3, 1, 2).contiguous()

    # ----------------------------------------------------------------- forward
    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``z_e (B, dim, H, W)`` -> ``(z_q (B, dim, H, W), loss, info)``.

        ``info``: ``indices (B, H, W)``, ``perplexity`` ``exp(H(p))`` of the code frequencies ``p``
        of this batch, ``usage`` (fraction of codes used in this batch), ``counts (num_codes,)``,
        ``codebook_loss`` and ``commitment_loss`` (unweighted). In training the counts are summed
        over ranks; in eval they are this process's.
        """
        if z_e.dim() != 4 or z_e.shape[1] != self.dim:
            raise ValueError(f"VectorQuantizer expects z_e of shape (B, {self.dim}, H, W), got {tuple(z_e.shape)}")
        with torch.autocast(device_type=z_e.device.type, enabled=False):  # distances in float32
            return self._quantize(z_e)

    def _quantize(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        b, d, h, w = z_e.shape
        flat = z_e.float().permute(0, 2, 3, 1).reshape(-1, d)
        if self.cosine:
            flat = F.normalize(flat, dim=1)
        if self.training:
            with torch.no_grad():
                if int(self.initialized) == 0:
                    self._kmeans(flat.detach())
                if self.restart_after is not None:
                    self._restart_dead(flat.detach())
        codes = self.codes()
        indices = self.nearest(flat, codes)
        q = F.embedding(indices, codes).float()
        commitment = F.mse_loss(flat, q.detach())
        if self.ema_decay is None:
            codebook_term = F.mse_loss(q, flat.detach())
        else:
            codebook_term = torch.zeros((), device=flat.device)
        w_codebook, w_commit = (self.beta, 1.0) if self.legacy_beta_placement else (1.0, self.beta)
        loss = w_commit * commitment + (w_codebook * codebook_term if self.ema_decay is None else 0.0)
        # straight-through: the value is exactly q, the gradient to z_e the identity
        z_q = (q.detach() + (flat - flat.detach())).reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()

        counts = torch.bincount(indices, minlength=self.num_codes).float()
        if self.training:
            with torch.no_grad():
                _all_reduce_sum(counts)
                if self.ema_decay is not None:
                    self._ema_update(flat.detach(), indices, counts)
                self.unused_steps.copy_(torch.where(counts > 0, torch.zeros_like(self.unused_steps),
                                                    self.unused_steps + 1))
                self.steps += 1
        info = {"indices": indices.reshape(b, h, w), "counts": counts, **code_statistics(counts),
                "codebook_loss": codebook_term.detach(), "commitment_loss": commitment.detach()}
        return z_q, loss, info

    # -------------------------------------------------------------- updates
    def _generator(self, salt: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(hash((self.seed, int(self.steps), salt)) & 0x7FFF_FFFF_FFFF_FFFF)
        return g

    def _draw_rows(self, flat: torch.Tensor, n: int, salt: int) -> torch.Tensor:
        """``n`` rows of ``flat`` drawn on rank 0 (without replacement when possible), broadcast."""
        g = self._generator(salt)
        total = flat.shape[0]
        pick = torch.randperm(total, generator=g)[:n] if total >= n else torch.randint(total, (n,), generator=g)
        rows = flat[pick.to(flat.device)].float().clone()
        return _broadcast(rows)

    @torch.no_grad()
    def set_codes(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        """Replace codes ``idx`` by ``values`` ``(len(idx), dim)``; their EMA statistics restart at (1, value)."""
        self.codebook[idx] = values.to(self.codebook.dtype)
        if self.ema_decay is not None:
            self.ema_cluster_size[idx] = 1.0
            self.ema_embed_sum[idx] = values.to(self.ema_embed_sum.dtype)

    def _kmeans(self, flat: torch.Tensor) -> None:
        """Lloyd's k-means over the first batch of every rank (sums and counts all-reduced)."""
        centroids = self._draw_rows(flat, self.num_codes, salt=1)
        for _ in range(self.kmeans_iters):
            assign = self.nearest(flat, centroids)
            counts = _all_reduce_sum(torch.bincount(assign, minlength=self.num_codes).float())
            sums = _all_reduce_sum(torch.zeros_like(centroids).index_add_(0, assign, flat.float()))
            hit = counts > 0
            centroids[hit] = sums[hit] / counts[hit, None]
            if self.cosine:
                centroids = F.normalize(centroids, dim=1)
        self.set_codes(torch.arange(self.num_codes, device=flat.device), centroids)
        self.initialized.fill_(1)
        log.info("VectorQuantizer: codebook initialised by %d k-means iterations on %d vectors",
                 self.kmeans_iters, flat.shape[0])

    def _restart_dead(self, flat: torch.Tensor) -> None:
        """Re-draw every code unused for ``restart_after`` steps from the current encoder outputs."""
        dead = torch.nonzero(self.unused_steps >= self.restart_after).squeeze(1)
        if dead.numel() == 0:
            return
        self.set_codes(dead, self._draw_rows(flat, int(dead.numel()), salt=2))
        self.unused_steps[dead] = 0
        log.debug("VectorQuantizer: restarted %d dead codes at step %d", dead.numel(), int(self.steps))

    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """``N <- d N + (1 - d) n``, ``m <- d m + (1 - d) sum z``, code ``= m / laplace(N)``."""
        decay = float(self.ema_decay)  # type: ignore[arg-type]
        sums = _all_reduce_sum(torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, flat.float()))
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
        n = self.ema_cluster_size.sum()
        eps, k = self.ema_epsilon, self.num_codes
        smoothed = (self.ema_cluster_size + eps) / (n + k * eps) * n
        codes = self.ema_embed_sum / smoothed[:, None]
        self.codebook.copy_(F.normalize(codes, dim=1) if self.cosine else codes)


def code_statistics(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """``perplexity = exp(-sum p log p)`` and ``usage = mean(counts > 0)`` of code counts ``(K,)``."""
    total = counts.sum()
    p = counts / total.clamp(min=1)
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()
    return {"perplexity": torch.exp(entropy), "usage": (counts > 0).float().mean()}
