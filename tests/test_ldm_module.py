"""AudioLDM / Re-AudioLDM training module: conditioning routes, neighbours, overfit, sampling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.hf_fixtures import make_bert_folder
from tests.ldm_fixtures import (
    CLAP_DIM,
    CTX_DIM,
    build,
    make_store_and_table,
    tiny_clap_config,
    tiny_unet_config,
    tiny_vae_config,
)
from tta.generators.ldm.module import LatentDiffusionModule
from tta.generators.ldm.retrieval import RetrievalConditioner


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert_folder(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def batch(tiny_synth: Path) -> dict[str, Any]:
    from tta.data.datamodule import AudioDataModule

    dm = AudioDataModule(manifest=str(tiny_synth), mel="demo", segment_seconds=0.75, batch_size=4)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def make_module(bert: Path, retrieval: RetrievalConditioner | None = None, **kw: Any) -> LatentDiffusionModule:
    torch.manual_seed(0)
    return LatentDiffusionModule(
        unet=build(tiny_unet_config(retrieval is not None)), vae=build(tiny_vae_config()), scale_factor=1.0,
        clap=build(tiny_clap_config(bert)), retrieval=retrieval, mel="demo", lr=2e-3, **kw,
    )


def test_components_must_be_given_once(bert: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of vae_checkpoint"):
        LatentDiffusionModule(unet=build(tiny_unet_config()), clap=build(tiny_clap_config(bert)), mel="demo")
    with pytest.raises(ValueError, match="scale_factor"):
        LatentDiffusionModule(unet=build(tiny_unet_config()), vae=build(tiny_vae_config()),
                              clap=build(tiny_clap_config(bert)), mel="demo")


def test_film_width_must_match_clap(bert: Path) -> None:
    cfg = tiny_unet_config()
    cfg["init_args"]["film_dim"] = 24
    with pytest.raises(ValueError, match="film_dim"):
        LatentDiffusionModule(unet=build(cfg), vae=build(tiny_vae_config()), scale_factor=1.0,
                              clap=build(tiny_clap_config(bert)), mel="demo")


def test_training_neighbours_exclude_the_clip_itself(tmp_path: Path) -> None:
    ids = [f"c{i}" for i in range(6)]
    features, index = make_store_and_table(ids, tmp_path)
    # a table row that lists the clip itself first (e.g. a store built without exclusion)
    import numpy as np

    from tta.retrieval.neighbours import NeighbourTable

    positions = np.array([[i, (i + 1) % 6, (i + 2) % 6, (i + 3) % 6] for i in range(6)])
    NeighbourTable(ids, ids, positions, np.ones((6, 4), np.float32), {}).save(index)
    cond = RetrievalConditioner(str(features), str(index), k=3, context_dim=CTX_DIM)
    chosen = cond.training_neighbours(ids)
    assert all(clip not in nb and len(nb) == 3 for clip, nb in zip(ids, chosen))
    assert chosen[0] == ["c1", "c2", "c3"]
    with pytest.raises(KeyError, match="no row in the neighbour table"):
        cond.training_neighbours(["unknown"])


def test_retrieval_context_shapes_modes_and_drop(tmp_path: Path) -> None:
    ids = [f"c{i}" for i in range(6)]
    features, index = make_store_and_table(ids, tmp_path)
    both = RetrievalConditioner(str(features), str(index), k=2, context_dim=CTX_DIM)
    seq, mask = both([["c1", "c2"], ["c3", "c4"]])
    assert seq.shape == (2, 2 * (3 + 5), CTX_DIM) and mask.shape == (2, 16)
    assert mask.sum().item() == 2 * 2 * (3 + 3)  # text keeps 3 of 5 real tokens
    audio_only = RetrievalConditioner(str(features), str(index), k=2, mode="audio", context_dim=CTX_DIM)
    assert audio_only([["c1", "c2"]])[0].shape == (1, 6, CTX_DIM) and audio_only.text_proj is None
    _, dropped = both([["c1", "c2"], ["c3", "c4"]], drop=torch.tensor([True, False]))
    assert not dropped[0].any() and dropped[1].any()
    with pytest.raises(ValueError, match="width"):
        _ = RetrievalConditioner(str(features), str(index), k=2, context_dim=CTX_DIM, audio_dim=99, text_dim=10).store


def test_retrieval_changes_output_and_k0_equals_plain(bert: Path, tmp_path: Path, batch: dict[str, Any],
                                                      single_thread: None) -> None:
    features, index = make_store_and_table(list(batch["id"]) + ["x0", "x1", "x2", "x3"], tmp_path)
    plain = make_module(bert)
    re_ldm = make_module(bert, RetrievalConditioner(str(features), str(index), k=2, context_dim=CTX_DIM))
    own, shared = re_ldm.state_dict(), plain.state_dict()
    assert set(shared) < set(own) and all(".retrieval." in k or k.startswith("model.retrieval.")
                                          for k in set(own) - set(shared))
    re_ldm.load_state_dict({**own, **shared})  # same weights everywhere but the retrieval parts
    with torch.no_grad():  # a trained retrieval attention (its output projection starts at zero)
        for name, p in re_ldm.model.unet.named_parameters():
            if ".retrieval." in name and "to_out" in name:
                p.normal_(0, 0.2)
    z = torch.randn(2, 4, 8, 40, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    captions = list(batch["caption"][:2])
    base = plain.model.denoise(z, t, plain.model.conditioning(captions))
    nb = re_ldm.model.retrieval.training_neighbours(batch["id"][:2])
    with_ret = re_ldm.model.denoise(z, t, re_ldm.model.conditioning(captions, nb))
    without = re_ldm.model.denoise(z, t, re_ldm.model.conditioning(captions, [[], []]))
    assert (with_ret - base).abs().max() > 1e-4
    torch.testing.assert_close(without, base, atol=1e-6, rtol=1e-5)
    dropped = re_ldm.model.unconditional(re_ldm.model.conditioning(captions, nb), drop=("retrieval",))
    torch.testing.assert_close(re_ldm.model.denoise(z, t, dropped), base, atol=1e-6, rtol=1e-5)


def test_tiny_overfit_loss_drops_and_sampling_works(bert: Path, batch: dict[str, Any], tmp_path: Path,
                                                    single_thread: None) -> None:
    import lightning as L

    module = make_module(bert, cfg_dropout=0.0)
    before = module.fixed_loss(batch).item()

    class Repeat(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 40

        def __getitem__(self, i: int) -> int:
            return i

    loader = torch.utils.data.DataLoader(Repeat(), batch_size=1, collate_fn=lambda _: batch)
    trainer = L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader)
    after = module.fixed_loss(batch).item()
    assert after < 0.8 * before, (before, after)
    assert module.batches_trained == 40

    module.eval()
    frames = batch["mel"].shape[-1]
    mel = module.generator.generate_mel(list(batch["caption"][:2]), frames, steps=4, guidance=2.0, seed=3)
    again = module.generator.generate_mel(list(batch["caption"][:2]), frames, steps=4, guidance=2.0, seed=3)
    assert mel.shape == (2, 80, frames) and torch.isfinite(mel).all()
    assert torch.equal(mel, again)
    odd = module.generator.generate_mel(["a bell rings"], 37, steps=2, guidance=1.0)  # not a multiple of any factor
    assert odd.shape == (1, 80, 37)
    module.eval_steps = 2  # the `eval_metrics` callback's hook: waveforms of the requested length
    wav = module.generate_for_eval(["a bell rings", "a dog barks"], ["a", "b"], 0.3)
    assert wav.shape == (2, round(0.3 * 22050)) and torch.isfinite(wav).all()


def test_init_from_plain_checkpoint_allows_only_retrieval_keys(bert: Path, tmp_path: Path,
                                                              batch: dict[str, Any]) -> None:
    plain = make_module(bert)
    with torch.no_grad():
        plain.model.text.null.normal_()  # as trained
    ckpt = tmp_path / "plain.ckpt"
    torch.save({"state_dict": plain.state_dict()}, ckpt)
    features, index = make_store_and_table(list(batch["id"]), tmp_path)
    re_ldm = make_module(bert, RetrievalConditioner(str(features), str(index), k=2, context_dim=CTX_DIM),
                         init_from=str(ckpt))
    for k, v in plain.model.unet.state_dict().items():
        assert torch.equal(re_ldm.model.unet.state_dict()[k], v)
    assert torch.equal(re_ldm.model.text.null, plain.model.text.null)  # same unconditional branch
    # a pipeline folder (e.g. an imported public AudioLDM) works the same way
    import json

    from safetensors.torch import save_file

    folder = tmp_path / "pipe"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in plain.state_dict().items() if k.startswith("model.unet.")},
              str(folder / "unet.safetensors"))
    (folder / "pipeline.json").write_text(json.dumps({"format": "tta-pipeline/1", "files": {"unet": "unet.safetensors"}}))
    from_folder = make_module(bert, RetrievalConditioner(str(features), str(index), k=2, context_dim=CTX_DIM),
                              init_from=str(folder))
    for k, v in plain.model.unet.state_dict().items():
        assert torch.equal(from_folder.model.unet.state_dict()[k], v)
    other = tiny_unet_config()
    other["init_args"]["model_channels"] = 8
    with pytest.raises(KeyError, match="cannot initialise the UNet"):
        LatentDiffusionModule(unet=build(other), vae=build(tiny_vae_config()), scale_factor=1.0,
                              clap=build(tiny_clap_config(bert)), mel="demo", init_from=str(ckpt))


def test_test_time_retrieval_queries_the_index_and_can_switch_index(bert: Path, tmp_path: Path,
                                                                    single_thread: None) -> None:
    from tests.ldm_fixtures import CLAP_DIM
    from tta.retrieval.index import IndexSpec, build_index

    ids = [f"c{i}" for i in range(8)] + [f"o{i}" for i in range(8)]
    features, index = make_store_and_table(ids, tmp_path)
    g = torch.Generator().manual_seed(0)
    unit = lambda: torch.nn.functional.normalize(torch.randn(8, CLAP_DIM, generator=g), dim=-1).numpy()
    build_index(unit(), ids[:8], IndexSpec(type="flat")).save(index)
    other = tmp_path / "other_index"
    build_index(unit(), ids[8:], IndexSpec(type="flat")).save(other)
    module = make_module(bert, RetrievalConditioner(str(features), str(index), k=2, context_dim=CTX_DIM)).eval()
    retrieval = module.model.retrieval
    emb = module.model.text.embed(["a bell rings", "a dog barks"])
    first = retrieval.query_neighbours(emb)
    assert all(len(nb) == 2 and all(n.startswith("c") for n in nb) for nb in first)
    assert retrieval.query_neighbours(emb, exclude=[{first[0][0]}, set()])[0][0] != first[0][0]
    mel = module.generator.generate_mel(["a bell rings", "a dog barks"], 12, steps=2)
    assert mel.shape == (2, 80, 12) and torch.isfinite(mel).all()
    retrieval.use_index(str(other))
    assert all(n.startswith("o") for nb in retrieval.query_neighbours(emb) for n in nb)


def test_audio_film_source_trains_on_clap_audio_embeddings(bert: Path, batch: dict[str, Any]) -> None:
    """AudioLDM's training condition: the UNet's FiLM vector is the clip's CLAP audio embedding
    (not the caption's), in the validation loss too; generation still reads the prompt."""
    module = make_module(bert, film_source="audio")
    clap = module.model.text.clap
    seen: list[torch.Tensor] = []
    hook = module.model.unet.register_forward_hook(lambda _m, _a, kw, _o: seen.append(kw["film"]), with_kwargs=True)
    try:
        loss = module.fixed_loss(batch)
    finally:
        hook.remove()
    expected = clap.embed_audio(batch["wav"]).float()  # the batch is at the CLAP's 22.05 kHz already
    assert torch.isfinite(loss) and len(seen) == len(module.val_timesteps)
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)
    text = clap.embed_text(list(batch["caption"])).float()
    assert not torch.allclose(seen[0], text, atol=1e-3)
    module.model.loss(module.codec.encode(batch["mel"]), batch["caption"], film=module._film(batch)).backward()
    assert any(p.grad is not None for p in module.model.unet.class_embedding.parameters())
    assert module.generator.generate_mel(["a bell rings"], 12, steps=2).shape == (1, 80, 12)


def test_film_source_errors(bert: Path, tmp_path: Path) -> None:
    from tta.encoders.clap.text_only import ClapTextOnly
    from tta.encoders.text import BertTextEncoder

    with pytest.raises(ValueError, match="film_source must be 'text' or 'audio'"):
        make_module(bert, film_source="image")
    text_only = ClapTextOnly(BertTextEncoder(path=str(bert), max_length=16), joint_dim=16)
    with pytest.raises(ValueError, match="needs a CLAP with an audio tower"):
        LatentDiffusionModule(unet=build(tiny_unet_config()), vae=build(tiny_vae_config()), scale_factor=1.0,
                              clap=text_only, mel="demo", film_source="audio")
    module = make_module(bert, film_source="audio")
    with pytest.raises(KeyError, match="no 'wav'"):
        module._film({"mel": torch.zeros(1, 80, 8)})


def test_uncaptioned_clips_warn_once_with_text_film(bert: Path, caplog: pytest.LogCaptureFixture) -> None:
    module = make_module(bert)
    batch = {"id": ["a", "b"], "caption": ["a dog barks", ""]}
    with caplog.at_level("WARNING", logger="tta.generators.ldm.module"):
        assert module._film(batch) is None and module._film(batch) is None
    warned = [r for r in caplog.records if "uncaptioned clips" in r.getMessage()]
    assert len(warned) == 1 and "'b'" in warned[0].getMessage()


def _loss_sequence(module: LatentDiffusionModule, batches: list[dict[str, Any]], steps: int, root: Path) -> list[float]:
    import lightning as L

    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
            losses.append(float(trainer.callback_metrics["train/loss"]))

    loader = torch.utils.data.DataLoader(range(steps), batch_size=1, collate_fn=lambda i: batches[i[0] % len(batches)])
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=[Record()])
    trainer.fit(module, train_dataloaders=loader)
    return losses


@pytest.mark.parametrize("film_source", ["text", "audio"])
def test_training_from_the_frozen_cache_equals_live_encoding(bert: Path, batch: dict[str, Any], tmp_path: Path,
                                                             film_source: str, single_thread: None) -> None:
    """`cache_frozen`: the VAE posterior (and CLAP audio embedding) are computed once per segment
    and the loss sequence equals live encoding's for the same seed (posterior still sampled)."""
    other = {**batch, "start": [s + 1 for s in batch["start"]]}  # same clips, other segments: new keys
    live = _loss_sequence(make_module(bert, film_source=film_source), [batch, other], 6, tmp_path / "live")
    module = make_module(bert, film_source=film_source, cache_frozen=True)
    calls: list[int] = []
    moments = module.codec.moments
    module.codec.moments = lambda mel: calls.append(mel.shape[0]) or moments(mel)  # type: ignore[method-assign]
    cached = _loss_sequence(module, [batch, other], 6, tmp_path / "cached")
    assert len(live) == 6 and len(set(live)) > 1  # steps differ (noise and times are drawn per step)
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(live), rtol=1e-5, atol=1e-6)
    assert calls == [len(batch["id"])] * 2  # each segment encoded once, then read from the cache
    assert len(module._caches["moments"]) == 2 * len(batch["id"])
    assert len(module._caches["film"]) == (2 * len(batch["id"]) if film_source == "audio" else 0)


def test_rectified_flow_module_trains_validates_and_samples(bert: Path, batch: dict[str, Any]) -> None:
    from tta.generators.noise import RectifiedFlow

    module = make_module(bert, process=RectifiedFlow())
    assert module.model.process.fast_sampler == "euler"
    seen: list[torch.Tensor] = []
    hook = module.model.unet.register_forward_hook(lambda _m, args, _o: seen.append(args[1]))
    try:
        loss = module.fixed_loss(batch)  # val_timesteps 50..950 of 999 -> path times 1 - t / 999
    finally:
        hook.remove()
    assert torch.isfinite(loss)
    expected = [1000.0 * t / 999 for t in module.val_timesteps]
    torch.testing.assert_close(torch.stack([s[0] for s in seen]), torch.tensor(expected), rtol=1e-5, atol=1e-3)
    module.eval()
    mel = module.generator.generate_mel(["a bell rings"], 12, steps=3)  # the process's default sampler (Euler)
    assert mel.shape == (1, 80, 12) and torch.isfinite(mel).all()
    with pytest.raises(ValueError, match="unknown sampler 'ddim'; choose one of euler, heun"):
        module.generator.generate_mel(["a bell rings"], 12, steps=3, sampler="ddim")


def test_process_and_ddpm_arguments_are_exclusive(bert: Path) -> None:
    from tta.generators.noise import RectifiedFlow

    with pytest.raises(ValueError, match="give either process or the DDPM arguments"):
        make_module(bert, process=RectifiedFlow(), objective="v")


def test_film_scale_multiplies_the_film_vector_not_the_retrieval_query(bert: Path) -> None:
    plain, scaled = make_module(bert), make_module(bert, film_scale="unit_entries")
    captions = ["a bell rings", "a dog barks"]
    torch.testing.assert_close(scaled.model.text(captions), plain.model.text(captions) * CLAP_DIM**0.5)
    torch.testing.assert_close(scaled.model.text.embed(captions), plain.model.text.embed(captions))
    with pytest.raises(ValueError, match="film scale must be a positive number or 'unit_entries'"):
        make_module(bert, film_scale=0.0)
