"""Backwards-compatible home of the DDPM process: ``DiffusionSchedule`` is
`tta.generators.noise.DDPMProcess`; `guided` and `Denoiser` live in `tta.generators.noise.base`.

New code should import from `tta.generators.noise`.
"""

from __future__ import annotations

from tta.generators.noise.base import Denoiser, guided
from tta.generators.noise.ddpm import SAMPLERS, DDPMProcess, Objective

#: the DDPM process under its former name
DiffusionSchedule = DDPMProcess

__all__ = ["SAMPLERS", "Denoiser", "DiffusionSchedule", "Objective", "guided"]
