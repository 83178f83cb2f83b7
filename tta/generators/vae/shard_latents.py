"""Frozen-model arrays cached in shards (``tta data shard --with latent --vae CKPT``) and their check.

`vae_latent_source` turns a trained ``vae`` checkpoint into a `tta.data.shards_write.ArraySource`:
the posterior parameters (mean and log-variance, unscaled; `LatentCodec.moments`) of each clip's
fixed training segment, exactly what `LatentDiffusionModule` computes live (and what its
in-memory ``cache_frozen`` stores), so training still draws a fresh posterior sample every step.
The index records the VAE's weight fingerprint; `check_cached_latents` refuses, at ``tta fit``,
cached latents made by another VAE than the model's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from tta.data.mel import MelConfig
from tta.data.shards_write import ArraySource
from tta.registry import register
from tta.training.frozen_cache import check_cache_producer

__all__ = ["LATENT_KEY", "check_cached_latents", "vae_latent_source"]

#: batch key of cached VAE posterior moments ``(B, 2C, frames / f, n_mels / f)``
LATENT_KEY = "latent_moments"


@register("encoder", "vae_latents")  # `tta data shard --with latent` finds it by name: tta/data imports no model
def vae_latent_source(checkpoint: str | os.PathLike, mel: MelConfig) -> ArraySource:
    """The ``latent`` array source of a ``vae`` checkpoint (its mel front-end must equal ``mel``)."""
    from tta.generators.vae.codec import LatentCodec
    from tta.retrieval.features import module_fingerprint
    from tta.training.loading import load_trained_part

    module, vae = load_trained_part(checkpoint, "autoencoder", "vae")
    module.mel_config.check_compatible(mel, f"the VAE of {checkpoint} and the shards' --mel")
    codec = LatentCodec(vae, module.mel_config, float(module.scale_factor))
    meta = {"kind": "vae_moments", "batch_key": LATENT_KEY, "checkpoint": Path(checkpoint).name,
            "sha256": module_fingerprint(vae), "latent_channels": codec.latent_channels}
    return ArraySource(fn=codec.moments, meta=meta, module=codec)


def check_cached_latents(autoencoder: nn.Module, datamodule: Any) -> None:
    """Raise ValueError when ``datamodule`` serves cached latents of a VAE other than ``autoencoder``."""
    sources = datamodule.cached_sources() if hasattr(datamodule, "cached_sources") else {}
    if LATENT_KEY not in sources:
        return
    from tta.retrieval.features import module_fingerprint

    check_cache_producer(datamodule, LATENT_KEY, {"sha256": module_fingerprint(autoencoder)}, "latents", "VAE",
                         "Reshard with `tta data shard --with latent --vae` of this VAE, or set the datamodule's "
                         "use_cached without 'latent'")
