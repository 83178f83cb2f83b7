"""VGGish (Hershey et al. 2017): the AudioSet embedding network of the original FAD paper.

Architecture (TensorFlow ``models/research/audioset/vggish/vggish_slim.py``): log-mel patches
``(N, 1, 96, 64)`` -> 3x3 convs (stride 1, same padding) with ReLU and 2x2 max pools:
conv 64, pool, conv 128, pool, conv 256 x2, pool, conv 512 x2, pool -> ``(N, 512, 6, 4)``,
flattened in TensorFlow's channels-last order -> fc 4096, ReLU, fc 4096, ReLU, fc 128. About
72.1 M parameters.

- **Embedding**: the 128-d output of the last fc layer *before* any activation: TF's
  ``vggish/embedding`` tensor (``activation_fn=None``) and what FAD uses (google-research's
  ``frechet_audio_distance`` and the PyTorch ``frechet_audio_distance`` package with its
  defaults ``use_pca=False, use_activation=False``). ``torchvggish`` ends in a ReLU; set
  ``final_relu=True`` to reproduce it.
- **Postprocessing** (optional, ``pproc``): the PCA (with whitening) and 8-bit quantisation of
  the released AudioSet embeddings: ``E (x - mu)``, clipped to [-2, 2], mapped to [0, 255] and
  rounded. ``output="pca"`` stops after the PCA, ``output="quantized"`` gives the 0..255 values.
  Not used for FAD.

Parameter names follow the widely used ``torchvggish`` layout (``features.{0,3,6,8,11,13}``,
``embeddings.{0,2,4}``, ``pproc.pca_eigen_vectors`` ``(128, 128)`` and ``pproc.pca_means``
``(128, 1)``), so its ``vggish-10086976.pth`` (VGG part only) loads strictly from a local path;
PCA parameters come from the same file (``pproc.*`` keys), from Google's
``vggish_pca_params.npz`` or from a torch/safetensors file with ``pca_eigen_vectors`` /
``pca_means`` tensors.

Front end: `tta.metrics.yamnet.AudioSetFrontend` (the same AudioSet log-mel as YAMNet) with
VGGish's parameters (``vggish_params.py``): ``log(mel + 0.01)``, patches of 96 frames every 96
frames (0.96 s, no overlap); like ``mel_features.frame`` an incomplete last frame or patch is
dropped, and a clip shorter than one patch (0.975 s) is an error. A clip's embedding is the mean
of its patch embeddings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tta.metrics.yamnet import N_MELS, PATCH_FRAMES, AudioSetFrontend
from tta.utils.weights import load_checkpoint, load_state_dict_strict

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
LOG_OFFSET = 0.01
PATCH_HOP_FRAMES = 96
CHANNELS = (64, 128, 256, 512)
HIDDEN = 4096
EMBED_DIM = 128
QUANTIZE_MIN, QUANTIZE_MAX = -2.0, 2.0
OUTPUTS = ("embedding", "pca", "quantized")
PCA_KEYS = ("pca_eigen_vectors", "pca_means")


class VGGishFrontend(AudioSetFrontend):
    """VGGish's features: `AudioSetFrontend` with ``log(mel + 0.01)``, 0.96 s patches, no padding."""

    def __init__(self) -> None:
        super().__init__(
            log_offset=LOG_OFFSET, patch_hop_frames=PATCH_HOP_FRAMES, pad=False
        )


class PCAPostprocessor(nn.Module):
    """The AudioSet release's PCA (with whitening) and 8-bit quantisation (``pproc``)."""

    def __init__(self, dim: int = EMBED_DIM) -> None:
        super().__init__()
        # filled by a checkpoint; NaN until then so that an unloaded postprocessor cannot pass silently
        self.register_buffer("pca_eigen_vectors", torch.full((dim, dim), float("nan")))
        self.register_buffer("pca_means", torch.full((dim, 1), float("nan")))

    def pca(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` -> ``E (x - mu)`` per row."""
        return (x - self.pca_means[:, 0]) @ self.pca_eigen_vectors.T

    @staticmethod
    def quantize(x: torch.Tensor) -> torch.Tensor:
        """Clip to [-2, 2] and map to the integers 0..255 (as float)."""
        scale = 255.0 / (QUANTIZE_MAX - QUANTIZE_MIN)
        return torch.round((x.clamp(QUANTIZE_MIN, QUANTIZE_MAX) - QUANTIZE_MIN) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.pca(x))


def _features(channels: Sequence[int]) -> nn.Sequential:
    c1, c2, c3, c4 = channels
    layers: list[nn.Module] = []
    in_ch = 1
    for spec in (c1, "M", c2, "M", c3, c3, "M", c4, c4, "M"):
        if spec == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, int(spec), kernel_size=3, padding=1), nn.ReLU()]
            in_ch = int(spec)
    return nn.Sequential(*layers)


class VGGish(nn.Module):
    """VGGish on 16 kHz audio; parameter names of ``torchvggish`` (see the module docstring).

    Args:
        channels: conv widths of the four stages (paper: 64, 128, 256, 512).
        hidden: width of the two 4096-d fc layers.
        dim: embedding size (128).
        postprocess: add the ``pproc`` PCA parameters (needed for ``output="pca"/"quantized"``).
        final_relu: apply a ReLU to the embedding, as ``torchvggish`` does (TF and FAD do not).
        max_patches: patches per forward pass in `embed` (bounds memory on long clips).
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, channels: Sequence[int] = CHANNELS, hidden: int = HIDDEN, dim: int = EMBED_DIM,
                 postprocess: bool = False, final_relu: bool = False, max_patches: int = 256) -> None:  # fmt: skip
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"VGGish needs 4 channel widths, got {tuple(channels)}")
        self.channels = tuple(int(c) for c in channels)
        self.dim = int(dim)
        self.final_relu = bool(final_relu)
        self.max_patches = int(max_patches)
        self.frontend = VGGishFrontend()
        self.features = _features(self.channels)
        flat = self.channels[-1] * (PATCH_FRAMES // 16) * (N_MELS // 16)
        self.embeddings = nn.Sequential(
            nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, self.dim)
        )  # fmt: skip
        self.pproc = PCAPostprocessor(self.dim) if postprocess else None

    def forward(self, patches: torch.Tensor, output: str = "embedding") -> torch.Tensor:
        """Log-mel patches ``(N, 96, 64)`` or ``(N, 1, 96, 64)`` -> ``(N, dim)``."""
        if patches.dim() == 3:
            patches = patches.unsqueeze(1)
        if patches.dim() != 4 or tuple(patches.shape[1:]) != (1, PATCH_FRAMES, N_MELS):
            raise ValueError(
                f"VGGish expects log-mel patches (N, 1, {PATCH_FRAMES}, {N_MELS}), got {tuple(patches.shape)}"
            )
        x = self.features(patches)
        x = x.permute(0, 2, 3, 1).flatten(1)  # TF flattens channels-last (NHWC)
        x = self.embeddings(x)
        if self.final_relu:
            x = F.relu(x)
        if output == "embedding":
            return x
        if output not in OUTPUTS:
            raise ValueError(f"unknown VGGish output {output!r}; use one of {OUTPUTS}")
        if self.pproc is None:
            raise ValueError(
                f"VGGish output {output!r} needs the PCA parameters (pproc.*): pass pca= when loading"
            )
        x = self.pproc.pca(x)
        return self.pproc.quantize(x) if output == "quantized" else x

    def patch_embeddings(
        self, wav: torch.Tensor, output: str = "embedding"
    ) -> torch.Tensor:
        """16 kHz clips ``(B, T)`` -> per-patch outputs ``(B, P, dim)`` (P = whole 0.96 s patches)."""
        patches = self.frontend(wav)
        b, p = patches.shape[:2]
        flat = patches.reshape(b * p, 1, PATCH_FRAMES, N_MELS)
        outs = [self(chunk, output) for chunk in torch.split(flat, self.max_patches)]
        return torch.cat(outs).reshape(b, p, -1)

    def embed(self, wav: torch.Tensor, output: str = "embedding") -> torch.Tensor:
        """16 kHz clips ``(B, T)`` -> clip embeddings ``(B, dim)``: the mean over patches."""
        return self.patch_embeddings(wav, output).mean(dim=1)


def state_dict_keys(postprocess: bool = False) -> list[str]:
    """The ``torchvggish`` state-dict keys, in order (``pproc.*`` with ``postprocess``)."""
    keys = [f"{m}.{i}.{p}" for m, idx in (("features", (0, 3, 6, 8, 11, 13)), ("embeddings", (0, 2, 4)))
            for i in idx for p in ("weight", "bias")]  # fmt: skip
    return keys + ([f"pproc.{k}" for k in PCA_KEYS] if postprocess else [])


def load_pca(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{"pca_eigen_vectors": (D, D), "pca_means": (D, 1)}`` from Google's ``vggish_pca_params.npz``
    (read with ``allow_pickle=False``) or a torch/safetensors file holding those two tensors."""
    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"VGGish PCA parameters not found: {path}")
        with np.load(path, allow_pickle=False) as npz:
            raw: Mapping[str, Any] = {
                k: torch.from_numpy(np.asarray(npz[k])) for k in npz.files
            }
    else:
        raw = load_checkpoint(path)
    if not isinstance(raw, Mapping):
        raise TypeError(
            f"{path}: expected a mapping with {PCA_KEYS}, got {type(raw).__name__}"
        )
    if set(raw) != set(PCA_KEYS):
        raise KeyError(
            f"{path}: expected exactly the keys {list(PCA_KEYS)}, found {sorted(raw)}"
        )
    vectors, means = raw["pca_eigen_vectors"], raw["pca_means"]
    if not isinstance(vectors, torch.Tensor) or not isinstance(means, torch.Tensor):
        raise TypeError(
            f"{path}: pca_eigen_vectors and pca_means must be tensors/arrays"
        )
    if means.dim() == 1:  # Google's npz stores the means as (D,), torchvggish as (D, 1)
        means = means[:, None]
    return {"pca_eigen_vectors": vectors.float(), "pca_means": means.float()}


def _shapes_from_state(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Channel widths, hidden and embedding size of a torchvggish-layout state dict (defaults where absent)."""

    def rows(key: str, default: int) -> int:
        t = state.get(key)
        return (
            int(t.shape[0]) if isinstance(t, torch.Tensor) and t.dim() >= 1 else default
        )

    channels = tuple(
        rows(f"features.{i}.weight", c)
        for i, c in zip((0, 3, 6, 11), CHANNELS, strict=True)
    )
    return {"channels": channels, "hidden": rows("embeddings.0.weight", HIDDEN), "dim": rows("embeddings.4.weight", EMBED_DIM)}  # fmt: skip


def load_vggish(weights: str | os.PathLike, pca: str | os.PathLike | None = None, *, final_relu: bool = False,
                max_patches: int = 256) -> VGGish:  # fmt: skip
    """A `VGGish` loaded strictly from a local ``torchvggish``-layout state dict.

    ``weights``: e.g. ``vggish-10086976.pth`` (``features.*``/``embeddings.*``), optionally with
    ``pproc.*``. ``pca``: a separate PCA file (`load_pca`); the model then has ``pproc``. Widths are
    read from the state dict, so reduced test models load too. Missing, unexpected or mis-shaped
    keys raise `tta.utils.weights.WeightMismatchError` naming the file.
    """
    state = load_checkpoint(weights)
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise TypeError(
            f"{weights}: expected a flat state dict of tensors (torchvggish layout)"
        )
    state = dict(state)
    has_pproc = any(k.startswith("pproc.") for k in state)
    if pca is not None:
        if has_pproc:
            raise ValueError(
                f"{weights} already holds pproc.* PCA parameters; do not also pass pca={pca}"
            )
        state.update({f"pproc.{k}": v for k, v in load_pca(pca).items()})
    model = VGGish(**_shapes_from_state(state), postprocess=has_pproc or pca is not None, final_relu=final_relu,
                   max_patches=max_patches)  # fmt: skip
    load_state_dict_strict(
        model, state, source=str(weights) + (f" + {pca}" if pca is not None else "")
    )
    log.info(
        "VGGish loaded from %s%s",
        weights,
        f" with PCA from {pca}" if pca is not None else "",
    )
    return model.eval()
