"""Tiny overfit of every diffusion generator: trained 500 steps on 4 fixed clips (cached latents), its
samples have the training latents' spread and decode to the mel of their own clip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.hf_fixtures import make_bert_folder
from tta.generators.noise import DDPMProcess, NoiseProcess, RectifiedFlow

CAPTIONS = ["a dog barks", "a bell rings twice", "rain falls on a roof", "a siren wails"]
PROCESSES = {
    "ddpm_v": lambda: DDPMProcess(objective="v"),
    "ddpm_eps": lambda: DDPMProcess(objective="eps"),
    "rectified_flow": lambda: RectifiedFlow(),
}


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert_folder(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def clips(tiny_synth: Path) -> torch.Tensor:
    """Log-mels of 4 fixed clips."""
    from tta.data.datamodule import AudioDataModule

    dm = AudioDataModule(manifest=str(tiny_synth), mel="demo", segment_seconds=0.5, batch_size=4)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))["mel"][:4]


def _overfit(bert: Path, clips: torch.Tensor, process: NoiseProcess, steps: int = 500) -> tuple[Any, torch.Tensor]:
    from tests.test_ldm_module import make_module

    module = make_module(bert, cfg_dropout=0.0, process=process, film_scale="unit_entries")
    module.codec.scale_factor = 1.0 / float(module.codec.encode(clips, sample=False).std())  # unit-std latents
    latents = module.codec.encode(clips, sample=False)  # the cache: encoded once
    params = [p for p in module.model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    g = torch.Generator().manual_seed(0)
    module.model.train()
    for _ in range(steps):
        loss = module.model.loss(latents, CAPTIONS, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return module.eval(), latents


@pytest.mark.parametrize("name", ["ddpm_v", "rectified_flow"])
def test_tiny_overfit_samples_match_their_own_clip(bert: Path, clips: torch.Tensor, name: str,
                                                   single_thread: None) -> None:
    module, latents = _overfit(bert, clips, PROCESSES[name]())
    model = module.model
    with torch.no_grad():
        z = model.sample(model.conditioning(CAPTIONS), tuple(latents.shape[1:]), steps=25,
                         sampler=model.process.fast_sampler, guidance=1.0, generator=torch.Generator().manual_seed(1))
        frames = clips.shape[-1]
        generated, real = module.codec.decode(z, frames), module.codec.decode(latents, frames)
    ratio = float(z.std() / latents.std())
    assert abs(ratio - 1.0) < 0.2, f"{name}: sampled latents' std is {ratio:.2f}x the training latents'"
    distance = torch.cdist(generated.flatten(1), real.flatten(1))
    assert torch.equal(distance.argmin(1), torch.arange(4)), f"{name}: nearest clips {distance.argmin(1).tolist()}"
