"""The audio or text tower of a trained CLAP checkpoint as a stand-alone encoder.

A config can say "the audio encoder of the CLAP checkpoint at PATH"::

    audio_encoder:
      class_path: clap_audio_tower
      init_args: {checkpoint: outputs/clap/checkpoints/last.ckpt}

The checkpoint (written by ``tta fit`` with the ``clap_trainer`` module) is rebuilt with
`tta.training.loading.load_trained` (strict weights, its own config) and only the requested
tower is kept, frozen. ``seq`` and ``pooled`` are the tower's own outputs; with ``project=True``
``pooled`` is instead the L2-normalised joint-space embedding (the vectors of ``tta index
build``); ``seq`` then keeps the tower's width, recorded as ``seq_dim``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tta.encoders.base import AudioEmbedding, AudioEncoder, TextEmbedding, TextEncoder
from tta.registry import register

log = logging.getLogger(__name__)


def load_clap_network(
    checkpoint: str | os.PathLike, use_ema: bool = False
) -> nn.Module:
    """The `CLAP` network of a ``clap_trainer`` checkpoint (TypeError for another module)."""
    from tta.training.loading import load_trained_part

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"CLAP checkpoint not found: {path}")
    return load_trained_part(path, "clap", "CLAP (clap_trainer)", use_ema=use_ema)[1]


def _take_tower(tower: nn.Module, side: str, checkpoint: str, use_ema: bool, project: bool) -> None:
    """Attach the ``side`` (audio/text) encoder of a CLAP checkpoint (and its projection) to ``tower``, frozen."""
    clap = load_clap_network(checkpoint, use_ema=use_ema)
    tower.checkpoint = str(checkpoint)
    tower.project = bool(project)
    tower.encoder = getattr(clap, f"{side}_encoder")
    tower.projection = getattr(clap, f"{side}_projection") if project else None
    tower.dim = int(clap.joint_dim if project else tower.encoder.dim)
    tower.freeze()


@register("encoder", "clap_audio_tower")
class CLAPAudioTower(AudioEncoder):
    """Audio encoder of a CLAP checkpoint: waveform ``(B, T)`` -> `AudioEmbedding` (frozen).

    Args:
        checkpoint: a ``clap_trainer`` checkpoint written by ``tta fit``.
        use_ema: take the EMA weights (the checkpoint must hold them).
        project: ``pooled`` = the normalised joint-space embedding instead of the tower's output.
    """

    def __init__(self, checkpoint: str, use_ema: bool = False, project: bool = False) -> None:
        super().__init__()
        _take_tower(self, "audio", checkpoint, use_ema, project)
        self.sample_rate = int(self.encoder.sample_rate)
        log.info("audio tower of %s: %s, dim %d, %d Hz", checkpoint, type(self.encoder).__name__, self.dim,
                 self.sample_rate)

    def forward(self, wav: torch.Tensor) -> AudioEmbedding:
        out = self.encoder(wav)
        if self.projection is None:
            return out
        return AudioEmbedding(
            pooled=F.normalize(self.projection(out.pooled), dim=-1), seq=out.seq
        )


@register("encoder", "clap_text_tower")
class CLAPTextTower(TextEncoder):
    """Text encoder of a CLAP checkpoint: captions -> `TextEmbedding` (frozen).

    Args:
        checkpoint: a ``clap_trainer`` checkpoint written by ``tta fit``.
        use_ema: take the EMA weights (the checkpoint must hold them).
        project: ``pooled`` = the normalised joint-space embedding instead of the tower's output.
    """

    def __init__(self, checkpoint: str, use_ema: bool = False, project: bool = False) -> None:
        super().__init__()
        _take_tower(self, "text", checkpoint, use_ema, project)
        self.seq_dim = int(self.encoder.dim)
        log.info("text tower of %s: %s, dim %d", checkpoint, type(self.encoder).__name__, self.dim)

    def forward(self, texts: list[str]) -> TextEmbedding:
        out = self.encoder(texts)
        if self.projection is None:
            return out
        return TextEmbedding(
            seq=out.seq,
            mask=out.mask,
            pooled=F.normalize(self.projection(out.pooled), dim=-1),
        )
