"""Recipe tier: the paper configs chain as documented (docs/ldm.md, "Recipes").

Each documented chain runs through the `tta` command on the real YAMLs of `configs/`, one training
step per stage, every stage consuming the previous stage's real output (checkpoint, index, feature
store). Overrides may only shrink depth and size (layers, channels, clip length, batch, steps) or
substitute paths (pretrained folders become tiny random ones built with the interface widths the
configs declare): `recipe_args` refuses any key of `INTERFACE_WIDTHS`, so two configs that disagree
on a width fail here instead of being made to fit.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.conftest import CONFIGS
from tests.hf_fixtures import make_gpt2_folder, make_t5_folder
from tta.cli import main
from tta.data.customize_refs import item_references
from tta.data.manifest import read_manifest

log = logging.getLogger(__name__)

pytestmark = pytest.mark.recipe

# Keys that fix a width (or the mel front-end, or the store's token length) one component hands to
# another: a recipe test may not override them, at any depth of the override's value.
INTERFACE_WIDTHS = frozenset({
    "audio_dim", "text_dim", "context_dim", "context_dims", "film_dim",  # retrieval / FiLM / cross-attention
    "out_dim", "embed_dim", "dim", "joint_dim",                          # feature producers, CLAP
    "in_channels", "out_channels", "z_channels",                         # VAE latents <-> UNet
    "mel", "mel_preset", "n_mels", "text_length",                        # mel front-end, store length
})  # fmt: skip
# Sections whose components may not be swapped (`class_path`): shrinking keeps every component.
NO_SWAP = ("model", "data")


class InterfaceOverrideError(ValueError):
    """A recipe override touched an interface width or swapped a component."""


def _keys(value: Any) -> Iterator[str]:
    """Every mapping key inside ``value`` (nested dicts and lists)."""
    if isinstance(value, Mapping):
        for key, inner in value.items():
            yield str(key)
            yield from _keys(inner)
    elif isinstance(value, (list, tuple)):
        for inner in value:
            yield from _keys(inner)


def _without_paths(value: Any) -> Any:
    """``value`` with every ``path`` entry blanked (what a path substitution may change)."""
    if isinstance(value, Mapping):
        return {k: None if k == "path" else _without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    return value


def _config_value(config: str, key: str) -> Any:
    value: Any = yaml.safe_load((CONFIGS / config).read_text())
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def recipe_args(overrides: Mapping[str, Any], config: str | None = None) -> list[str]:
    """``--key=value`` CLI arguments for depth/size shrinking and path substitutions.

    Raises `InterfaceOverrideError` for a key (a dotted component or a key nested in its value) in
    `INTERFACE_WIDTHS`, and for a ``class_path`` under `NO_SWAP`, unless the value is ``config``'s own
    value at that key with only ``path`` entries substituted (a dict entry cannot be set by a flag).
    """
    out = []
    for key, value in overrides.items():
        if config is not None and isinstance(value, Mapping) and \
                _without_paths(value) == _without_paths(_config_value(config, key)):
            out.append(f"--{key}={json.dumps(value)}")  # the config's own value, paths substituted
            continue
        names = [*key.split("."), *_keys(value)]
        widths = sorted(set(names) & INTERFACE_WIDTHS)
        if widths:
            raise InterfaceOverrideError(
                f"recipe override {key!r} sets the interface width(s) {widths}: recipes shrink depth and size "
                "only; if two configs disagree on a width, fix the configs"
            )
        if key.split(".")[0] in NO_SWAP and "class_path" in names:
            raise InterfaceOverrideError(f"recipe override {key!r} swaps a component; recipes only shrink them")
        out.append(f"--{key}={value if isinstance(value, str) else json.dumps(value)}")
    return out


def one_step(root: Path) -> dict[str, Any]:
    """Trainer knobs of every stage: one step on the CPU, a checkpoint in ``root / "ck"``."""
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(root / "ck"), "every_n_train_steps": 1}}
    return {"trainer.default_root_dir": str(root), "trainer.accelerator": "cpu", "trainer.devices": 1,
            "trainer.precision": "32-true", "trainer.max_steps": 1, "trainer.num_sanity_val_steps": 0,
            "trainer.logger": False, "trainer.enable_progress_bar": False, "trainer.callbacks": [checkpoint]}


def data(manifest: Path, batch_size: int = 2) -> dict[str, Any]:
    """Data knobs: the tiny synthetic manifest, its 1 s clips, a small batch, no workers."""
    return {"data.init_args.manifest": str(manifest), "data.init_args.segment_seconds": 1.0,
            "data.init_args.batch_size": batch_size, "data.init_args.num_workers": 0}


def run(command: str, config: str, overrides: Mapping[str, Any]) -> None:
    """``tta <command> --config configs/<config>`` with `recipe_args` of ``overrides``."""
    argv = [command, "--config", str(CONFIGS / config), *recipe_args(overrides, config)]
    log.info("recipe: tta %s", " ".join(argv))
    assert main(argv) == 0


def fit(config: str, root: Path, overrides: Mapping[str, Any]) -> Path:
    """One `tta fit` step of ``config`` under ``root``; its checkpoint."""
    run("fit", config, {**one_step(root), **overrides})
    return next((root / "ck").glob("*.ckpt"))


def paper(config: str) -> dict[str, Any]:
    """The ``model.init_args`` of a paper config, as written."""
    return yaml.safe_load((CONFIGS / config).read_text())["model"]["init_args"]


CLAP_TOWER = "model.init_args.clap.init_args."
# The UNets of AudioLDM-S / Re-AudioLDM-S (head width 32) and Re-AudioLDM-L (head width 28), two
# levels of one res block; latent channels, FiLM and context widths stay the configs'.
UNET = "model.init_args.unet.init_args."
UNET_S = {f"{UNET}model_channels": 32, f"{UNET}channel_mult": [1, 2], f"{UNET}num_res_blocks": 1,
          f"{UNET}attention_resolutions": [2]}
UNET_L = {**UNET_S, f"{UNET}model_channels": 28, f"{UNET}num_heads": [1, 2]}


# --------------------------------------------------------------------------- the helper itself
def test_recipe_args_refuse_interface_widths_and_swaps() -> None:
    assert recipe_args({"model.init_args.unet.init_args.model_channels": 32, "trainer.logger": False,
                        "model.init_args.unet.init_args.channel_mult": [1, 2], "data.init_args.manifest": "m.jsonl"}) \
        == ["--model.init_args.unet.init_args.model_channels=32", "--trainer.logger=false",
            "--model.init_args.unet.init_args.channel_mult=[1, 2]", "--data.init_args.manifest=m.jsonl"]
    for key, value in (("model.init_args.retrieval.init_args.audio_dim", 32),
                       ("model.init_args.unet.init_args.film_dim", 16),
                       ("model.init_args.unet.init_args.context_dims", {"retrieval": 16}),
                       ("model.init_args.retrieval.init_args", {"k": 3, "text_dim": 10}),  # nested
                       ("model.init_args.audio_encoder.init_args.out_dim", 768),
                       ("model.init_args.autoencoder.init_args.embed_dim", 4),
                       ("model.init_args.clap.init_args.joint_dim", 16),
                       ("model.init_args.generator.init_args.n_mels", 80),
                       ("data.init_args.mel", "demo")):
        with pytest.raises(InterfaceOverrideError, match="interface width"):
            recipe_args({key: value})
    with pytest.raises(InterfaceOverrideError, match="swaps a component"):
        recipe_args({"model.init_args.text_encoder": {"class_path": "minilm_text"}})
    # a config's own component with only its local folder substituted passes; anything else changed does not
    conditioners = paper("dreamaudio.yaml")["conditioners"]
    conditioners["prompt"]["init_args"]["encoder"]["init_args"]["path"] = "/tmp/t5"
    assert recipe_args({"model.init_args.conditioners": conditioners}, "dreamaudio.yaml") == [
        "--model.init_args.conditioners=" + json.dumps(conditioners)]
    conditioners["prompt"]["init_args"]["encoder"]["class_path"] = "minilm_text"
    with pytest.raises(InterfaceOverrideError, match="swaps a component"):
        recipe_args({"model.init_args.conditioners": conditioners}, "dreamaudio.yaml")


# ----------------------------------------------------------------------------------- stages
@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread while the stages (module fixtures, set up before any function-scoped
    `single_thread`) run: on a loaded 2-core machine two threads made them ~5x slower."""
    import torch

    from tta.utils.threads import set_threads

    threads = torch.get_num_threads()
    set_threads(1)
    yield
    set_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("recipes")


@pytest.fixture(scope="module")
def gpt2(root: Path) -> Path:
    """Stand-in for a local GPT2 folder, with GPT2's 1024 positions (prefix + caption fit)."""
    return make_gpt2_folder(root / "gpt2", n_positions=1024)


@pytest.fixture(scope="module")
def clap_ckpt(root: Path, gpt2: Path, tiny_synth: Path) -> Path:
    """configs/clap.yaml: HTSAT at its paper widths with one block per stage, 1 s windows."""
    audio = CLAP_TOWER + "audio_encoder.init_args."
    return fit("clap.yaml", root / "clap", {
        f"{audio}depths": [1, 1, 1, 1], f"{audio}spec_frames": 128, f"{audio}window_seconds": 1.0,
        f"{CLAP_TOWER}text_encoder.init_args.path": str(gpt2), **data(tiny_synth, batch_size=4),
    })  # fmt: skip


@pytest.fixture(scope="module")
def index(root: Path, clap_ckpt: Path, tiny_synth: Path) -> Path:
    """`tta index build` over the training split with the CLAP checkpoint (as the store covers)."""
    out = root / "index"
    assert main(["index", "build", "--manifest", str(tiny_synth), "--clap", str(clap_ckpt), "--out", str(out),
                 "--splits", "train"]) == 0
    return out


@pytest.fixture(scope="module")
def vae_ckpt(root: Path, tiny_synth: Path) -> Path:
    """configs/vae.yaml: 16 channels, one res block, the same compression and latent channels."""
    vae, disc = "model.init_args.autoencoder.init_args.", "model.init_args.discriminator.init_args."
    return fit("vae.yaml", root / "vae", {f"{vae}ch": 16, f"{vae}num_res_blocks": 1, f"{disc}ndf": 8,
                                          f"{disc}n_layers": 1, **data(tiny_synth)})


@pytest.fixture(scope="module")
def hifigan_ckpt(root: Path, tiny_synth: Path) -> Path:
    """configs/hifigan.yaml: 64 initial channels, one res block kernel, slim discriminators."""
    gen, model = "model.init_args.generator.init_args.", "model.init_args."
    return fit("hifigan.yaml", root / "hifigan", {
        f"{gen}upsample_initial_channel": 64, f"{gen}resblock_kernel_sizes": [3],
        f"{gen}resblock_dilation_sizes": [[1, 3, 5]], f"{model}mpd.init_args.periods": [2, 3],
        f"{model}mpd.init_args.channel_mult": 0.125, f"{model}msd.init_args.num_scales": 1,
        f"{model}msd.init_args.channel_mult": 0.125, **data(tiny_synth), "data.init_args.segment_seconds": 0.512,
    })  # fmt: skip


def ldm_inputs(vae_ckpt: Path, clap_ckpt: Path, tiny_synth: Path) -> dict[str, Any]:
    """The frozen VAE and CLAP of an (Re-)AudioLDM stage and its data."""
    return {"model.init_args.vae_checkpoint": str(vae_ckpt), "model.init_args.clap_checkpoint": str(clap_ckpt),
            **data(tiny_synth)}


@pytest.fixture(scope="module")
def audioldm_ckpt(root: Path, vae_ckpt: Path, clap_ckpt: Path, tiny_synth: Path) -> Path:
    """configs/audioldm.yaml on the VAE and CLAP checkpoints above."""
    return fit("audioldm.yaml", root / "audioldm", {**UNET_S, **ldm_inputs(vae_ckpt, clap_ckpt, tiny_synth)})


@pytest.fixture(scope="module")
def feature_store(root: Path, tiny_synth: Path) -> Path:
    """`tta predict` of configs/retrieval_features.yaml: AudioMAE ViT-B widths with one block on 1 s
    clips, and a Flan-T5-large-wide (1024) one-layer T5 folder in place of Flan-T5-large."""
    out, mae = root / "features", "model.init_args.audio_encoder.init_args."
    t5 = make_t5_folder(root / "t5", d_model=1024, num_layers=1)
    run("predict", "retrieval_features.yaml", {
        "trainer.default_root_dir": str(root / "features_predict"), "trainer.accelerator": "cpu",
        "trainer.devices": 1, "trainer.enable_progress_bar": False, "model.init_args.out_dir": str(out),
        f"{mae}depth": 1, f"{mae}clip_seconds": 1.0, f"{mae}num_frames": 96,
        "model.init_args.text_encoder.init_args.path": str(t5), **data(tiny_synth, batch_size=8),
    })  # fmt: skip
    return out


# ----------------------------------------------------------------------------------- chains
def test_clap_feeds_index_and_captioner(clap_ckpt: Path, index: Path, root: Path, gpt2: Path,
                                        tiny_synth: Path) -> None:
    """clap -> `tta index build` (CLAP joint space) and clap -> clap_caption."""
    meta = json.loads((index / "meta.json").read_text())
    train = [item for item in read_manifest(tiny_synth) if item.split == "train"]
    assert meta["count"] == len(train) and meta["dim"] == paper("clap.yaml")["clap"]["init_args"]["joint_dim"]
    cap = "model.init_args.captioner.init_args."
    fit("clap_caption.yaml", root / "clap_caption", {f"{cap}clap_checkpoint": str(clap_ckpt), f"{cap}lm": str(gpt2),
                                                     f"{cap}mapper_layers": 1, **data(tiny_synth)})


def test_vae_and_hifigan_feed_audioldm(audioldm_ckpt: Path, hifigan_ckpt: Path, root: Path) -> None:
    """vae + clap -> audioldm (fit), + hifigan -> a pipeline folder that generates."""
    pipe, out = root / "audioldm_pipeline", root / "generations"
    assert main(["pipeline", "export", str(audioldm_ckpt), "--out", str(pipe), "--vocoder", str(hifigan_ckpt),
                 "--steps", "2"]) == 0
    assert main(["generate", "a bell rings", "--pipeline", str(pipe), "--duration", "0.5", "--out", str(out),
                 "--allow-silent"]) == 0
    assert len((out / "generations.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("config", ["re_audioldm.yaml", "re_audioldm_l.yaml"])
def test_retrieval_features_feed_re_audioldm(config: str, feature_store: Path, index: Path, vae_ckpt: Path,
                                             clap_ckpt: Path, audioldm_ckpt: Path, root: Path,
                                             tiny_synth: Path) -> None:
    """retrieval_features + index + vae + clap (+ audioldm via `init_from`, S only) -> Re-AudioLDM."""
    retrieval = "model.init_args.retrieval.init_args."
    overrides = {**(UNET_S if config == "re_audioldm.yaml" else UNET_L),
                 **ldm_inputs(vae_ckpt, clap_ckpt, tiny_synth),
                 f"{retrieval}features": str(feature_store), f"{retrieval}index": str(index)}
    if config == "re_audioldm.yaml":  # fine-tuned from AudioLDM-S (same UNet), as the config documents
        overrides["model.init_args.init_from"] = str(audioldm_ckpt)
    fit(config, root / config.removesuffix(".yaml"), overrides)


@pytest.fixture(scope="module")
def bigvgan_ckpt(root: Path, tiny_synth: Path) -> Path:
    """configs/bigvgan.yaml (16 kHz AudioLDM mels): 32 initial channels, one AMP kernel, slim discriminators."""
    gen, model = "model.init_args.generator.init_args.", "model.init_args."
    return fit("bigvgan.yaml", root / "bigvgan", {
        f"{gen}upsample_initial_channel": 32, f"{gen}resblock_kernel_sizes": [3],
        f"{gen}resblock_dilation_sizes": [[1, 3, 5]], f"{model}mpd.init_args.periods": [2, 3],
        f"{model}mpd.init_args.channel_mult": 0.125, f"{model}mrd.init_args.channel_mult": 0.25,
        **data(tiny_synth), "data.init_args.segment_seconds": 0.512,
    })  # fmt: skip


def test_vae_and_customized_data_feed_dreamaudio_with_bigvgan(root: Path, vae_ckpt: Path, bigvgan_ckpt: Path,
                                                               tiny_synth: Path) -> None:
    """`tta data customize` + vae -> dreamaudio (fit; a Flan-T5-large-wide one-layer T5 folder), + bigvgan
    -> a pipeline folder that generates with a reference clip (`tta generate --ref`)."""
    custom = root / "customized"
    assert main(["data", "customize", "--base", str(tiny_synth), "--kind", "concat", "--out", str(custom),
                 "--n", "4", "--refs", "3", "--seconds", "2", "--max-short", "1.5", "--sample-rate", "16000",
                 "--split", "train"]) == 0
    conditioners = paper("dreamaudio.yaml")["conditioners"]
    width = paper("dreamaudio.yaml")["unet"]["init_args"]["context_dims"]["prompt"]  # the config's own width
    conditioners["prompt"]["init_args"]["encoder"]["init_args"]["path"] = str(
        make_t5_folder(root / "flan_t5", d_model=width, num_layers=1))  # a path substituted, nothing else
    seconds = {"model.init_args.reference_seconds": 1.0, "data.init_args.reference_seconds": 1.0}
    ckpt = fit("dreamaudio.yaml", root / "dreamaudio", {
        **UNET_S, "model.init_args.vae_checkpoint": str(vae_ckpt), "model.init_args.conditioners": conditioners,
        **seconds, **data(custom / "manifest.jsonl"), "data.init_args.segment_seconds": 2.0,
    })  # fmt: skip
    pipe, out = root / "dreamaudio_pipeline", root / "dream_generations"
    assert main(["pipeline", "export", str(ckpt), "--out", str(pipe), "--vocoder", str(bigvgan_ckpt),
                 "--steps", "2"]) == 0
    first = read_manifest(custom / "manifest.jsonl")[0]
    reference = item_references(first, custom)[0].audio  # a reference clip the data builder wrote
    assert main(["generate", "a dog barks", "--pipeline", str(pipe), "--ref", f"{reference}=a dog barks",
                 "--duration", "1.0", "--out", str(out), "--allow-silent"]) == 0
    assert len((out / "generations.jsonl").read_text().splitlines()) == 1
    # the customized set's items with their own references, then `tta eval` recording them in its protocol
    assert main(["generate", "--manifest", str(custom / "manifest.jsonl"), "--pipeline", str(pipe), "--duration", "1.0",
                 "--out", str(out / "customized"), "--allow-silent"]) == 0
    rows = [json.loads(line) for line in (out / "customized" / "generations.jsonl").read_text().splitlines()]
    items = read_manifest(custom / "manifest.jsonl")
    assert [[r["audio"] for r in row["generation"]["references"]] for row in rows] == [
        [str(r.audio) for r in item_references(i, custom)] for i in items]
    assert main(["eval", "--generated", str(out / "customized" / "generations.jsonl"), "--reference",
                 str(custom / "manifest.jsonl"), "--metrics", "psnr", "--out", str(out / "eval"), "--no-cache"]) == 0
    protocol = json.loads((out / "eval" / "eval.json").read_text())["protocol"]
    assert protocol["conditioning_references"]["items_with_references"] == len(items)
    assert protocol["conditioning_references"]["references_per_item"] == sorted(
        {len(item_references(i, custom)) for i in items})
