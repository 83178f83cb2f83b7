"""`RetrievalFeatureExtractor` (registered ``retrieval_features``): fill a feature store via ``tta predict``.

For every clip of the datamodule's predict split(s) it encodes

- the waveform with a frozen `AudioEncoder` (AudioMAE in Re-AudioLDM): its token sequence
  ``seq`` (optionally average-pooled to ``audio_tokens`` tokens), or, when the encoder has no
  sequence or ``audio_source="pooled"``, its pooled vector as one token;
- the clip's caption with a frozen `TextEncoder` (T5 in Re-AudioLDM), padded/truncated to
  ``text_length`` (50) positions with a mask.

The `AudioDataModule` predict loader gives each clip once, cropped from its start, with its
*first* caption (the caption ``tta index build`` embeds), so a store holds one text row per
clip; clips with several captions contribute only their first. Batches go to a per-rank
`FeatureStoreWriter`; at the end of the epoch rank 0 merges every rank's parts
(`finalize_store`). Waveforms are resampled when the encoder's rate differs from the data's.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import torch
import torch.nn.functional as F

from tta.encoders.base import AudioEncoder, TextEncoder
from tta.registry import class_path, register
from tta.retrieval.features import (
    FeatureStoreWriter,
    check_writable,
    finalize_store,
    fit_length,
    module_fingerprint,
)
from tta.retrieval.features_write import new_run_id
from tta.training.base import TTAModule

log = logging.getLogger(__name__)

_CONFIG_ATTRS = (
    "path",
    "checkpoint",
    "max_length",
    "fixed_length",
    "sample_rate",
    "clip_seconds",
    "num_frames",
    "project",
    "pooling",
    "normalize",
)


def describe_encoder(encoder: torch.nn.Module) -> dict[str, Any]:
    """Identity of an encoder for store metadata: registry name, class, weight hash, width, config."""
    config = {}
    for attr in _CONFIG_ATTRS:
        value = getattr(encoder, attr, None)
        if isinstance(value, (str, int, float, bool)):
            config[attr] = value
    return {
        "name": getattr(type(encoder), "registry_name", None),
        "class_path": class_path(type(encoder)),
        "sha256": module_fingerprint(encoder),
        "dim": int(getattr(encoder, "dim", -1)),
        "config": config,
    }


def load_encoder_weights(encoder: AudioEncoder, path: str) -> None:
    """Load ``path`` into ``encoder`` strictly; an `AudioMAE` also accepts the published
    ``pretrained.pth`` (`tta.encoders.audiomae_import`)."""
    from tta.encoders.audiomae import AudioMAE

    if isinstance(encoder, AudioMAE):
        from tta.encoders.audiomae_import import load_audiomae_weights

        load_audiomae_weights(encoder, path)
        return
    from tta.utils.weights import load_checkpoint, load_state_dict_strict

    load_state_dict_strict(encoder, load_checkpoint(path), source=path)


@register("module", "retrieval_features")
class RetrievalFeatureExtractor(TTAModule):
    """Predict-only module writing a retrieval feature store (`tta.retrieval.features`).

    Args:
        out_dir: the store directory (written atomically at the end of ``tta predict``).
        audio_encoder: frozen audio encoder, or None for a text-only store.
        text_encoder: frozen text encoder, or None for an audio-only store.
        text_length: text positions per clip (Re-AudioLDM: 50); longer sequences are truncated
            after encoding (set the encoder's ``max_length`` to the same value to truncate tokens).
        audio_tokens: adaptive-average-pool the audio sequence to this many tokens (None: keep all).
        audio_source: ``seq`` (the token sequence; falls back to ``pooled`` for encoders without
            one) or ``pooled`` (the clip vector as one token, e.g. AudioMAE's 32-d projection).
        audio_weights: a state-dict file (safetensors or torch) loaded strictly into the audio
            encoder, for encoders whose constructor builds random weights (``audiomae``: also the
            published ``pretrained.pth``, decoder dropped, `tta.encoders.audiomae_import`).
        mel: the datamodule's mel preset (its sample rate is the rate of the waveforms).
        flush_rows: rows each rank buffers before writing a part file.
        overwrite: replace an existing store at ``out_dir`` (else an error before any work).
    """

    def __init__(
        self,
        out_dir: str,
        audio_encoder: AudioEncoder | None = None,
        text_encoder: TextEncoder | None = None,
        text_length: int = 50,
        audio_tokens: int | None = None,
        audio_source: Literal["seq", "pooled"] = "seq",
        audio_weights: str | None = None,
        mel: str | dict[str, Any] = "audioldm",
        flush_rows: int = 1024,
        overwrite: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(mel=mel, ema_decay=None, grad_clip=None, seed=seed)
        self.save_hyperparameters(ignore=["audio_encoder", "text_encoder"])
        if audio_encoder is None and text_encoder is None:
            raise ValueError(
                "RetrievalFeatureExtractor needs an audio_encoder, a text_encoder or both"
            )
        if text_length < 1 or (audio_tokens is not None and audio_tokens < 1):
            raise ValueError(
                f"text_length ({text_length}) and audio_tokens ({audio_tokens}) must be >= 1"
            )
        if audio_source not in ("seq", "pooled"):
            raise ValueError(
                f"audio_source must be 'seq' or 'pooled', got {audio_source!r}"
            )
        if audio_weights is not None:
            if audio_encoder is None:
                raise ValueError("audio_weights given without an audio_encoder")
            load_encoder_weights(audio_encoder, audio_weights)
        elif getattr(type(audio_encoder), "registry_name", None) == "audiomae":
            log.warning(
                "audiomae without audio_weights: the store holds features of a randomly initialised AudioMAE"
            )
        self.audio_encoder = (
            audio_encoder.freeze() if audio_encoder is not None else None
        )
        self.text_encoder = text_encoder.freeze() if text_encoder is not None else None
        self.out_dir = os.fspath(out_dir)
        self.text_length, self.audio_tokens, self.audio_source = (
            int(text_length),
            audio_tokens,
            audio_source,
        )
        self.audio_weights, self.flush_rows, self.overwrite = (
            audio_weights,
            int(flush_rows),
            bool(overwrite),
        )
        self._writer: FeatureStoreWriter | None = None
        self._run_id: str | None = None
        self.truncated_captions = 0
        self._warned: set[str] = set()

    def ema_target(self) -> torch.nn.Module:  # pragma: no cover - nothing is trained
        raise NotImplementedError(
            "RetrievalFeatureExtractor trains nothing; use `tta predict`"
        )

    # ----------------------------------------------------------------- encoding
    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    @torch.no_grad()
    def encode_audio(self, wav: torch.Tensor) -> torch.Tensor:
        """Waveforms ``(B, T)`` at the data's rate -> audio tokens ``(B, La, Da)`` float32."""
        assert self.audio_encoder is not None
        src, dst = self.mel_config.sample_rate, int(self.audio_encoder.sample_rate)
        if src != dst:
            import torchaudio

            wav = torchaudio.functional.resample(wav.float(), src, dst)
        emb = self.audio_encoder(wav)
        if self.audio_source == "pooled" or emb.seq is None:
            if self.audio_source == "seq":
                self._warn_once(
                    "noseq",
                    "%s returns no sequence: storing its pooled vector as one token",
                    type(self.audio_encoder).__name__,
                )
            return emb.pooled.float().unsqueeze(1)
        seq = emb.seq.float()
        if self.audio_tokens is not None and self.audio_tokens != seq.shape[1]:
            if self.audio_tokens > seq.shape[1]:
                self._warn_once(
                    "upsample",
                    "audio_tokens=%d exceeds the %d tokens of the encoder: tokens are repeated",
                    self.audio_tokens,
                    seq.shape[1],
                )
            seq = F.adaptive_avg_pool1d(
                seq.transpose(1, 2), self.audio_tokens
            ).transpose(1, 2)
        return seq

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ``(B, text_length, Dt)`` float32 states and their ``(B, text_length)`` mask."""
        assert self.text_encoder is not None
        emb = self.text_encoder(list(captions))
        mask = emb.mask.bool()
        self.truncated_captions += int(mask[:, self.text_length :].any(dim=1).sum())
        return fit_length(emb.seq.float(), mask, self.text_length)

    # ---------------------------------------------------------------- the loop
    def _modality_meta(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        audio = text = None
        if self.audio_encoder is not None:
            pooled = self.audio_source == "pooled" or self.audio_tokens is None
            audio = {
                "encoder": describe_encoder(self.audio_encoder),
                "source": self.audio_source,
                "pooling": None if pooled else "adaptive_avg",
                "encoder_sample_rate": int(self.audio_encoder.sample_rate),
                "data_sample_rate": int(self.mel_config.sample_rate),
                "weights_file": self.audio_weights,
            }
        if self.text_encoder is not None:
            text = {
                "encoder": describe_encoder(self.text_encoder),
                "caption": "first caption of each clip",
            }
        return audio, text

    def on_predict_start(self) -> None:
        check_writable(self.out_dir, self.overwrite)
        self._run_id = self.trainer.strategy.broadcast(new_run_id(), src=0)
        audio, text = self._modality_meta()
        self._writer = FeatureStoreWriter(
            self.out_dir,
            self._run_id,
            rank=self.trainer.global_rank,
            audio_meta=audio,
            text_meta=text,
            flush_rows=self.flush_rows,
        )
        self.truncated_captions = 0

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> int:
        """Encode one batch and hand it to this rank's writer; returns the number of clips written."""
        ids = list(batch["id"])
        if (
            not ids
        ):  # every clip of the batch failed to decode (counted by the datamodule)
            return 0
        if self._writer is None:
            raise RuntimeError(
                "RetrievalFeatureExtractor.predict_step outside a predict run (no writer)"
            )
        feats: dict[str, torch.Tensor] = {}
        if self.audio_encoder is not None:
            feats["audio"] = self.encode_audio(batch["wav"])
        if self.text_encoder is not None:
            feats["text"], feats["text_mask"] = self.encode_text(batch["caption"])
        self._writer.add(ids, **feats)
        return len(ids)

    def on_predict_epoch_end(self) -> None:
        assert self._writer is not None and self._run_id is not None
        self._writer.close()
        if self.truncated_captions:
            log.warning(
                "rank %d: %d captions had more than text_length=%d tokens and were truncated",
                self.trainer.global_rank,
                self.truncated_captions,
                self.text_length,
            )
        strategy = self.trainer.strategy
        strategy.barrier("retrieval_features_parts")
        if self.trainer.is_global_zero:
            finalize_store(
                self.out_dir,
                self._run_id,
                extra_meta=self._data_meta(),
                overwrite=self.overwrite,
            )
        strategy.barrier("retrieval_features_done")
        self._writer = None

    def _data_meta(self) -> dict[str, Any]:
        dm = getattr(self.trainer, "datamodule", None)
        meta: dict[str, Any] = {
            "world_size": int(self.trainer.world_size),
            "text_length": self.text_length,
        }
        if dm is not None and hasattr(dm, "manifest_path"):
            meta["manifest"] = str(dm.manifest_path().resolve())
            meta["splits"] = getattr(dm, "predict_splits", None)
            seg = getattr(dm, "segment_frames", None)
            meta["segment_seconds"] = (
                None
                if seg is None
                else seg * self.mel_config.hop_length / self.mel_config.sample_rate
            )
        return meta
