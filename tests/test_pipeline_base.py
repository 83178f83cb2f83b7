"""The generic `Pipeline` base and the folder writer, on a toy system; the LDM generator split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tta.data.mel import MelConfig
from tta.pipelines.base import REST, Pipeline, pipeline_class, write_components
from tta.pipelines.guard import BrokenOutputError
from tta.registry import register
from tta.vocoders.factory import build_vocoder

MEL = MelConfig.preset("demo")


class ToyGenerator(nn.Module):
    """A 'system' whose log-mel is a learned constant level per mel bin."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(MEL.n_mels, MEL.n_mels)
        self.level = nn.Parameter(torch.zeros(MEL.n_mels))
        self.mel_config = MEL

    def frames_for(self, seconds: float) -> int:
        return math.ceil(seconds * MEL.sample_rate / MEL.hop_length)

    def components(self) -> dict[str, nn.Module]:
        return {"body": self.body}


@register("pipeline", "toy_pipeline_for_tests")
class ToyPipeline(Pipeline):
    module_kind = "toy_system_for_tests"

    def sample(self, prompts, frames, *, steps, sampler, guidance, seed, candidates, duration, loud=True):
        base = self.generator.level + (0.0 if loud else math.log(MEL.log_floor))
        mel = base[None, :, None].expand(len(prompts) * candidates, -1, frames).clone()
        noise = torch.randn(mel.shape, generator=torch.Generator().manual_seed(seed))
        return mel + (noise if loud else 0), {"settings": {"loud": loud}}


def _pipe() -> ToyPipeline:
    return ToyPipeline(ToyGenerator(), build_vocoder("griffinlim", MEL), {"steps": 1})


def test_registry_resolves_the_pipeline_of_a_kind() -> None:
    assert pipeline_class("toy_system_for_tests") is ToyPipeline
    from tta.pipelines.ldm import TextToAudioPipeline

    assert pipeline_class("latent_diffusion") is TextToAudioPipeline
    with pytest.raises(ValueError, match="no pipeline serves the model kind 'nope'.*latent_diffusion"):
        pipeline_class("nope")


def test_generate_crops_guards_and_saves(tmp_path: Path) -> None:
    pipe = _pipe()
    gen = pipe.generate(["a", "b"], duration=0.3, seed=2)
    assert gen.wav.shape == (2, round(0.3 * MEL.sample_rate)) and gen.mel.shape[:2] == (2, MEL.n_mels)
    assert gen.settings == {"steps": 1, "sampler": "ddim", "guidance": 3.5, "candidates": 1, "loud": True,
                            "rerank_clap": None}
    with pytest.raises(BrokenOutputError, match="silent"):
        pipe.generate(["a"], duration=0.3, loud=False)
    assert pipe.generate(["a"], duration=0.3, loud=False, allow_silent=True).flags == ["silent: a"]
    with pytest.raises(ValueError, match="needs a CLAP to re-rank"):
        pipe.generate(["a"], duration=0.3, candidates=2)
    with pytest.raises(ValueError, match="non-empty strings"):
        pipe.generate([" "], duration=0.3)
    with pytest.raises(ValueError, match="2 seeds given for 1 prompts"):
        pipe.generate(["a"], duration=0.3, seed=[1, 2])
    rows = pipe.save(gen, tmp_path, ["x0", "x1"], {"seed": 2})
    assert [r["id"] for r in rows] == ["x0", "x1"] and rows[1]["captions"] == ["b"]
    named = pipe.save(gen, tmp_path, ["dir/a", "dir/b"], {}, stems=["dir_a", "dir_b"])
    assert named[0]["id"] == "dir/a" and named[0]["audio"] == "dir_a.wav" and (tmp_path / "dir_b.png").is_file()
    assert rows[0]["generation"]["seed"] == 2 and rows[0]["generation"]["loud"] is True
    assert all((tmp_path / f"x{i}.wav").is_file() and (tmp_path / f"x{i}.png").is_file() for i in range(2))
    json.dumps(rows)  # manifest rows are plain JSON


def test_components_partition_the_generator_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    gen, voc = ToyGenerator(), build_vocoder("griffinlim", MEL)
    files = write_components(gen, voc, tmp_path)
    assert files == {"body": "body.safetensors", REST: f"{REST}.safetensors", "vocoder": "vocoder.safetensors"}
    body, rest = (set(load_file(str(tmp_path / files[n]))) for n in ("body", REST))
    assert body == {"body.weight", "body.bias"} and rest == {"level"}
    gen.components = lambda: {"stray": nn.Linear(2, 2)}  # not part of the generator
    with pytest.raises(ValueError, match="component 'stray' is not a submodule"):
        write_components(gen, voc, tmp_path / "bad")


def test_ldm_generator_is_the_trained_modules_weights(tmp_path: Path) -> None:
    """The pure generator shares the LightningModule's submodules, so checkpoints are its weights."""
    from tests.hf_fixtures import make_bert_folder
    from tests.ldm_fixtures import build_module, tiny_clap_config, tiny_unet_config, tiny_vae_config

    config = {"class_path": "latent_diffusion",
              "init_args": {"unet": tiny_unet_config(), "vae": tiny_vae_config(), "scale_factor": 1.0,
                            "clap": tiny_clap_config(make_bert_folder(tmp_path / "bert")),
                            "mel": "demo"}}
    module = build_module(config)
    gen = module.generator
    assert gen is module.generator and gen.model is module.model and gen.codec is module.codec
    assert list(gen.state_dict()) == list(module.state_dict())
    assert set(gen.components()) == {"unet", "vae", "clap"}
    assert not any(name.startswith("generator") for name, _ in module.named_modules())
