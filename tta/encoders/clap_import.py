"""Import a transformers ``ClapModel`` (LAION CLAP) folder: the whole model, or its text tower.

`load_laion_clap` (`LaionCLAP`, registered ``laion_clap``) turns the folder into a full tta
`CLAP`: HTSAT audio tower (`tta.encoders.laion_htsat`: key table and LAION options), RoBERTa
text tower (`LaionClapTextEncoder`, registered ``laion_clap_text``), LAION projection heads and
the logit scale, every checkpoint key consumed strictly. Fusion models (``enable_fusion``) are
refused.

A LAION CLAP folder in transformers layout holds ``config.json`` (``text_config`` of model type
``clap_text_model``, a RoBERTa) and ``model.safetensors`` (or shards with an index) with keys

- ``text_model.*``: the RoBERTa text tower, pooler included (CLAP pools with it);
- ``text_projection.linear1/linear2.*``: ``linear2(act(linear1(pooler_output)))``, ``act`` = ReLU;
- ``audio_model.*``, ``audio_projection.*``, ``logit_scale_a``, ``logit_scale_t``.

`read_clap_text` returns the text tower as a state dict for a RoBERTa `BertTextEncoder` with
``pooling="pooler"`` (keys ``model.*``), the projection weights and the temperature. Keys are
checked strictly against a RoBERTa built from ``text_config``: anything missing or unexpected is
a `WeightMismatchError`; the only normalisation is dropping the ``position_ids`` /
``token_type_ids`` buffers that some transformers versions save. `export_clap_text_tower` writes
the tower as a plain RoBERTa Hugging Face folder (plus the tokenizer and
``text_projection.safetensors``), loadable with ``BertTextEncoder(out, pooling="pooler")``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tta.encoders.clap.network import CLAP
from tta.encoders.laion_htsat import laion_htsat, map_laion_audio, read_preprocessor
from tta.encoders.text import HFTextEncoder
from tta.encoders.text_hf import (
    TOKENIZER_FILES,
    HFFolderError,
    check_hf_folder,
    is_buffer_drift,
    read_config,
)
from tta.registry import register
from tta.utils.files import atomic_dir
from tta.utils.weights import (
    WeightMismatchError,
    describe_mismatch,
    load_checkpoint,
    load_state_dict_strict,
)

log = logging.getLogger(__name__)

TEXT_PREFIX = "text_model."
PROJECTION_PREFIX = "text_projection."
PROJECTION_FILE = "text_projection.safetensors"
AUDIO_PROJECTION = "audio_projection."
_OTHER_PREFIXES = ("audio_model.", "audio_projection.")
_OTHER_KEYS = ("logit_scale_a", "logit_scale_t")
_ROBERTA_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id",
)  # fmt: skip
_TOKENIZER_EXTRA = ("tokenizer_config.json", "special_tokens_map.json", "merges.txt", "added_tokens.json")


@dataclass
class ClapTextWeights:
    """The text half of a LAION CLAP checkpoint.

    Attributes:
        text_state: state dict of a RoBERTa `BertTextEncoder` with ``pooling="pooler"``
            (keys ``model.embeddings.*``, ``model.encoder.*``, ``model.pooler.*``).
        projection: ``linear1.weight`` (P, H), ``linear1.bias``, ``linear2.weight`` (P, P),
            ``linear2.bias``.
        projection_act: activation between the two projection layers (``"relu"`` for LAION).
        roberta_config: keyword arguments of the equivalent ``transformers.RobertaConfig``.
        logit_scale_t: the text logit scale (log temperature) or None if absent.
    """

    text_state: dict[str, torch.Tensor]
    projection: dict[str, torch.Tensor]
    projection_act: str
    roberta_config: dict[str, Any]
    logit_scale_t: torch.Tensor | None

    @property
    def dim(self) -> int:
        """Width of the text tower."""
        return int(self.roberta_config["hidden_size"])

    @property
    def projection_dim(self) -> int:
        """Width of the joint embedding space."""
        return int(self.projection["linear2.weight"].shape[0])


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    if single.is_file():
        return dict(load_checkpoint(single))
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        raise HFFolderError(f"{folder}: no model.safetensors (nor model.safetensors.index.json) in the CLAP folder")
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise TypeError(f"{index}: no 'weight_map' object")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load_checkpoint(folder / shard))
    return state


def _roberta_config(folder: Path) -> tuple[dict[str, Any], str]:
    config = read_config(folder)
    if config.get("model_type") == "clap_text_model":  # ClapTextModelWithProjection (diffusers AudioLDM)
        text_raw = config
    elif config.get("model_type") == "clap" and isinstance(config.get("text_config"), dict):
        text_raw = config["text_config"]
    else:
        raise ValueError(
            f"{folder / 'config.json'}: not a transformers ClapModel config (model_type {config.get('model_type')!r}, "
            "expected 'clap' with a 'text_config' object, or 'clap_text_model')"
        )
    from transformers import ClapTextConfig

    raw = {k: v for k, v in text_raw.items() if k != "model_type"}
    text_config = ClapTextConfig(**raw)  # fills the defaults a saved config omits
    roberta = {k: getattr(text_config, k) for k in _ROBERTA_KEYS if getattr(text_config, k, None) is not None}
    act = str(getattr(text_config, "projection_hidden_act", config.get("projection_hidden_act", "relu")))
    return roberta, act


def _expected_text_shapes(roberta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    from transformers import RobertaConfig, RobertaModel

    with torch.device("meta"):
        model = RobertaModel(RobertaConfig(**roberta), add_pooling_layer=True)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not is_buffer_drift(k)}


def _check(got: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str, source: Path) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [
        f"{k}: {tuple(got[k].shape)} vs {expected[k]}"
        for k in expected
        if k in got and tuple(got[k].shape) != expected[k]
    ]
    problems = describe_mismatch(missing=missing, unexpected=unexpected, shapes=shapes)
    if problems:
        raise WeightMismatchError(f"{source}: {what} does not match: {problems}")


def read_clap_text(folder: str | os.PathLike, state: dict[str, torch.Tensor] | None = None) -> ClapTextWeights:
    """Read the text tower, text projection and text temperature of a transformers ``ClapModel`` folder.

    ``state``: the folder's weights when already loaded (read from the folder otherwise).
    """
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise HFFolderError(f"CLAP folder {folder} has no config.json")
    roberta, act = _roberta_config(folder)
    state = _load_weights(folder) if state is None else state
    source = folder / "model.safetensors"

    text = {k[len(TEXT_PREFIX) :]: v for k, v in state.items() if k.startswith(TEXT_PREFIX)}
    text = {k: v for k, v in text.items() if not is_buffer_drift(k)}
    projection = {k[len(PROJECTION_PREFIX) :]: v for k, v in state.items() if k.startswith(PROJECTION_PREFIX)}
    unknown = sorted(
        k for k in state
        if not k.startswith((TEXT_PREFIX, PROJECTION_PREFIX, *_OTHER_PREFIXES)) and k not in _OTHER_KEYS
    )  # fmt: skip
    if unknown:
        raise WeightMismatchError(f"{source}: unexpected top-level keys for a ClapModel: {', '.join(unknown[:10])}")

    _check(text, _expected_text_shapes(roberta), "the text tower (text_model.*)", source)
    hidden = int(roberta["hidden_size"])
    proj_dim = int(projection["linear2.weight"].shape[0]) if "linear2.weight" in projection else -1
    expected_proj = {
        "linear1.weight": (proj_dim, hidden),
        "linear1.bias": (proj_dim,),
        "linear2.weight": (proj_dim, proj_dim),
        "linear2.bias": (proj_dim,),
    }
    _check(projection, expected_proj, "the text projection (text_projection.*)", source)
    log.info("read CLAP text tower from %s: width %d, projection %d", folder, hidden, proj_dim)
    return ClapTextWeights(
        text_state={f"model.{k}": v for k, v in text.items()},
        projection=projection,
        projection_act=act,
        roberta_config=roberta,
        logit_scale_t=state.get("logit_scale_t"),
    )


def export_clap_text_tower(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a CLAP folder's text tower as a RoBERTa Hugging Face folder at ``out``.

    ``out`` gets ``config.json``, ``model.safetensors`` (RoBERTa keys, pooler included), the
    CLAP folder's tokenizer files and ``text_projection.safetensors`` (the projection weights).
    The folder is assembled beside ``out`` and renamed into place; an existing non-empty ``out``
    is refused.
    """
    from safetensors.torch import save_file
    from transformers import RobertaConfig

    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export target {out} exists and is not empty")
    tokenizer_files = [n for n in TOKENIZER_FILES + _TOKENIZER_EXTRA if (folder / n).is_file()]
    if not any(n in TOKENIZER_FILES for n in tokenizer_files):
        raise HFFolderError(f"CLAP folder {folder} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    weights = read_clap_text(folder)

    with atomic_dir(out) as tmp:
        RobertaConfig(**weights.roberta_config).save_pretrained(tmp)
        tower = {k[len("model.") :]: v.contiguous() for k, v in weights.text_state.items()}
        save_file(tower, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        projection = {k: v.contiguous() for k, v in weights.projection.items()}
        save_file(projection, str(tmp / PROJECTION_FILE), metadata={"activation": weights.projection_act})
        for name in tokenizer_files:
            shutil.copy2(folder / name, tmp / name)
    log.info("exported the CLAP text tower of %s to %s", folder, out)
    return out


# --------------------------------------------------------------------------- the full model
@register("encoder", "laion_clap_text")
class LaionClapTextEncoder(HFTextEncoder):
    """The RoBERTa text tower of a transformers ``ClapModel`` folder, pooled by its pooler (LAION CLAP).

    Reads ``text_model.*`` strictly (`read_clap_text`) into a ``RobertaModel`` with pooler;
    tokenizer from the same folder; ``pooled`` is ``tanh(W h_<s> + b)`` as ``ClapTextModel``'s
    ``pooler_output``. ``preloaded``: internal, already-read `ClapTextWeights`. Also reads a
    ``ClapTextModelWithProjection`` folder (model type ``clap_text_model``, diffusers AudioLDM's
    ``text_encoder/`` with its tokenizer files copied in).
    """

    model_types = frozenset({"clap", "clap_text_model"})

    def __init__(
        self,
        path: str | os.PathLike,
        max_length: int = 77,
        trainable: bool = False,
        fixed_length: bool = False,
        fp32: bool = True,
        preloaded: Any = None,
    ) -> None:
        super().__init__(
            path, max_length, trainable=trainable, fixed_length=fixed_length, fp32=fp32,
            model_kwargs={"preloaded": preloaded},
        )  # fmt: skip
        config_pad = getattr(self.model.config, "pad_token_id", None)
        if config_pad is not None and config_pad != self.pad_id:
            raise ValueError(
                f"{self.path}: tokenizer pad id {self.pad_id} differs from text_config.pad_token_id {config_pad}; "
                "RoBERTa derives positions from the pad id, so they must agree"
            )

    def _load_model(self, folder: Path, preloaded: ClapTextWeights | None = None, **kwargs: Any) -> torch.nn.Module:
        from transformers import RobertaConfig, RobertaModel

        weights = preloaded if preloaded is not None else read_clap_text(folder)
        model = RobertaModel(RobertaConfig(**weights.roberta_config), add_pooling_layer=True)
        # constant buffers (position / token type ids) that some transformers versions do not save
        state = {k: v for k, v in model.state_dict().items() if is_buffer_drift(k)}
        state.update({k[len("model.") :]: v for k, v in weights.text_state.items()})
        load_state_dict_strict(model, state, source=f"{folder} (text_model.*)")
        return model.eval()

    def _max_positions(self) -> int | None:
        limit = super()._max_positions()
        return None if limit is None else limit - int(self.model.config.pad_token_id) - 1

    def _pool(self, seq: torch.Tensor, mask: torch.Tensor, pooler: torch.Tensor | None) -> torch.Tensor:
        if pooler is None:  # pragma: no cover - the model is built with its pooler
            raise RuntimeError(f"{self.path}: the text tower returned no pooler output")
        return pooler


@register("network", "laion_clap")
class LaionCLAP(CLAP):
    """A transformers ``ClapModel`` folder (LAION CLAP, fusion off) as a full tta `CLAP`.

    Towers: `LaionClapTextEncoder` (RoBERTa + pooler) and `tta.encoders.laion_htsat.laion_htsat`
    (our HTSAT with LAION's options, front-end from ``preprocessor_config.json``); both
    projections are LAION heads (``Projection(style="laion")``); ``logit_scale`` is
    ``logit_scale_a`` (the scale LAION's loss trains; ``logit_scale_t`` is read and not kept).
    Every key of the checkpoint is consumed or the load fails with `WeightMismatchError` listing
    missing / unexpected / mis-shaped keys.

    Args:
        path: local folder with ``config.json``, ``model.safetensors`` and the RoBERTa tokenizer.
        text_max_length: most text tokens (LAION: 77).
        train_text: leave the text tower trainable (default frozen).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        text_max_length: int = 77,
        train_text: bool = False,
        max_logit_scale: float = 200.0,
        cache_frozen_text: bool = True,
    ) -> None:
        from transformers import ClapAudioConfig

        folder = check_hf_folder(path)
        config = read_config(folder)
        source = str(folder / "model.safetensors")
        state = _load_weights(folder)
        text = read_clap_text(folder, state)  # also refuses unknown top-level keys
        if not isinstance(config.get("audio_config"), dict):
            raise TypeError(f"{folder / 'config.json'}: no 'audio_config' object")
        audio_config = ClapAudioConfig(**{k: v for k, v in config["audio_config"].items() if k != "model_type"})
        for act, where in ((text.projection_act, "text_config"), (audio_config.projection_hidden_act, "audio_config")):
            if act != "relu":
                raise ValueError(f"{folder / 'config.json'}: {where}.projection_hidden_act {act!r} (LAION uses relu)")
        audio = laion_htsat(audio_config, read_preprocessor(folder), source=str(folder / "config.json"))
        text_encoder = LaionClapTextEncoder(folder, max_length=text_max_length, trainable=train_text, preloaded=text)
        super().__init__(
            audio, text_encoder, joint_dim=text.projection_dim, dropout=0.0, max_logit_scale=max_logit_scale,
            cache_frozen_text=cache_frozen_text, projection="laion",
        )  # fmt: skip
        self.path = str(folder)
        load_state_dict_strict(self.audio_encoder, map_laion_audio(state, audio, source), source=source)
        load_state_dict_strict(self.text_projection, text.projection, source=f"{source} (text_projection.*)")
        audio_proj = {k[len(AUDIO_PROJECTION) :]: v for k, v in state.items() if k.startswith(AUDIO_PROJECTION)}
        load_state_dict_strict(self.audio_projection, audio_proj, source=f"{source} (audio_projection.*)")
        missing = [k for k in _OTHER_KEYS if k not in state]
        if missing:
            raise WeightMismatchError(f"{source}: missing keys {', '.join(missing)}")
        with torch.no_grad():
            self.logit_scale.copy_(state["logit_scale_a"].reshape(()))
        log.info(
            "LAION CLAP from %s: audio %d-d, text %d-d, joint %d, 1/temperature %.2f (text-side scale %.2f not kept)",
            folder, audio.dim, text.dim, self.joint_dim, float(self.logit_scale.detach().exp()),
            float(state["logit_scale_t"].exp()),
        )  # fmt: skip


def load_laion_clap(folder: str | os.PathLike, **kwargs: Any) -> LaionCLAP:
    """A transformers ``ClapModel`` folder as a tta `CLAP` (see `LaionCLAP` for the arguments)."""
    return LaionCLAP(folder, **kwargs)
