"""Non-finite losses name their clips (issue 17, row 2): per-sample losses of the noise processes,
and the latent-diffusion / DreamAudio / VAE training step that names a NaN clip in ``nonfinite.jsonl``,
trains on the rest of its batch exactly as on the batch without it, and still skips (and counts
toward ``nan_max_skips``) a batch whose every clip is non-finite."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.hf_fixtures import make_bert_folder
from tests.ldm_fixtures import build, tiny_clap_config, tiny_unet_config, tiny_vae_config
from tta.generators.ldm.module import LatentDiffusionModule
from tta.generators.noise import DDPMProcess, NoiseProcess, RectifiedFlow
from tta.training.base import NonFiniteLossError, select_clips

pytestmark = pytest.mark.usefixtures("single_thread")


def _old_loss(process: NoiseProcess, net: Any, x0: torch.Tensor, seed: int) -> torch.Tensor:
    """The scalar loss as the processes computed it before they had a ``reduction``: times, then
    noise from the CPU generator, one ``F.mse_loss`` over the batch."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(process, DDPMProcess):
        t = process.sample_timesteps(x0.shape[0], g)
        noise = torch.randn(x0.shape, generator=g)
        return F.mse_loss(net(process.q_sample(x0, t, noise), t).float(), process.target(x0, t, noise).float())
    l = process.sample_times(x0.shape[0], g)
    noise = torch.randn(x0.shape, generator=g)
    out = net(process.q_sample(x0, l, noise), process.model_time(l))
    return F.mse_loss(out.float(), process.target(x0, noise).float())


@pytest.mark.parametrize("process", [DDPMProcess(), DDPMProcess(objective="v"), RectifiedFlow()],
                         ids=["ddpm-eps", "ddpm-v", "rectified_flow"])
def test_per_sample_reduction_equals_the_old_scalar_loss(process: NoiseProcess) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return conv(x) + 1e-3 * t.float().view(-1, 1, 1, 1)

    x0 = torch.randn(5, 4, 6, 8, generator=torch.Generator().manual_seed(1))

    def loss(reduction: str, x: torch.Tensor = x0) -> torch.Tensor:
        return process.loss(net, x, generator=torch.Generator().manual_seed(3), reduction=reduction)

    old = _old_loss(process, net, x0, 3)
    assert torch.equal(process.loss(net, x0, generator=torch.Generator().manual_seed(3)), old)  # default: unchanged
    errors, per_sample = loss("none"), loss("per_sample")
    assert errors.shape == x0.shape and per_sample.shape == (5,)
    assert torch.equal(errors.mean(), old)  # the elementwise errors reduce to the old scalar bit for bit
    assert torch.equal(per_sample, errors.flatten(1).mean(1))
    torch.testing.assert_close(per_sample.mean(), old, rtol=1e-6, atol=0)  # equal clip sizes: the same mean
    bad = x0.clone()
    bad[2, 1, 3, 4] = float("nan")
    bad_per_sample = loss("per_sample", bad)
    assert torch.isnan(bad_per_sample[2]) and torch.isfinite(bad_per_sample[[0, 1, 3, 4]]).all()
    assert torch.equal(bad_per_sample[[0, 1, 3, 4]], per_sample[[0, 1, 3, 4]])  # the other samples are untouched
    with pytest.raises(ValueError, match="reduction must be one of mean, per_sample, none; got 'sum'"):
        loss("sum")


def test_select_clips_indexes_every_per_clip_entry() -> None:
    batch = {"n_skipped": 1, "id": ["a", "b", "c"], "start": [0, 5, 9], "mel": torch.arange(6.0).view(3, 2),
             "reference_captions": [["x"], ["y"], ["z"]], "scalar": torch.tensor(2.0)}
    sub = select_clips(batch, [True, False, True])
    assert sub["id"] == ["a", "c"] and sub["start"] == [0, 9] and sub["reference_captions"] == [["x"], ["z"]]
    assert torch.equal(sub["mel"], torch.tensor([[0.0, 1.0], [4.0, 5.0]]))
    assert sub["n_skipped"] == 1 and torch.equal(sub["scalar"], torch.tensor(2.0))
    with pytest.raises(ValueError, match="2 flags for a batch of 3 clips"):
        select_clips(batch, [True, False])


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert_folder(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def batch(tiny_synth: Path) -> dict[str, Any]:
    from tta.data.datamodule import AudioDataModule

    dm = AudioDataModule(manifest=str(tiny_synth), mel="demo", segment_seconds=0.5, batch_size=3)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _module(bert: Path, **kw: Any) -> LatentDiffusionModule:
    torch.manual_seed(0)
    return LatentDiffusionModule(unet=build(tiny_unet_config()), vae=build(tiny_vae_config()), scale_factor=1.0,
                                 clap=build(tiny_clap_config(bert)), mel="demo", lr=1e-2, cfg_dropout=0.3, **kw)


def _fit(module: Any, batches: list[dict[str, Any]], root: Path) -> None:
    import lightning as L

    loader = torch.utils.data.DataLoader(range(len(batches)), batch_size=1, collate_fn=lambda i: batches[i[0]])
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, train_dataloaders=loader)


def _with_nan(batch: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    mel = batch["mel"].clone()
    mel[rows] = float("nan")
    return {**batch, "mel": mel}


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}


def test_a_nan_clip_is_named_and_the_rest_of_its_batch_trains(bert: Path, batch: dict[str, Any], tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """One NaN clip: named in the log and ``nonfinite.jsonl``; the step is taken and equals the
    step on the batch without it (same weights bit for bit); the skip counter stays 0."""
    bad_id = batch["id"][1]
    poisoned, clean = _module(bert), _module(bert)
    before = _trainable(poisoned)
    with caplog.at_level("WARNING", logger="tta"):
        _fit(poisoned, [_with_nan(batch, [1])], tmp_path / "poisoned")
    _fit(clean, [select_clips(batch, [True, False, True])], tmp_path / "clean")
    rows = [json.loads(line) for line in (tmp_path / "poisoned" / "nonfinite.jsonl").read_text().splitlines()]
    assert rows == [{"batch": 0, "ids": [bad_id], "loss": ["nan"]}]
    assert f"clip(s) {bad_id}; 2 of 3 clips still train" in caplog.text
    assert not (tmp_path / "clean" / "nonfinite.jsonl").exists()
    after, reference = _trainable(poisoned), _trainable(clean)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the step was taken
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(torch.equal(after[k], reference[k]) for k in after)  # = the step without the NaN clip
    assert poisoned.nan_skips_total == 0 and poisoned.batches_trained == 1


def test_an_all_nan_batch_is_skipped_and_counts_toward_the_abort(bert: Path, batch: dict[str, Any],
                                                                tmp_path: Path) -> None:
    module = _module(bert, nan_max_skips=2)
    before = _trainable(module)
    bad = _with_nan(batch, [0, 1, 2])
    with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite steps"):
        _fit(module, [bad, bad], tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in _trainable(module).items())  # nothing stepped
    rows = [json.loads(line) for line in (tmp_path / "nonfinite.jsonl").read_text().splitlines()]
    assert [r["ids"] for r in rows] == [list(batch["id"])] * 2
    assert module.nan_skips_total == 2


def test_dreamaudio_names_a_clip_whose_reference_is_nan(tiny_synth: Path, tmp_path: Path) -> None:
    """DreamAudio trains through the same step: a clip whose reference audio is NaN is named, and
    the step equals the step on its batch without it."""
    from tests.hf_fixtures import WIDTH, make_t5_folder
    from tests.ldm_fixtures import build_module, customized_manifest, tiny_dreamaudio_config
    from tta.data.references import ReferenceAudioDataModule

    dm = ReferenceAudioDataModule(num_references=3, reference_seconds=1.0, mel="demo", segment_seconds=0.5,
                                  batch_size=3, manifest=str(customized_manifest(tiny_synth, tmp_path / "concat")))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    present = batch["reference_present"][:, 0]
    assert present.all(), present  # every clip's first reference is real audio (the NaN below reaches the loss)
    wav = batch["reference_wav"].clone()
    wav[1, 0] = float("nan")
    config = tiny_dreamaudio_config(make_t5_folder(tmp_path / "t5"), WIDTH, reference_drop_p=0.0)
    torch.manual_seed(0)
    poisoned = build_module(config)
    clean = copy.deepcopy(poisoned)
    _fit(poisoned, [{**batch, "reference_wav": wav}], tmp_path / "poisoned")
    _fit(clean, [select_clips(batch, [True, False, True])], tmp_path / "clean")
    row = json.loads((tmp_path / "poisoned" / "nonfinite.jsonl").read_text())
    assert row["ids"] == [batch["id"][1]]
    after, reference = _trainable(poisoned), _trainable(clean)
    assert all(torch.equal(after[k], reference[k]) for k in after)
    assert poisoned.nan_skips_total == 0


def test_vae_names_a_nan_clip_and_trains_its_batch_mates(batch: dict[str, Any], tmp_path: Path) -> None:
    """The mel VAE (reconstruction + KL per clip, discriminator on from the first batch): the NaN
    clip is named and both optimizers step exactly as on the batch without it."""
    from tta.generators.vae.module import VAEModule
    from tta.generators.vae.network import AutoencoderKL
    from tta.nn.discriminators import NLayerDiscriminator

    torch.manual_seed(0)
    poisoned = VAEModule(AutoencoderKL(ch=8, ch_mult=(1, 2), num_res_blocks=1, mid_attention=False),
                         NLayerDiscriminator(input_nc=1, ndf=8, n_layers=2), mel="demo", disc_start=0, lr=1e-3)
    clean = copy.deepcopy(poisoned)
    before = _trainable(poisoned)
    _fit(poisoned, [_with_nan(batch, [2])], tmp_path / "poisoned")
    _fit(clean, [select_clips(batch, [True, True, False])], tmp_path / "clean")
    row = json.loads((tmp_path / "poisoned" / "nonfinite.jsonl").read_text())
    assert row == {"batch": 0, "ids": [batch["id"][2]], "loss": ["nan"]}
    after, reference = _trainable(poisoned), _trainable(clean)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("discriminator."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("autoencoder."))
    assert all(torch.equal(after[k], reference[k]) for k in after)
    assert poisoned.nan_skips_total == 0
