"""DreamAudio's multi-reference customization (MRC) UNet, composed of `UNetModel` and its path builders.

DreamAudio (Sec. III-C2, Fig. 3) conditions a latent UNet on K reference clips: the VAE latents
``R = [r_1, ..., r_K]`` concatenated along time and the Flan-T5 states of their captions
``E = [e_1, ..., e_K]`` concatenated along the sequence. ControlNet-style::

    z_l, C (prompt) --> feature-encoding path: UNetModel conv_in / down / mid (cross-attn "prompt")
                                      | skips, mid                      (+)  <-- zero 1x1 convs <-- fit to the skip's size
                                      v                                  |                             ^
                        decoder: UNetModel up path, cross-attn "prompt" AND "refcap" (E) --> output
    R, E (refcap) ---> reference-extraction path: same encoder structure (conv_in / down / mid,
                       cross-attn "refcap"), independent weights -> skips, mid ---------------------'

* The feature-encoding path plus decoder is one plain `UNetModel` (``self.unet``) whose
  ``context_dims`` gain ``refcap`` (width ``ref_context_dim``) restricted to the decoder by
  ``context_stages``: "the target prompt and the reference captions are given as conditions
  through two cross-attention blocks" in every decoder transformer block.
* The reference-extraction path (``self.reference``, a `ReferenceEncoder`) is the encoder half of a
  `UNetModel` built with the same arguments (input channels ``ref_channels``, its only
  cross-attention ``refcap``), with its own time embedding, as ControlNet's copy.
* Each of its skips and its middle output is brought to the size of the matching feature-path
  tensor (`fit_size`: adaptive average pooling; identity when the sizes agree, e.g. one reference
  as long as the latent), projected by `ZeroResidualProjections` and added to the decoder's skips
  / middle input through ``UNetModel.decode``'s residuals: a fresh MRC UNet is exactly its UNet.
* ``share_encoder=True`` is the paper's DreamAudio-SEncoder: no second path; the references run
  through the feature path's own encoder (whose transformer blocks then also hold the ``refcap``
  cross-attention, used by the reference pass only; the latent pass attends to the prompt only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tta.nn.attention import KeyMask
from tta.nn.reference_align import fit_size
from tta.nn.transformer import check_context_names
from tta.nn.unet import UNetModel
from tta.nn.unet_paths import STAGES, UNetResiduals, ZeroResidualProjections
from tta.registry import register
from tta.utils.weights import WeightMismatchError, describe_mismatch

__all__ = ["PROMPT", "REFCAP", "REFERENCES", "MRCUNet", "ReferenceEncoder"]

#: context name of the prompt (the default ``context_dims``) and of the reference captions E
PROMPT = "prompt"
REFCAP = "refcap"
#: name of the reference latents R on the conditioners' "reference" route (``reference_dims``)
REFERENCES = "references"
_ENCODER_STAGES = ("down", "mid")

Context = Mapping[str, tuple[torch.Tensor, "torch.Tensor | None"]]
PreparedContext = dict[str, tuple[torch.Tensor, KeyMask]]


class ReferenceEncoder(UNetModel):
    """The encoder half of a `UNetModel`: ``conv_in``, time (+ FiLM) embedding, down path, middle block.

    Built by `UNetModel`'s own constructor (the same arguments give the same encoder structure, so
    DreamAudio's two encoder paths cannot drift apart); the decoder it would have is dropped.
    ``forward`` returns the encoder features instead of a prediction.
    """

    def __init__(self, **unet_kwargs: Any) -> None:
        super().__init__(**unet_kwargs)
        del self.up_blocks, self.conv_norm_out, self.conv_out  # an encoder path has no decoder

    def decode(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Not available: a `ReferenceEncoder` has no decoder."""
        raise TypeError("ReferenceEncoder is an encoder path and has no decoder")

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        film: torch.Tensor | None = None,
        context: Context | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`embed`, `prepare_context`, `encode` -> (middle output, skips in push order)."""
        self._check_input(x)
        b = x.shape[0]
        return self.encode(x, self.embed(timesteps, film, b, x.dtype), self.prepare_context(context, b))


@register("network", "mrc_unet")
class MRCUNet(nn.Module):
    """DreamAudio's MRC UNet (see the module docstring); a drop-in for `UNetModel` plus ``references``.

    Args:
        in_channels ... context_stages: as `UNetModel` (they build the feature path and, minus
            ``in_channels`` / ``out_channels``, the reference path). Defaults are DreamAudio's
            (hidden 96, AudioLDM-S layout, Flan-T5 prompt cross-attention, no FiLM, no
            context-free ``attn2``). ``context_dims`` must not name ``refcap``.
        ref_channels: channels of the reference latents R (default: ``out_channels``, the latent).
        ref_context_dim: width of the reference-caption states E (context ``refcap``).
        share_encoder: DreamAudio-SEncoder: the references reuse the feature path's encoder
            weights (needs ``ref_channels == in_channels``).

    Attributes:
        unet: the feature-encoding path and decoder (a plain `UNetModel`).
        reference: the reference-extraction path (`ReferenceEncoder`), None with ``share_encoder``.
        projections: the zero-initialised 1x1 convs (`ZeroResidualProjections`).
    """

    def __init__(
        self,
        in_channels: int = 8,
        out_channels: int = 8,
        model_channels: int = 96,
        channel_mult: Sequence[int] = (1, 2, 3, 5),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (8, 4, 2),
        num_head_channels: int = 32,
        film_dim: int = 0,
        self_attn2: bool = False,
        context_dims: dict[str, int] | None = None,
        dropout: float = 0.0,
        num_groups: int = 32,
        gradient_checkpointing: bool = False,
        num_heads: int | Sequence[int] | None = None,
        transformer_depth: int = 1,
        use_linear_projection: bool = False,
        context_stages: dict[str, Sequence[str]] | None = None,
        ref_channels: int | None = None,
        ref_context_dim: int = 1024,
        share_encoder: bool = False,
    ) -> None:
        super().__init__()
        dims = check_context_names({PROMPT: 1024} if context_dims is None else context_dims)
        stages = dict(context_stages or {})
        if REFCAP in dims or REFCAP in stages:
            raise ValueError(
                f"MRCUNet adds the reference-caption cross-attention {REFCAP!r} itself (width ref_context_dim); "
                f"remove {REFCAP!r} from context_dims / context_stages"
            )
        self.ref_channels = int(out_channels if ref_channels is None else ref_channels)
        self.ref_context_dim = int(ref_context_dim)
        self.share_encoder = bool(share_encoder)
        if self.ref_channels <= 0:
            raise ValueError(f"MRCUNet: ref_channels must be positive, got {self.ref_channels}")
        if share_encoder and self.ref_channels != in_channels:
            raise ValueError(
                f"MRCUNet(share_encoder=True) runs the references through the feature path's conv_in, so "
                f"ref_channels ({self.ref_channels}) must equal in_channels ({in_channels})"
            )
        common: dict[str, Any] = {
            "model_channels": model_channels,
            "channel_mult": channel_mult,
            "num_res_blocks": num_res_blocks,
            "attention_resolutions": attention_resolutions,
            "num_head_channels": num_head_channels,
            "film_dim": film_dim,
            "self_attn2": self_attn2,
            "dropout": dropout,
            "num_groups": num_groups,
            "num_heads": num_heads,
            "transformer_depth": transformer_depth,
            "use_linear_projection": use_linear_projection,
        }
        self.unet = UNetModel(
            in_channels,
            out_channels,
            context_dims={**dims, REFCAP: self.ref_context_dim},
            context_stages={**stages, REFCAP: list(STAGES) if share_encoder else ["up"]},
            **common,
        )
        self.reference: ReferenceEncoder | None = None
        if not share_encoder:
            self.reference = ReferenceEncoder(
                in_channels=self.ref_channels,
                out_channels=self.ref_channels,
                context_dims={REFCAP: self.ref_context_dim},
                context_stages={REFCAP: list(_ENCODER_STAGES)},
                **common,
            )
        path = self._reference_path()
        self.projections = ZeroResidualProjections(
            path.skip_channels, path.mid_channels, self.unet.skip_channels, self.unet.mid_channels
        )
        self.gradient_checkpointing = gradient_checkpointing

    # ------------------------------------------------------------------ UNetModel's attributes
    @property
    def in_channels(self) -> int:
        """Channels of the noisy latent input."""
        return self.unet.in_channels

    @property
    def out_channels(self) -> int:
        """Channels of the prediction."""
        return self.unet.out_channels

    @property
    def film_dim(self) -> int:
        """FiLM width (0 = none)."""
        return self.unet.film_dim

    @property
    def context_dims(self) -> dict[str, int]:
        """Every named cross-attention width, ``refcap`` included."""
        return self.unet.context_dims

    @property
    def reference_dims(self) -> dict[str, int]:
        """``{"references": ref_channels}``: the reference route a conditioner feeds (the
        conditioners' ``reference={"references": (R, present)}``, see `forward`)."""
        return {REFERENCES: self.ref_channels}

    @property
    def downsample_factor(self) -> int:
        """H and W (of the latent and of the references) must be divisible by this."""
        return self.unet.downsample_factor

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether resnets and attentions of both paths are recomputed in backward."""
        return self.unet.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.unet.gradient_checkpointing = value
        if self.reference is not None:
            self.reference.gradient_checkpointing = value

    def _reference_path(self) -> UNetModel:
        return self.unet if self.reference is None else self.reference

    # ------------------------------------------------------------------ weights
    def load_unet(self, unet: UNetModel | Mapping[str, torch.Tensor], source: str = "UNetModel") -> None:
        """Load a plain `UNetModel` (or its state dict) of the same layout into the feature path.

        Only the ``refcap`` cross-attentions may be absent (they keep their zero-output init, so the
        MRC UNet then predicts exactly what that UNet does); any other missing, unexpected or
        mis-shaped key raises `WeightMismatchError`.
        """
        state = dict(unet.state_dict() if isinstance(unet, nn.Module) else unet)
        own = self.unet.state_dict()
        refcap = (f".cross_attns.{REFCAP}.", f".cross_norms.{REFCAP}.")
        missing = sorted(k for k in set(own) - set(state) if not any(r in k for r in refcap))
        unexpected = sorted(set(state) - set(own))
        shapes = [
            f"{k}: {tuple(v.shape)} vs expected {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and tuple(v.shape) != tuple(own[k].shape)
        ]
        problems = describe_mismatch(missing=missing, unexpected=unexpected, shapes=shapes)
        if problems:
            raise WeightMismatchError(f"cannot load {source} into MRCUNet.unet: {problems}")
        self.unet.load_state_dict({**own, **state}, strict=True)

    # ------------------------------------------------------------------ references
    def _check_references(self, references: torch.Tensor, batch: int) -> None:
        if references.ndim != 4 or references.shape[0] != batch or references.shape[1] != self.ref_channels:
            raise ValueError(
                f"MRCUNet: references must have shape (B={batch}, ref_channels={self.ref_channels}, K*T_r, F) "
                f"(K reference latents concatenated along time), got {tuple(references.shape)}"
            )
        length, freq = references.shape[2:]
        f = self.downsample_factor
        if length == 0 or length % f or freq % f:
            raise ValueError(
                f"MRCUNet: references' time length {length} and frequency size {freq} must be positive and "
                f"divisible by {f} (2 ** (levels - 1)); pad the reference latents"
            )

    def _encode_references(
        self, references: torch.Tensor, emb: torch.Tensor | None, ctx: PreparedContext,
        timesteps: torch.Tensor, film: torch.Tensor | None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        path = self._reference_path()
        if emb is None or self.reference is not None:  # a separate path has its own time embedding
            emb = path.embed(timesteps, film, references.shape[0], references.dtype)
        refcap = {REFCAP: ctx[REFCAP]} if REFCAP in ctx else {}
        return path.encode(references, emb, refcap)

    def _prepare(self, context: Context | None, batch: int, references: bool) -> PreparedContext:
        if references and (not context or REFCAP not in context):
            raise ValueError(
                f"MRCUNet: references were given but context has no {REFCAP!r} entry (the reference captions "
                f"E, (seq (B, L, {self.ref_context_dim}), mask (B, L))); pass an L = 0 sequence for none"
            )
        return self.unet.prepare_context(context, batch)

    def encode_references(
        self,
        references: torch.Tensor,
        timesteps: torch.Tensor,
        film: torch.Tensor | None = None,
        context: Context | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Reference-extraction path alone, at the references' own resolution.

        Args:
            references: R (B, ref_channels, K * T_r, F).
            timesteps, film: as `forward`.
            context: must hold ``refcap`` (other names are ignored).
        Returns:
            (middle output, skips in push order), the channels of the reference path.
        """
        b = references.shape[0]
        self._check_references(references, b)
        ctx = self._prepare(context, b, references=True)
        return self._encode_references(references, None, ctx, timesteps, film)

    def reference_residuals(
        self,
        references: torch.Tensor,
        target_mid: torch.Tensor,
        target_skips: Sequence[torch.Tensor],
        emb: torch.Tensor | None,
        ctx: PreparedContext,
        timesteps: torch.Tensor,
        film: torch.Tensor | None = None,
        reference_mask: torch.Tensor | None = None,
    ) -> UNetResiduals:
        """Reference features fitted to the feature path's skips / middle output and zero-projected.

        ``emb`` is the feature path's embedding (reused by a shared encoder), ``ctx`` the prepared
        context; rows of ``reference_mask`` (B,) that are False get exactly zero residuals.
        """
        mid, skips = self._encode_references(references, emb, ctx, timesteps, film)
        skips = [fit_size(s, t.shape[-2:]) for s, t in zip(skips, target_skips)]
        res = self.projections(skips, fit_size(mid, target_mid.shape[-2:]))
        if reference_mask is None:
            return res
        keep = reference_mask.view(-1, 1, 1, 1)
        zero = torch.zeros((), dtype=res.skips[0].dtype, device=res.skips[0].device)
        return UNetResiduals(
            [torch.where(keep, r, zero) for r in res.skips],
            None if res.mid is None else torch.where(keep, res.mid, zero),
        )

    # ------------------------------------------------------------------ forward
    @staticmethod
    def _unpack_reference(
        reference: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        references: torch.Tensor | None,
        reference_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, mask)`` of the route value ``{"references": (R, mask)}``."""
        if references is not None or reference_mask is not None:
            raise ValueError("MRCUNet: give the references either as reference={'references': (R, mask)} or as "
                             "references= / reference_mask=, not both")
        if set(reference) != {REFERENCES}:
            raise ValueError(f"MRCUNet: reference must hold exactly {REFERENCES!r} (the reference latents R and "
                             f"their presence mask), got {sorted(reference)}")
        value = reference[REFERENCES]
        if not isinstance(value, tuple) or len(value) != 2:
            raise ValueError(f"MRCUNet: reference[{REFERENCES!r}] must be (R (B, C, K*T_r, F), present (B,) bool)")
        return value

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        film: torch.Tensor | None = None,
        context: Context | None = None,
        references: torch.Tensor | None = None,
        reference_mask: torch.Tensor | None = None,
        reference: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Predict from the noisy latent, customised by the references.

        Args:
            x, timesteps, film: as `UNetModel.forward`.
            context: ``{"prompt": (C, mask), "refcap": (E, mask), ...}`` as `UNetModel.forward`;
                ``refcap`` is required with ``references`` (an L = 0 sequence means no captions).
            references: R (B, ref_channels, K * T_r, F), K reference latents concatenated along
                time (any K and length: each level's features are fitted to the latent's); None
                (no / dropped references) skips the reference path: the output is the UNet's.
            reference_mask: (B,) bool, False = that sample has no references (zero residuals),
                e.g. reference dropping or the unconditional half of classifier-free guidance.
            reference: the conditioners' form of the same, ``{"references": (R, reference_mask)}``
                (the "reference" route of `tta.generators.conditioning`; what
                `LatentDiffusion.unet_kwargs` passes); not together with ``references``.
        Returns:
            (B, out_channels, H, W).
        """
        if reference is not None:
            references, reference_mask = self._unpack_reference(reference, references, reference_mask)
        b = x.shape[0]
        unet = self.unet
        if references is None:
            if reference_mask is not None:
                raise ValueError("MRCUNet: reference_mask was given without references")
        else:
            self._check_references(references, b)
            if reference_mask is not None and (
                reference_mask.dtype != torch.bool or tuple(reference_mask.shape) != (b,)
            ):
                raise ValueError(
                    f"MRCUNet: reference_mask must be a bool tensor of shape (B,) = ({b},), "
                    f"got {reference_mask.dtype} {tuple(reference_mask.shape)}"
                )
        emb = unet.embed(timesteps, film, b, x.dtype)
        ctx = self._prepare(context, b, references is not None)
        h, skips = unet.encode(x, emb, {k: v for k, v in ctx.items() if k != REFCAP})
        residuals = None
        if references is not None:
            residuals = self.reference_residuals(references, h, skips, emb, ctx, timesteps, film, reference_mask)
        return unet.decode(h, skips, emb, ctx, residuals)
