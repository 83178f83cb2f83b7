"""Noise processes behind one interface (`NoiseProcess`): DDPM and rectified flow.

Both train a network called as ``denoiser(x_t, t_model)`` with model timesteps on a 0..1000
scale (larger = noisier) and sample with their own solvers; `guided` wraps a conditional model
for classifier-free guidance.
"""

from tta.generators.noise.base import Denoiser, NoiseProcess, guided
from tta.generators.noise.ddpm import DDPMProcess
from tta.generators.noise.flow import RectifiedFlow

__all__ = ["DDPMProcess", "Denoiser", "NoiseProcess", "RectifiedFlow", "guided"]
