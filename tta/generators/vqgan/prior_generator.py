"""`CodePriorGenerator`: the pure (non-Lightning) inference model of the text-to-sound VQGAN.

Prompts -> text prefix (`PriorTextFeatures`) -> codes drawn by the GPT2 prior (`GPT2CodePrior`,
time-major order) -> code grid -> frozen VQGAN decoder -> log-mel. The LightningModule
(`tta.generators.vqgan.prior.VQGANPriorModule`) holds the same submodules under the same names
(``frontend``, ``vqgan``, ``text``, ``prior``), so a ``vqgan_prior`` checkpoint's state dict is
also this model's; the pipeline (`tta.pipelines.vqgan`) samples this model.

**Durations.** A clip of ``d`` seconds takes ``frames = ceil(d * sr / hop)`` mel frames and
``columns = ceil(frames / f)`` code columns (``f``: the VQGAN's downsampling), i.e. ``columns *
rows`` codes (``rows = n_mels / f``); the decoded mel is cropped to ``frames``. The prior reads at
most ``max_codes`` codes, so the longest clip is ``max_codes / rows`` columns (`max_duration`;
the paper: 250 codes = 5 rows x 50 columns = 10 s); a longer one is refused by name.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tta.data.mel import MelConfig, MelFrontend
from tta.generators.vae.codec import image_to_mel, mel_to_image
from tta.generators.vqgan.network import SpectrogramVQGAN
from tta.generators.vqgan.prior_text import PriorTextFeatures
from tta.nn.code_prior import GPT2CodePrior

__all__ = ["CodePriorGenerator", "check_prior_fits"]


def check_prior_fits(prior: GPT2CodePrior, vqgan: SpectrogramVQGAN, text: PriorTextFeatures, mel: MelConfig) -> int:
    """Refuse, by name, a prior whose vocabulary, grid or prefix does not fit the VQGAN, the mels
    and the text features; the code grid's rows (``n_mels / f``)."""
    if prior.num_codes != vqgan.num_codes:
        raise ValueError(f"prior.num_codes {prior.num_codes} != the VQGAN's codebook size {vqgan.num_codes}")
    f = vqgan.downsample_factor
    if mel.n_mels % f:
        raise ValueError(f"n_mels {mel.n_mels} is not divisible by the VQGAN's downsample factor {f}")
    rows = mel.n_mels // f
    if prior.max_codes % rows:
        raise ValueError(f"prior.max_codes {prior.max_codes} is not a whole number of code columns of "
                         f"{rows} rows (n_mels {mel.n_mels} / {f})")  # fmt: skip
    if prior.feature_dim != text.dim:
        raise ValueError(f"prior.feature_dim {prior.feature_dim} != the text features' width {text.dim} "
                         f"(text_features={text.mode!r})")  # fmt: skip
    if prior.prefix_length != text.length:
        raise ValueError(f"prior.prefix_length {prior.prefix_length} != the text prefix length {text.length} "
                         f"(text_features={text.mode!r}: 'sequence' uses text_length, the others 1)")  # fmt: skip
    return rows


class CodePriorGenerator(nn.Module):
    """Prompts -> codes -> log-mels (see the module docstring).

    Args:
        frontend: the mel front-end of the data (and of the VQGAN).
        vqgan: the frozen `SpectrogramVQGAN`.
        text: the text prefix (frozen encoder or the No-Feat vector).
        prior: the GPT2 code prior.
        sampling: default ``top_k`` / ``top_p`` / ``temperature`` (the module's).
    """

    def __init__(self, frontend: MelFrontend, vqgan: SpectrogramVQGAN, text: PriorTextFeatures, prior: GPT2CodePrior,
                 sampling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.frontend, self.vqgan, self.text, self.prior = frontend, vqgan, text, prior
        self.rows = check_prior_fits(prior, vqgan, text, frontend.config)
        self.sampling = dict(sampling or {})

    @property
    def mel_config(self) -> MelConfig:
        return self.frontend.config

    @property
    def device(self) -> torch.device:
        return self.prior.head.weight.device

    def components(self) -> dict[str, nn.Module]:
        """The parts a pipeline folder stores as separate files (the rest goes to ``conditioners``)."""
        parts = {"prior": self.prior, "vqgan": self.vqgan}
        return parts if self.text.encoder is None else {**parts, "text_encoder": self.text.encoder}

    # ---------------------------------------------------------------- durations
    @property
    def max_columns(self) -> int:
        """Most code columns the prior reads (``max_codes / rows``)."""
        return self.prior.max_codes // self.rows

    @property
    def max_duration(self) -> float:
        """Seconds covered by `max_columns` columns."""
        m = self.mel_config
        return self.max_columns * self.vqgan.downsample_factor * m.hop_length / m.sample_rate

    def columns_for(self, frames: int) -> int:
        """Code columns covering ``frames`` mel frames; refused beyond `max_columns`."""
        columns = math.ceil(frames / self.vqgan.downsample_factor)
        if columns > self.max_columns:
            raise ValueError(
                f"{frames} mel frames need {columns} code columns, but the prior was trained for at most "
                f"{self.max_columns} columns (max_codes {self.prior.max_codes} = {self.rows} rows x {self.max_columns}), "
                f"i.e. {self.max_duration:g} s"
            )
        return columns

    def frames_for(self, seconds: float) -> int:
        """Mel frames covering ``seconds`` of audio (refused beyond `max_duration`)."""
        if not seconds > 0:
            raise ValueError(f"duration must be positive, got {seconds}")
        m = self.mel_config
        frames = max(1, math.ceil(round(seconds * m.sample_rate) / m.hop_length))
        self.columns_for(frames)
        return frames

    def codes_for(self, frames: int) -> int:
        """Codes the prior draws for ``frames`` mel frames (one sampling step each)."""
        return self.columns_for(frames) * self.rows

    # ------------------------------------------------------------- mel <-> codes
    @torch.no_grad()
    def encode_codes(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mels ``(B, n_mels, frames)`` -> time-major code sequences ``(B, columns * rows)`` (eval mode,
        float32 even under autocast, so the codes are the VQGAN's own)."""
        was = self.vqgan.training
        self.vqgan.eval()
        try:
            image, _ = mel_to_image(mel.float(), self.vqgan.downsample_factor, self.mel_config.log_floor)
            with torch.autocast(device_type=self.device.type, enabled=False):
                grid = self.vqgan.encode(image.to(self.device))[1]
        finally:
            self.vqgan.train(was)
        return self.vqgan.indices_to_sequence(grid)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """Time-major code sequences ``(B, columns * rows)`` -> log-mels ``(B, n_mels, frames)``."""
        if codes.dim() != 2 or codes.shape[1] % self.rows:
            raise ValueError(f"codes must be (B, columns * {self.rows}), got {tuple(codes.shape)}")
        shape = (codes.shape[1] // self.rows, self.rows)
        return image_to_mel(self.vqgan.decode_indices(codes.to(self.device), shape), frames)

    # ------------------------------------------------------------------ sampling
    def sampling_options(self, **given: Any) -> dict[str, Any]:
        """``top_k`` / ``top_p`` / ``temperature`` given (None: the defaults of `sampling`)."""
        out = {"top_k": None, "top_p": None, "temperature": 1.0, **self.sampling}
        out.update({k: v for k, v in given.items() if v is not None})
        return out

    @torch.no_grad()
    def generate_codes(self, captions: list[str], n_codes: int, *, generator: Any = None, guidance: float = 1.0,
                       greedy: bool = False, use_cache: bool = True, **options: Any) -> torch.Tensor:
        """Codes ``(B, n_codes)`` for ``captions`` (``options``: `sampling_options` overrides;
        ``generator``: one CPU generator, or one per caption)."""
        feats, mask = self.text(list(captions))
        opts = self.sampling_options(**options)
        return self.prior.sample(feats.to(self.device), n_codes, mask.to(self.device), temperature=opts["temperature"],
                                 top_k=opts["top_k"], top_p=opts["top_p"], greedy=greedy, guidance=guidance,
                                 generator=generator, use_cache=use_cache)

    @torch.no_grad()
    def generate_mel(self, captions: list[str], frames: int, *, seed: int | list[int] = 0, guidance: float = 1.0,
                     greedy: bool = False, **options: Any) -> torch.Tensor:
        """Log-mels ``(B, n_mels, frames)`` for ``captions``; ``seed``: one for the batch, or one per
        caption (each caption's codes then drawn from its own generator)."""
        if isinstance(seed, int):
            gens: Any = torch.Generator().manual_seed(seed)
        else:
            if len(seed) != len(captions):
                raise ValueError(f"{len(seed)} seeds for {len(captions)} captions")
            gens = [torch.Generator().manual_seed(int(s)) for s in seed]
        codes = self.generate_codes(captions, self.codes_for(frames), generator=gens, guidance=guidance,
                                    greedy=greedy, **options)
        return self.decode_codes(codes, frames)
