"""The caption-keyed T5 cache of the manifest datamodules (``tta data text-cache``, issue 18): its
states equal the live encoder's for prompts and reference captions, a DreamAudio step from it
equals the live step, caches of another T5 or length are refused at fit start naming the cache
index, missing captions are named, bad options exit 2 with one line."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.hf_fixtures import WIDTH, make_t5_folder
from tests.ldm_fixtures import build_module, customized_manifest, tiny_dreamaudio_config
from tests.test_dreamaudio import perturb
from tta.cli import main
from tta.data.datamodule import AudioDataModule
from tta.data.references import ReferenceAudioDataModule
from tta.data.text_cache import REF_T5_MASK_KEY, REF_T5_TOKENS_KEY, T5_MASK_KEY, T5_TOKENS_KEY, TextCache
from tta.encoders.text import T5TextEncoder
from tta.generators.conditioning.text_tokens import TextTokenContext
from tta.generators.ldm import shard_conditions
from tta.generators.ldm.shard_conditions import check_cached_conditions

pytestmark = pytest.mark.usefixtures("single_thread")

LENGTH = 8  # T5 tokens per caption (the tiny DreamAudio config's max_length)
CPU = torch.device("cpu")
CACHED = (T5_TOKENS_KEY, T5_MASK_KEY, REF_T5_TOKENS_KEY, REF_T5_MASK_KEY)


def _text_cache(manifest: Path, t5: Path, out: Path, *extra: str, length: int = LENGTH) -> int:
    return main(["data", "text-cache", "--manifest", str(manifest), "--t5", str(t5), "--t5-length", str(length),
                 "--out", str(out), *extra])


@pytest.fixture(scope="module")
def cache_dirs(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A customized (DreamAudio) manifest, two tiny T5 folders and caches: the model's T5 at
    LENGTH tokens, another T5, another length, and the training split alone."""
    root = tmp_path_factory.mktemp("text_cache")
    paths = {"manifest": customized_manifest(tiny_synth, root / "concat"), "t5": make_t5_folder(root / "t5"),
             "other_t5": make_t5_folder(root / "t5b", seed=1)}
    for name, t5, extra, length in (("cache", "t5", (), LENGTH), ("other_weights", "other_t5", (), LENGTH),
                                    ("other_length", "t5", (), 6), ("train_only", "t5", ("--split", "train"), LENGTH)):
        paths[name] = root / name
        assert _text_cache(paths["manifest"], paths[t5], paths[name], *extra, length=length) == 0
    return paths


def _datamodule(cache_dirs: dict[str, Path], cache: str = "cache", cls: type = ReferenceAudioDataModule,
                **kwargs: Any) -> AudioDataModule:
    if cls is ReferenceAudioDataModule:
        kwargs.update(num_references=3, reference_seconds=1.0)
    return cls(manifest=str(cache_dirs["manifest"]), mel="demo", segment_seconds=1.0, batch_size=3,
               text_cache=str(cache_dirs[cache]), **kwargs)


def _first_batch(dm: AudioDataModule) -> dict[str, Any]:
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _live(t5: Path, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return TextTokenContext(T5TextEncoder(t5, max_length=LENGTH)).encode({"captions": captions}, CPU)


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the frozen T5 ran although the batch carries its outputs")


def test_cached_states_equal_the_live_encoder(cache_dirs: dict[str, Path], tmp_path: Path) -> None:
    cache = TextCache.load(cache_dirs["cache"])
    items = [json.loads(line) for line in cache_dirs["manifest"].read_text().splitlines()]
    refs = {r["caption"] for i in items for r in i.get("references", [])}
    assert refs and refs <= set(cache.captions) and "" in cache.captions
    assert {c for i in items for c in i["captions"]} <= set(cache.captions)
    assert cache.captions == sorted(cache.captions) and cache.meta["max_length"] == LENGTH
    index = json.loads(cache.index_path.read_text())
    assert index["manifest"]["name"] == cache_dirs["manifest"].name and index["count"] == len(cache)
    seq, mask = cache.lookup(cache.captions)
    live_seq, live_mask = _live(cache_dirs["t5"], cache.captions)
    assert seq.dtype == torch.float32 and mask.dtype == torch.bool
    assert torch.equal(seq, live_seq) and torch.equal(mask, live_mask)
    again = tmp_path / "again"  # deterministic
    assert _text_cache(cache_dirs["manifest"], cache_dirs["t5"], again) == 0
    for name in ("index.json", "captions.json", "t5.npy", "t5_mask.npy"):
        assert (again / name).read_bytes() == (cache_dirs["cache"] / name).read_bytes(), name

    batch = _first_batch(_datamodule(cache_dirs))  # prompt and reference captions of a DreamAudio batch
    live_seq, live_mask = _live(cache_dirs["t5"], batch["caption"])
    assert torch.equal(batch[T5_TOKENS_KEY], live_seq)
    assert torch.equal(batch[T5_MASK_KEY], live_mask)
    flat = [c for row in batch["reference_captions"] for c in row]
    assert any(c == "" for c in flat) and any(c != "" for c in flat)
    live_seq, live_mask = _live(cache_dirs["t5"], flat)
    assert batch[REF_T5_TOKENS_KEY].shape == (3, 3, LENGTH, WIDTH) and batch[REF_T5_MASK_KEY].shape == (3, 3, LENGTH)
    assert torch.equal(batch[REF_T5_TOKENS_KEY].flatten(0, 1), live_seq)
    assert torch.equal(batch[REF_T5_MASK_KEY].flatten(0, 1), live_mask)

    plain = _datamodule(cache_dirs, cls=AudioDataModule)  # the LDM's datamodule: prompts only
    batch = _first_batch(plain)
    assert T5_TOKENS_KEY in batch and REF_T5_TOKENS_KEY not in batch
    assert set(plain.cached_sources()) == {T5_TOKENS_KEY}
    assert plain.index_path() == cache_dirs["cache"] / "index.json"
    predict = next(iter(plain.predict_dataloader()))
    assert T5_TOKENS_KEY not in predict  # predict batches are unchanged


def test_dreamaudio_step_from_the_cache_equals_the_live_step(cache_dirs: dict[str, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _first_batch(_datamodule(cache_dirs))
    torch.manual_seed(0)
    dream = build_module(tiny_dreamaudio_config(cache_dirs["t5"], WIDTH))
    perturb(dream)  # the zero-initialised reference path contributes
    dream.train()
    live = dream.clip_losses({k: v for k, v in batch.items() if k not in CACHED})
    other = dict(batch, **{REF_T5_TOKENS_KEY: batch[REF_T5_TOKENS_KEY] + 1.0})
    monkeypatch.setattr(dream.model.conditioners["prompt"].encoder, "_encode", _boom)  # shared with refcap
    torch.testing.assert_close(dream.clip_losses(batch), live, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dream.clip_losses(other), live, atol=1e-4)  # the reference states are read
    swapped = dict(batch, reference_captions=[list(reversed(row)) for row in batch["reference_captions"]])
    with pytest.raises(ValueError, match="'reference_cached_tokens'.*computed for another caption"):
        dream.clip_losses(swapped)


def test_another_encoder_or_length_is_refused_at_fit_start(cache_dirs: dict[str, Path]) -> None:
    torch.manual_seed(0)
    dream = build_module(tiny_dreamaudio_config(cache_dirs["t5"], WIDTH))
    dream._trainer = SimpleNamespace(datamodule=_datamodule(cache_dirs))
    dream.on_fit_start()  # the model's own cache
    for cache, why in (("other_weights", r"sha256 \w+ \(cache\) vs \w+ \(model\)"),
                       ("other_length", r"max_length 6 \(cache\) vs 8 \(model\)")):
        dm = _datamodule(cache_dirs, cache)
        dream._trainer = SimpleNamespace(datamodule=dm)
        index = re.escape(str(cache_dirs[cache] / "index.json"))
        with pytest.raises(ValueError, match=rf"cached T5 token states \(read by conditioner 'prompt'\) were made by "
                                             rf"text encoder 't5b?' \(sources of {index}.*{why}.*tta data text-cache"):
            dream.on_fit_start()
        # the reference captions' cache is checked against the shared encoder too
        meta = dm.cached_sources()[REF_T5_TOKENS_KEY]
        refs_only = SimpleNamespace(cached_sources=lambda meta=meta: {REF_T5_TOKENS_KEY: meta},
                                    index_path=dm.index_path)
        with pytest.raises(ValueError, match=rf"reference captions' T5 token states \(read by conditioner 'refcap'\)"
                                             rf".*{index}.*{why}"):
            check_cached_conditions(dream.model, "text", refs_only)
    assert shard_conditions.T5_TOKENS_KEY == T5_TOKENS_KEY  # one definition, the data layer's


def test_missing_captions_are_named(cache_dirs: dict[str, Path]) -> None:
    cache = TextCache.load(cache_dirs["cache"])
    folder = re.escape(str(cache.folder))
    with pytest.raises(KeyError, match=rf"caption 'a kazoo solo' is not in the text cache {folder}"):
        cache.lookup(["", "a kazoo solo"])
    with pytest.raises(ValueError, match=r"text cache .*train_only lacks \d+ captions of split 'val'"):
        _datamodule(cache_dirs, "train_only").setup("fit")


@pytest.mark.parametrize(("args", "message"), [
    (["--out", "{out}"], "--t5 FOLDER is required"),
    (["--t5", "{t5}", "--out", "{cache}"], "--out {cache} is not empty"),
    (["--t5", "{t5}", "--t5-length", "0", "--out", "{out}"], "--t5-length must be an integer >= 1"),
])
def test_bad_options_exit_2_with_one_line(cache_dirs: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    fill = {"out": str(tmp_path / "out"), "t5": str(cache_dirs["t5"]), "cache": str(cache_dirs["cache"])}
    capsys.readouterr()
    assert main(["data", "text-cache", "--manifest", str(cache_dirs["manifest"]),
                 *[a.format(**fill) for a in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tta data text-cache: error:")
    assert message.format(**fill) in err
    assert not (tmp_path / "out").exists()
