"""Shards with cached conditioning encoders (``tta data shard --with clap,clap_audio,t5``): the
arrays equal the live encoders' for the batch's captions / segments, the LDM, an AudioLDM 2-style
LDM and DreamAudio give the same losses from them, other encoders are refused, bad options name
the option."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.hf_fixtures import make_t5_folder
from tests.ldm_fixtures import build, build_module, component_checkpoints, tiny_dreamaudio_config, tiny_unet_config
from tests.test_shards import _shard
from tta.data.manifest import read_manifest, write_manifest
from tta.data.shards import ShardError, ShardIndex, ShardReader, caption_rows, item_captions
from tta.data.shards_datamodule import ShardDataModule
from tta.encoders.text import T5TextEncoder
from tta.generators.conditioning.text_tokens import TextTokenContext
from tta.generators.ldm.module import LatentDiffusionModule
from tta.generators.ldm.shard_conditions import check_cached_conditions

SEGMENT = 0.75  # seconds: 64 demo-mel frames (a multiple of the DreamAudio VAE's factor 4)
LENGTH = 8  # T5 tokens per caption (the tiny DreamAudio config's max_length)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def manifest(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 training clips of `tiny_synth`; the first has three captions, the second none."""
    items = [i for i in read_manifest(tiny_synth) if i.split == "train"][:8]
    items[0].captions = ["a dog barks", "a siren wails twice in the distance", "rain falls on a roof"]
    items[1].captions = []
    return write_manifest(items, tmp_path_factory.mktemp("captions") / "manifest.jsonl")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny VAE (8 latent channels, demo mel) and two CLAP checkpoints, two T5 folders (width 32)."""
    root = tmp_path_factory.mktemp("models")
    vae, clap = component_checkpoints(root, mel="demo")
    ckpt = torch.load(clap, map_location="cpu", weights_only=False)
    key = next(k for k in ckpt["state_dict"] if "text_projection" in k)
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 0.01  # another CLAP: the same but one tensor
    other_clap = root / "other_clap.ckpt"
    torch.save(ckpt, other_clap)
    return {"vae": vae, "clap": clap, "other_clap": other_clap, "t5": make_t5_folder(root / "t5"),
            "other_t5": make_t5_folder(root / "t5b", seed=1)}


def _first_batch(folder: Path, **kwargs: Any) -> dict[str, Any]:
    dm = ShardDataModule(str(folder), mel="demo", segment_seconds=SEGMENT, batch_size=8, shuffle=False, **kwargs)
    return next(iter(dm.train_dataloader()))


def _without(batch: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k not in keys}


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the frozen encoder ran although the batch carries its outputs")


def _ldm(models: dict[str, Path], **kwargs: Any) -> LatentDiffusionModule:
    unet = tiny_unet_config()
    unet["init_args"].update(in_channels=8, out_channels=8)
    if kwargs.get("clap_checkpoint") is None:
        unet["init_args"].update(film_dim=0, context_dims={"prompt": 32})
    torch.manual_seed(0)
    return LatentDiffusionModule(unet=build(unet), vae_checkpoint=str(models["vae"]), mel="demo", cfg_dropout=0.5,
                                 **kwargs).train()


def test_clap_cache_equals_live_and_gives_the_same_losses(manifest: Path, models: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, single_thread: None) -> None:
    out = tmp_path / "clap"
    assert _shard(manifest, out, "--with", "mel,clap,clap_audio", "--clap", str(models["clap"]), "--segment-seconds",
                  str(SEGMENT), size=3) == 0
    index = ShardIndex.load(out)
    assert index.arrays == ["clap", "clap_audio", "mel"] and index.segment_frames == 64
    assert (index.inputs("clap"), index.inputs("clap_audio")) == ("text", "wav")
    assert index.sources["clap"]["batch_key"] == "clap_text" and index.sources["clap"]["checkpoint"] == "clap.ckpt"
    module = _ldm(models, clap_checkpoint=str(models["clap"]))
    film = module.model.text
    reader = ShardReader(index.path(0), ["clap"])
    records = [reader.read(i) for i in range(len(reader))]
    reader.close()
    assert [len(caption_rows(item_captions(r.item))) for r in records][:2] == [3, 1]  # a row per caption, "" if none
    for record in records:
        rows = caption_rows(item_captions(record.item))
        assert record.arrays["clap"].shape == (len(rows), 16)
        torch.testing.assert_close(torch.from_numpy(record.arrays["clap"]), film.embed(rows), atol=1e-5, rtol=1e-5)

    batch = _first_batch(out)
    assert batch["start"] == [0] * 8  # the clap_audio segment fixes the crop
    assert any(caps and c != caps[0] for c, caps in zip(batch["caption"], batch["captions"], strict=True))
    torch.testing.assert_close(batch["clap_text"], film.embed(batch["caption"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch["clap_audio"], film.embed_audio(batch["wav"], 22050), atol=1e-5, rtol=1e-5)
    live = module.clip_losses(_without(batch, "clap_text", "clap_audio"))
    monkeypatch.setattr(film.clap, "embed_text", _boom)
    torch.testing.assert_close(module.clip_losses(batch), live, atol=1e-5, rtol=1e-5)

    audio = _ldm(models, clap_checkpoint=str(models["clap"]), film_source="audio")
    live = audio.clip_losses(_without(batch, "clap_text", "clap_audio"))
    monkeypatch.setattr(audio.model.text.clap, "embed_audio", _boom)
    torch.testing.assert_close(audio.clip_losses(batch), live, atol=1e-5, rtol=1e-5)

    dm = ShardDataModule(str(out), mel="demo", segment_seconds=SEGMENT)
    check_cached_conditions(module.model, "text", dm)
    check_cached_conditions(audio.model, "audio", dm)
    other = _ldm(models, clap_checkpoint=str(models["other_clap"]))
    with pytest.raises(ValueError, match=r"cached CLAP text embeddings were made by CLAP 'clap.ckpt' \(sources of "
                                         r".*index.json.*sha256 .* \(cache\) vs .* \(model\).*--with clap --clap"):
        check_cached_conditions(other.model, "text", dm)
    with pytest.raises(ValueError, match="cached CLAP audio embeddings were made by CLAP 'clap.ckpt'"):
        check_cached_conditions(other.model, "audio", dm)


def test_t5_cache_equals_live_and_gives_the_same_losses(manifest: Path, models: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, single_thread: None) -> None:
    out = tmp_path / "t5"
    assert _shard(manifest, out, "--with", "t5", "--t5", str(models["t5"]), "--t5-length", str(LENGTH), size=3) == 0
    index = ShardIndex.load(out)
    assert index.arrays == ["t5", "t5_mask"] and index.segment_frames is None
    assert index.sources["t5"]["max_length"] == LENGTH and index.sources["t5_mask"]["batch_key"] == "t5_mask"
    batch = _first_batch(out)
    assert any(s != 0 for s in batch["start"])  # text caches leave the crops random
    assert any(caps and c != caps[0] for c, caps in zip(batch["caption"], batch["captions"], strict=True))
    encoder = T5TextEncoder(models["t5"], max_length=LENGTH)
    seq, mask = TextTokenContext(encoder).encode({"captions": batch["caption"]}, CPU)
    assert batch["t5_tokens"].shape == (8, LENGTH, 32)
    torch.testing.assert_close(batch["t5_tokens"], seq, atol=1e-5, rtol=1e-5)
    assert torch.equal(batch["t5_mask"] > 0.5, mask)

    module = _ldm(models, conditioners={"prompt": TextTokenContext(T5TextEncoder(models["t5"], max_length=LENGTH))})
    live = module.clip_losses(_without(batch, "t5_tokens", "t5_mask"))
    monkeypatch.setattr(module.model.conditioners["prompt"].encoder, "_encode", _boom)
    torch.testing.assert_close(module.clip_losses(batch), live, atol=1e-5, rtol=1e-5)
    wrong = dict(batch, caption=["a dog is barking loudly" if c == "" else c for c in batch["caption"]])
    with pytest.raises(ValueError, match="computed for another caption"):
        module.clip_losses(wrong)

    dm = ShardDataModule(str(out), mel="demo", segment_seconds=SEGMENT)
    check_cached_conditions(module.model, "text", dm)
    other_weights, shorter = (models["other_t5"], LENGTH, "sha256"), (models["t5"], 6, r"max_length 8 \(cache\) vs 6")
    for folder, length, why in (other_weights, shorter):
        other = _ldm(models, conditioners={"prompt": TextTokenContext(T5TextEncoder(folder, max_length=length))})
        with pytest.raises(ValueError, match=r"cached T5 token states \(read by conditioner 'prompt'\) were made by "
                                             rf"text encoder 't5'.*{why}"):
            check_cached_conditions(other.model, "text", dm)
    with pytest.raises(ShardError, match=r"need \['t5_mask'\] too"):
        ShardDataModule(str(out), mel="demo", use_cached=["t5"]).train_dataloader()
    other_out = tmp_path / "t5b"
    assert _shard(manifest, other_out, "--with", "t5", "--t5", str(models["other_t5"]), "--t5-length", str(LENGTH)) == 0
    with pytest.raises(ShardError, match="were made by other models"):
        ShardDataModule(str(out), val=str(other_out), mel="demo").val_dataloader()

    # DreamAudio: the prompt's T5 states from the batch, the references' captions live
    dream = build_module(tiny_dreamaudio_config(models["t5"], ctx_dim=32)).train()
    g = torch.Generator().manual_seed(0)
    refs = {"reference_wav": 0.1 * torch.randn(8, 3, 22050, generator=g),
            "reference_present": torch.tensor([[True, True, False]] * 8),
            "reference_captions": [["rain falls on a roof", "a bell rings three times", ""]] * 8}
    cached = {**batch, **refs}
    live = dream.clip_losses(_without(cached, "t5_tokens", "t5_mask"))
    torch.testing.assert_close(dream.clip_losses(cached), live, atol=1e-5, rtol=1e-5)
    check_cached_conditions(dream.model, "text", dm)


@pytest.mark.parametrize(("args", "message"), [
    (["--with", "t5"], "--with t5 needs --t5 FOLDER"),
    (["--with", "clap"], "--with clap needs --clap CKPT_OR_FOLDER"),
    (["--with", "clap_audio", "--clap", "clap.ckpt"], "--with clap_audio needs --segment-seconds"),
    (["--with", "mel", "--clap", "clap.ckpt"], "--clap applies to --with clap / clap_audio only"),
    (["--t5-length", "8"], "--t5 and --t5-length apply to --with t5 only"),
    (["--with", "t5_mask"], "--with: unknown arrays ['t5_mask']"),
])
def test_bad_with_combinations_name_the_option(manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               args: list[str], message: str) -> None:
    assert _shard(manifest, tmp_path / "out", *args) == 2
    assert message in capsys.readouterr().err
