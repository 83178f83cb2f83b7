"""The CLAP network (MS-CLAP 2023): an audio and a text encoder projected into one joint space.

Pure ``nn.Module``; `tta.encoders.clap.module.CLAPModule` trains it. Embeddings returned by
`embed_audio` / `embed_text` are L2-normalised, so cosine similarity is a dot product.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tta.encoders.base import AudioEncoder, TextEncoder
from tta.registry import register


def pooled_text(encoder: TextEncoder, texts: list[str], cache: dict[str, torch.Tensor] | None,
                device: torch.device) -> torch.Tensor:
    """``(B, dim)`` pooled text vectors; a frozen ``encoder``'s are memoised per caption in
    ``cache`` (None: no memo). Entries are read onto ``device``, so a module moved after caching
    (CPU -> GPU) still gets its vectors where its projection lives."""
    if cache is None or not getattr(encoder, "frozen", False):
        return encoder(texts).pooled
    missing = [t for t in dict.fromkeys(texts) if t not in cache]
    if missing:
        with torch.no_grad():
            cache.update(zip(missing, encoder(missing).pooled.detach(), strict=True))
    return torch.stack([cache[t].to(device) for t in texts])


class Projection(nn.Module):
    """Projection head into the joint space.

    ``style="msclap"`` (MS-CLAP): ``LayerNorm(W1 x + dropout(W2 gelu(W1 x)))``, no biases;
    ``style="laion"`` (LAION CLAP): ``W2 relu(W1 x + b1) + b2`` (keys ``linear1``/``linear2``
    with biases, as in transformers' ``ClapProjectionLayer``; ``dropout`` unused).
    """

    def __init__(
        self, d_in: int, d_out: int, dropout: float = 0.5, style: Literal["msclap", "laion"] = "msclap"
    ) -> None:
        super().__init__()
        if style not in ("msclap", "laion"):
            raise ValueError(f"Projection.style must be 'msclap' or 'laion', got {style!r}")
        self.style = style
        laion = style == "laion"
        self.linear1 = nn.Linear(d_in, d_out, bias=laion)
        self.linear2 = nn.Linear(d_out, d_out, bias=laion)
        if not laion:
            self.drop = nn.Dropout(dropout)
            self.norm = nn.LayerNorm(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear1(x)
        if self.style == "laion":
            return self.linear2(F.relu(h))
        return self.norm(h + self.drop(self.linear2(F.gelu(h))))


def clip_loss(audio: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the similarity matrix of paired, normalised embeddings.

    Row ``i`` of ``audio`` and ``text`` is a positive pair; every other row is a negative.
    """
    if audio.shape != text.shape:
        raise ValueError(f"clip_loss: audio {tuple(audio.shape)} and text {tuple(text.shape)} differ")
    logits = logit_scale.exp() * audio.float() @ text.float().T
    target = torch.arange(audio.shape[0], device=audio.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@register("network", "clap")
class CLAP(nn.Module):
    """Audio encoder + text encoder + projections + learnable temperature.

    Args:
        audio_encoder: any `AudioEncoder` (HTSAT in the paper).
        text_encoder: any `TextEncoder` (GPT2 in the paper; MiniLM in the demo).
        joint_dim: width of the joint space (1024 in the paper).
        temperature: initial temperature (MS-CLAP 2023: 0.007).
        max_logit_scale: clamp of ``exp(logit_scale)`` after every step.
        cache_frozen_text: memoise the pooled text vectors of a frozen text encoder per caption
            (captions repeat every epoch; the frozen tower's output cannot change).
        dropout: dropout of the projection heads.
        projection: head style, ``"msclap"`` or ``"laion"`` (see `Projection`).
    """

    def __init__(
        self,
        audio_encoder: AudioEncoder,
        text_encoder: TextEncoder,
        joint_dim: int = 1024,
        temperature: float = 0.007,
        dropout: float = 0.5,
        max_logit_scale: float = 200.0,
        cache_frozen_text: bool = True,
        projection: Literal["msclap", "laion"] = "msclap",
    ) -> None:
        super().__init__()
        self.audio_encoder = audio_encoder
        self.text_encoder = text_encoder
        self.audio_projection = Projection(audio_encoder.dim, joint_dim, dropout, projection)
        self.text_projection = Projection(text_encoder.dim, joint_dim, dropout, projection)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.max_logit_scale = math.log(max_logit_scale)
        self.joint_dim = joint_dim
        self.cache_frozen_text = cache_frozen_text
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def sample_rate(self) -> int:
        return self.audio_encoder.sample_rate

    def embed_audio(self, wav: torch.Tensor) -> torch.Tensor:
        """Waveforms ``(B, T)`` at ``sample_rate`` -> normalised joint embeddings ``(B, joint_dim)``."""
        return F.normalize(self.audio_projection(self.audio_encoder(wav).pooled), dim=-1)

    def _pooled_text(self, texts: list[str]) -> torch.Tensor:
        return pooled_text(self.text_encoder, texts, self._text_cache if self.cache_frozen_text else None,
                           self.logit_scale.device)

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """Captions -> normalised joint embeddings ``(B, joint_dim)``."""
        return F.normalize(self.text_projection(self._pooled_text(texts)), dim=-1)

    def clamp_logit_scale(self) -> None:
        """Keep ``exp(logit_scale)`` at most ``max_logit_scale`` (as CLIP does after each step)."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, self.max_logit_scale)

    def forward(self, wav: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_audio(wav), self.embed_text(texts)
