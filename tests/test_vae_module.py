"""VAEModule: fast_dev_run, overfit, NaN guard, EMA, exact resume after a crash."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tta.data.datamodule import AudioDataModule
from tta.generators.vae.module import VAEModule
from tta.generators.vae.network import AutoencoderKL
from tta.nn.discriminators import NLayerDiscriminator
from tta.training.base import NonFiniteLossError
from tta.training.callbacks import AtomicCheckpointIO


def tiny_vae(**kwargs) -> VAEModule:
    torch.manual_seed(0)
    args = dict(mel="demo", kl_weight=1.0, lr=1e-3, betas=(0.9, 0.99), seed=0)
    args.update(kwargs)
    return VAEModule(AutoencoderKL(ch=8, ch_mult=(1, 2), num_res_blocks=1, mid_attention=False), **args)


def tiny_dm(manifest: Path, **kwargs) -> AudioDataModule:
    args = dict(manifest=str(manifest), mel="demo", segment_seconds=0.5, batch_size=4, seed=0)
    args.update(kwargs)
    return AudioDataModule(**args)


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
                plugins=[AtomicCheckpointIO()], enable_checkpointing=False)
    args.update(kwargs)
    return L.Trainer(**args)


class Recorder(L.Callback):
    """Records the training loss and the clip ids of every batch."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.ids: list[list[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))
        self.ids.append(list(batch["id"]))


class Crash(L.Callback):
    """Simulates a killed job: raises at the start of batch number ``at`` (1-based)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.batches_trained + 1 == self.at:
            raise RuntimeError("simulated crash")


def test_fast_dev_run_with_discriminator(tiny_synth: Path, tmp_path: Path) -> None:
    module = tiny_vae(discriminator=NLayerDiscriminator(input_nc=1, ndf=8, n_layers=2), disc_start=0)
    before = [p.detach().clone() for p in module.discriminator.parameters()]
    trainer(tmp_path, fast_dev_run=True, limit_val_batches=1).fit(module, datamodule=tiny_dm(tiny_synth))
    assert module.batches_trained == 1
    changed = any(not torch.equal(a, b) for a, b in zip(before, module.discriminator.parameters()))
    assert changed, "discriminator did not step"


def test_overfit_one_batch_loss_drops(tiny_synth: Path, tmp_path: Path) -> None:
    from tta.data.manifest import read_manifest, write_manifest

    four = [i for i in read_manifest(tiny_synth) if i.split == "train"][:4]
    manifest = write_manifest(four, tmp_path / "four.jsonl")
    torch.manual_seed(0)
    module = tiny_vae(lr=3e-3, kl_weight=0.01)
    dm = tiny_dm(manifest, batch_size=4, val_split="train")  # 1 batch per epoch; val = first crops
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))  # the same 4 clips
    before = float((module.reconstruct(batch["mel"]) - batch["mel"]).abs().mean())
    trainer(tmp_path, max_steps=60).fit(module, datamodule=dm)
    after = float((module.reconstruct(batch["mel"]) - batch["mel"]).abs().mean())
    assert after < 0.5 * before, (before, after)


def test_nan_guard_skips_then_aborts(tiny_synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = tiny_vae(nan_max_skips=3)
    real_losses = module._losses
    poisoned = {1, 2, 4, 5, 6}  # batch numbers (0-based) whose loss becomes NaN

    def losses(*args, **kwargs):
        out = real_losses(*args, **kwargs)
        if module.batches_trained in poisoned:
            out["nll"] = out["nll"] * float("nan")
        return out

    monkeypatch.setattr(module, "_losses", losses)
    snapshots: dict[int, list[torch.Tensor]] = {}

    class Snap(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[pl_module.batches_trained] = [p.detach().clone() for p in pl_module.autoencoder.parameters()]

    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite steps"):
        trainer(tmp_path, max_steps=20, callbacks=[Snap()]).fit(module, datamodule=tiny_dm(tiny_synth))
    # batch 1 was skipped: the weights after it equal the weights before it
    assert all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))
    # batch 3 was a real step
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4]))
    assert module.nan_skips_total == 5 and module.nan_skips_consecutive == 3


def test_exact_resume_after_crash(tiny_synth: Path, tmp_path: Path) -> None:
    """Kill at batch 6 (checkpoint at 5), resume: batches 6..10 match an uninterrupted run."""
    steps = 10  # train split has 7 batches of 4: the run crosses an epoch boundary
    ref = Recorder()
    module = tiny_vae(ema_decay=0.9)
    trainer(tmp_path / "ref", max_steps=steps, callbacks=[ref]).fit(module, datamodule=tiny_dm(tiny_synth))
    assert len(ref.losses) == steps

    ckpt_dir = tmp_path / "ckpt"
    first = Recorder()
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=5, save_top_k=-1, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path / "a", max_steps=steps, callbacks=[first, ckpt, Crash(at=6)],
                enable_checkpointing=True).fit(tiny_vae(ema_decay=0.9), datamodule=tiny_dm(tiny_synth))
    assert first.losses == ref.losses[:5]
    path = ckpt_dir / "last.ckpt"
    assert path.is_file() and not list(ckpt_dir.glob("*.tmp"))

    second = Recorder()
    resumed = tiny_vae(ema_decay=0.9)
    trainer(tmp_path / "b", max_steps=steps, callbacks=[second]).fit(
        resumed, datamodule=tiny_dm(tiny_synth), ckpt_path=str(path)
    )
    assert second.ids == ref.ids[5:]
    assert second.losses == pytest.approx(ref.losses[5:], rel=1e-6, abs=1e-6)
    assert resumed.ema.num_updates == module.ema.num_updates == steps
    for a, b in zip(resumed.autoencoder.parameters(), module.autoencoder.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for k, v in module.ema.shadow.items():
        torch.testing.assert_close(resumed.ema.shadow[k], v, rtol=1e-5, atol=1e-6)


def test_extending_a_run_that_stopped_at_max_steps_continues_its_epoch(tiny_synth: Path, tmp_path: Path) -> None:
    """Lightning counts a run stopped by max_steps mid-epoch as a finished epoch; the data is not:
    a run extended from its last checkpoint sees the rest of that epoch, as an uninterrupted run."""
    steps = 10
    ref = Recorder()
    trainer(tmp_path / "ref", max_steps=steps, callbacks=[ref]).fit(tiny_vae(ema_decay=0.9), datamodule=tiny_dm(tiny_synth))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    trainer(tmp_path / "a", max_steps=3, callbacks=[ckpt], enable_checkpointing=True).fit(
        tiny_vae(ema_decay=0.9), datamodule=tiny_dm(tiny_synth))
    extended = Recorder()
    trainer(tmp_path / "b", max_steps=steps, callbacks=[extended]).fit(
        tiny_vae(ema_decay=0.9), datamodule=tiny_dm(tiny_synth), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert extended.ids == ref.ids[3:]
    assert extended.losses == pytest.approx(ref.losses[3:], rel=1e-6, abs=1e-6)


def test_checkpoint_is_self_describing_and_safe(tiny_synth: Path, tmp_path: Path) -> None:
    module = tiny_vae(ema_decay=0.9)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, max_steps=2, callbacks=[ckpt], enable_checkpointing=True, limit_val_batches=1).fit(
        module, datamodule=tiny_dm(tiny_synth)
    )
    ck = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ck["tta"]["mel"]["sample_rate"] == 22050 and ck["tta"]["mel"]["n_mels"] == 80
    assert ck["tta"]["component"] == "vae"
    assert ck["ema"]["num_updates"] == 2
    assert float(ck["state_dict"]["scale_factor"]) > 0
    # a module built for other mels refuses the checkpoint
    from tta.data.mel import MelMismatchError

    other = VAEModule(AutoencoderKL(ch=8, ch_mult=(1, 2), num_res_blocks=1, mid_attention=False), mel="audioldm")
    with pytest.raises(MelMismatchError, match="sample_rate"):
        other.on_load_checkpoint(ck)


def test_scale_factor_measured_on_validation(tiny_synth: Path, tmp_path: Path) -> None:
    module = tiny_vae()
    trainer(tmp_path, max_steps=1, limit_val_batches=2, val_check_interval=1, check_val_every_n_epoch=None).fit(
        module, datamodule=tiny_dm(tiny_synth)
    )
    dm = tiny_dm(tiny_synth)
    dm.setup("validate")
    z = torch.cat([module.encode(b["mel"]).mode() for b in list(dm.val_dataloader())[:2]])
    assert float(module.scale_factor) == pytest.approx(1.0 / float(z.std(unbiased=False)), rel=0.05)


def test_bf16_mixed_step_keeps_fp32_losses(tiny_synth: Path, tmp_path: Path) -> None:
    module = tiny_vae()
    trainer(tmp_path, fast_dev_run=True, precision="bf16-mixed").fit(module, datamodule=tiny_dm(tiny_synth))
    assert module.batches_trained == 1 and module.nan_skips_total == 0
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())


def test_validate_test_predict_and_demo_callback(tiny_synth: Path, tmp_path: Path) -> None:
    from tta.training.callbacks import DemoAudioCallback

    module, dm = tiny_vae(), tiny_dm(tiny_synth)
    t = trainer(tmp_path, max_steps=1, limit_val_batches=1)
    t.fit(module, datamodule=dm)
    assert "val/rec_loss" in t.validate(module, datamodule=dm)[0]
    assert "test/rec_loss" in t.test(module, datamodule=dm)[0]
    preds = t.predict(module, dataloaders=dm.val_dataloader())
    assert preds[0]["latent"].shape[1:] == (8, 22, 40)  # 0.5 s = 43 frames -> padded 44, /2; 80 mels /2
    files = DemoAudioCallback(every_n_steps=1, out_dir=str(tmp_path / "demo"), vocoder="griffinlim").write(
        t, module, step=1)
    wavs = [f for f in files if f.suffix == ".wav"]
    pngs = [f for f in files if f.suffix == ".png"]
    assert len(wavs) == 4 and len(pngs) == 2 and all(f.stat().st_size > 1000 for f in files)


def test_warmup_cosine_schedule_values() -> None:
    from tta.training.schedule import LinearWarmup, WarmupCosine

    s = WarmupCosine(warmup_steps=4, total_steps=14, final_ratio=0.1)
    assert [s(i) for i in range(4)] == [LinearWarmup(4)(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == 1.0
    assert s(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert s(14) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(4, 20))
    with pytest.raises(ValueError, match="total_steps > warmup_steps"):
        WarmupCosine(10, 10)
    with pytest.raises(ValueError, match=r"final_ratio must be in \[0, 1\]"):
        WarmupCosine(0, 10, 1.5)


def test_cosine_lr_decay_refuses_bad_settings(tiny_synth: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lr_decay must be 'constant' or 'cosine'"):
        tiny_vae(lr_decay="linear")
    unbounded = tiny_vae(lr_decay="cosine")
    with pytest.raises(ValueError, match="decays over trainer.max_steps, which must be set"):
        trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(unbounded, datamodule=tiny_dm(tiny_synth))
    smoke = tiny_vae(lr=1e-3, lr_decay="cosine", warmup_steps=20)  # `tta demo --steps 2`: warm-up only
    run = trainer(tmp_path, max_steps=2)
    run.fit(smoke, datamodule=tiny_dm(tiny_synth))
    assert run.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 3 / 20)


def test_extending_a_cosine_run_re_aims_the_decay(tiny_synth: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    module = tiny_vae(lr=1e-3, warmup_steps=2, lr_decay="cosine", final_lr_ratio=0.05)
    first = trainer(tmp_path, max_steps=4, enable_checkpointing=True,
                    callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)])
    first.fit(module, datamodule=tiny_dm(tiny_synth))
    assert first.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05e-3)  # stepped 4 times: the cosine's end
    extended = tiny_vae(lr=1e-3, warmup_steps=2, lr_decay="cosine", final_lr_ratio=0.05)
    run = trainer(tmp_path, max_steps=8)
    with caplog.at_level("WARNING"):
        run.fit(extended, datamodule=tiny_dm(tiny_synth), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert "decays over 4 steps; trainer.max_steps is 8" in caplog.text
    assert extended.batches_trained == 8
    assert run.lr_scheduler_configs[0].scheduler.lr_lambdas[0].total_steps == 8
