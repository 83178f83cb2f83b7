"""DreamAudio's reference conditioners: the reference latents R and the reference captions E.

Both read the K reference concepts of each sample from the inputs mapping (the training module
and the generator put them there; the conditioners never see the VAE):

- ``reference_latents`` ``(B, K, C, T_r, F)``: the scaled VAE latents of the K reference clips
  (zeros for absent references);
- ``reference_present`` ``(B, K)`` bool: which references exist (False: padding, a general item,
  or a reference dropped by the training augmentation);
- ``reference_captions``: B lists of K strings (``""`` where absent);
- ``latent_size`` ``(H, W)``: the target latent's size (only the concat route reads it).

`ReferenceLatents` puts ``(R (B, C, K*T_r, F), present (B,))`` on the ``reference`` route (the
MRC UNet's reference path, paper eq. 4: R = [r_1, ..., r_K] concatenated along time), or, with
``route="concat"`` (the paper's plain-UNet variant), R pooled to the latent's size and
concatenated to the UNet's input channels. Its null (guidance, dropout) is "no references": an
all-False ``present`` (the MRC UNet's residuals of those rows are exactly zero) or zero channels.

`ReferenceCaptions` puts the text encoder's token states of the K captions, concatenated along the
sequence (``(B, K * L, D)``, masks kept, absent references masked out), on the ``refcap`` context.
Built without an encoder it shares another conditioner's (`share_text_encoder`): the prompt's
Flan-T5, stored once. Given the optional input `REF_CACHED_TOKENS` (``(seq (B, K, L, D), mask
(B, K, L))`` precomputed for ``reference_captions``, e.g. by the datamodule's ``text_cache``), it
uses those instead of running the encoder, after the checks of `TextTokenContext`'s cached input
(shape, each row's token count against its caption's tokenization).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tta.data.text_cache import REF_T5_TOKENS_KEY
from tta.encoders.base import TextEncoder
from tta.generators.conditioning.base import Conditioner
from tta.generators.conditioning.text_tokens import TextTokenContext, check_cached_tokens
from tta.nn.mrc_unet import PROMPT, REFCAP, REFERENCES
from tta.nn.reference_align import fit_size
from tta.registry import register

__all__ = ["LATENT_SIZE", "PROMPT", "REFCAP", "REFERENCES", "REF_CACHED_TOKENS", "REF_CAPTIONS", "REF_LATENTS",
           "REF_PRESENT", "ReferenceCaptions", "ReferenceLatents", "share_text_encoder"]

REF_LATENTS = "reference_latents"
REF_PRESENT = "reference_present"
REF_CAPTIONS = "reference_captions"
#: optional input: ``(seq (B, K, L, D), mask (B, K, L))`` precomputed for the ``reference_captions``
REF_CACHED_TOKENS = "reference_cached_tokens"
LATENT_SIZE = "latent_size"


def _present(inputs: Mapping[str, Any], name: str, batch: int | None = None) -> torch.Tensor:
    present = inputs[REF_PRESENT]
    if not torch.is_tensor(present) or present.dtype != torch.bool or present.dim() != 2 or (
            batch is not None and present.shape[0] != batch):
        shape = tuple(present.shape) if torch.is_tensor(present) else type(present).__name__
        raise ValueError(f"conditioner {name!r}: input {REF_PRESENT!r} must be a bool tensor (B, K)"
                         + (f" with B = {batch}" if batch is not None else "") + f", got {shape}")
    return present


@register("conditioner", "reference_latents")
class ReferenceLatents(Conditioner):
    """The K reference latents as R ``(B, C, K * T_r, F)`` (see the module docstring).

    Args:
        channels: latent channels C (the VAE's; the MRC UNet's ``reference_dims["references"]``,
            or the extra input channels of a plain UNet with ``route="concat"``).
        route: ``"reference"`` (MRC UNet) or ``"concat"`` (R brought to the latent's size by
            adaptive average pooling, `tta.nn.reference_align.fit_size`: latent frame i averages
            the K * T_r / T reference frames it covers, so reference k covers the k-th K-th of
            the target's timeline; absent references are zeros).
        dropout: classifier-free-guidance dropout (None: the model's ``cfg_dropout``). DreamAudio
            configs give 0: reference dropping (the training augmentation) drops latents and
            captions together instead.
    """

    route = "reference"
    reads = (REF_LATENTS, REF_PRESENT)

    def __init__(self, channels: int = 8, route: str = "reference", dropout: float | None = None) -> None:
        if route not in ("reference", "concat"):
            raise ValueError(f"ReferenceLatents: route must be 'reference' or 'concat', got {route!r}")
        super().__init__(dropout, route)  # type: ignore[arg-type]
        if channels <= 0:
            raise ValueError(f"ReferenceLatents: channels must be positive, got {channels}")
        self.dim = int(channels)
        if route == "concat":
            self.reads = (*self.reads, LATENT_SIZE)

    def encode(self, inputs: Mapping[str, Any], device: torch.device) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        latents = inputs[REF_LATENTS]
        if not torch.is_tensor(latents) or latents.dim() != 5 or latents.shape[2] != self.dim:
            shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(f"conditioner {self.name!r}: input {REF_LATENTS!r} must be (B, K, C={self.dim}, T_r, F), "
                             f"got {shape}")
        b, k, c, t, f = latents.shape
        present = _present(inputs, self.name, b).to(device)
        if present.shape[1] != k:
            raise ValueError(f"conditioner {self.name!r}: {REF_PRESENT!r} has {present.shape[1]} references per "
                             f"sample, {REF_LATENTS!r} {k}")
        z = latents.to(device, torch.float32) * present[:, :, None, None, None]  # absent references: zeros
        r = z.permute(0, 2, 1, 3, 4).reshape(b, c, k * t, f)
        any_present = present.any(dim=1)
        if self.route == "reference":
            return r, any_present
        size = inputs[LATENT_SIZE]
        return fit_size(r, size) * any_present[:, None, None, None]


@register("conditioner", "reference_captions")
class ReferenceCaptions(Conditioner):
    """The K reference captions' token states concatenated: ``(B, K * L, D)`` with mask (context).

    Args:
        encoder: a frozen `TextEncoder`; None: shared with another conditioner by
            `share_text_encoder` (not a submodule then: its weights are stored once, there).
        dropout: classifier-free-guidance dropout (None: the model's ``cfg_dropout``).
    """

    route = "context"
    reads = (REF_CAPTIONS, REF_PRESENT)
    reads_optional = (REF_CACHED_TOKENS,)
    cached_tokens_key = REF_T5_TOKENS_KEY

    def __init__(self, encoder: TextEncoder | None = None, dropout: float | None = None) -> None:
        super().__init__(dropout)
        if encoder is not None and not isinstance(encoder, TextEncoder):
            raise TypeError(f"ReferenceCaptions: encoder must be a TextEncoder, got {type(encoder).__name__}")
        self.encoder = encoder
        if encoder is not None:
            encoder.requires_grad_(False)
            self.dim = int(encoder.dim)
        self.__dict__["_shared"] = None

    def share(self, encoder: TextEncoder) -> None:
        """Use ``encoder`` (another conditioner's, not registered here); only without an own one."""
        if self.encoder is not None:
            raise ValueError(f"conditioner {self.name!r} has its own text encoder; it cannot share another")
        self.__dict__["_shared"] = encoder
        self.dim = int(encoder.dim)

    @property
    def text_encoder(self) -> TextEncoder:
        """The encoder in use (own or shared)."""
        enc = self.encoder if self.encoder is not None else self.__dict__["_shared"]
        if enc is None:
            raise ValueError(f"conditioner {self.name!r} has no text encoder: give it one, or build it through a "
                             "module that shares the prompt's (share_text_encoder)")
        return enc

    def train(self, mode: bool = True) -> ReferenceCaptions:
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # frozen
        return self

    def encode(self, inputs: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        present = _present(inputs, self.name)
        b, k = present.shape
        captions = inputs[REF_CAPTIONS]
        if len(captions) != b or any(len(row) != k for row in captions):
            raise ValueError(f"conditioner {self.name!r}: {REF_CAPTIONS!r} must be {b} lists of {k} captions, "
                             f"got lengths {[len(row) for row in captions]}")
        cached = inputs.get(REF_CACHED_TOKENS)
        if cached is not None:  # states of every caption as given (absent ones masked out below)
            seq, mask = self._check_cached(cached, captions, device)
        else:
            flat = [str(c) if p else "" for row, keep in zip(captions, present.tolist()) for c, p in zip(row, keep)]
            with torch.no_grad():
                emb = self.text_encoder(flat)
            seq, mask = emb.seq.float().to(device), emb.mask.to(device)
        mask = mask & present.to(device).reshape(-1, 1)
        length = seq.shape[1]
        return seq.reshape(b, k * length, seq.shape[-1]), mask.reshape(b, k * length)

    def _check_cached(self, cached: tuple[torch.Tensor, torch.Tensor], captions: list[list[str]],
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The precomputed ``(seq (B*K, L, D), mask (B*K, L))`` of the B x K ``captions``, checked."""
        seq, mask = cached
        b, k = len(captions), len(captions[0]) if captions else 0
        where = f"conditioner {self.name!r}: input {REF_CACHED_TOKENS!r}"
        if seq.dim() != 4 or mask.dim() != 3 or tuple(seq.shape[:2]) != (b, k):
            raise ValueError(f"{where} must be (seq (B={b}, K={k}, L, D), mask (B, K, L)), got {tuple(seq.shape)} "
                             f"and {tuple(mask.shape)}")
        flat = [str(c) for row in captions for c in row]
        return check_cached_tokens((seq.flatten(0, 1), mask.flatten(0, 1)), flat, self.text_encoder, self.dim,
                                   device, where)


def share_text_encoder(conditioners: Mapping[str, Conditioner], source: str = PROMPT) -> None:
    """Give every `ReferenceCaptions` without an encoder the encoder of ``conditioners[source]``
    (a `TextTokenContext`): one Flan-T5 for the prompt and the reference captions."""
    waiting = [n for n, c in conditioners.items() if isinstance(c, ReferenceCaptions) and c.encoder is None]
    if not waiting:
        return
    owner = conditioners.get(source)
    if not isinstance(owner, TextTokenContext):
        raise TypeError(f"conditioner(s) {waiting} have no text encoder and share the one of conditioner "
                        f"{source!r}, which must be a text_token_context (got "
                        f"{type(owner).__name__ if owner is not None else 'none'})")
    for name in waiting:
        conditioners[name].share(owner.encoder)
