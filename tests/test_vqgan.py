"""Spectrogram VQGAN: network shapes and the autoencoder interface, the paper's code grid, the module's
losses (discriminator off before disc_start, perceptual hook), a tiny overfit, exact resume and the
fast_dev_run of both configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from tests.conftest import CONFIGS
from tests.test_vae_module import Crash, Recorder, tiny_dm, trainer
from tta.generators.vae.network import AutoencoderKL, ConvMelAutoencoder
from tta.generators.vqgan.module import VQGANModule, feature_distance
from tta.generators.vqgan.network import SpectrogramVQGAN
from tta.nn.discriminators import NLayerDiscriminator
from tta.nn.quantize import VectorQuantizer
from tta.registry import components

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {"ch": 8, "ch_mult": (1, 2), "num_res_blocks": 1, "z_channels": 4, "embed_dim": 4, "mid_attention": False}


def tiny_ae(num_codes: int = 32, **quantizer) -> SpectrogramVQGAN:
    torch.manual_seed(0)
    return SpectrogramVQGAN(**TINY, quantizer=VectorQuantizer(num_codes=num_codes, dim=4, **quantizer))


def tiny_module(ae: SpectrogramVQGAN | None = None, **kwargs) -> VQGANModule:
    torch.manual_seed(0)
    args = {"mel": "demo", "lr": 1e-3, "betas": (0.9, 0.99), "seed": 0}
    args.update(kwargs)
    return VQGANModule(ae if ae is not None else tiny_ae(), **args)


class TinyMelNet(nn.Module):
    """A stand-in mel classifier trunk: ``(B, 1, n_mels, frames)`` -> two feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 3, stride=2, padding=1)

    def forward(self, mel: torch.Tensor) -> list[torch.Tensor]:
        assert mel.shape[1] == 1 and mel.shape[2] == 80, mel.shape  # (B, 1, n_mels, frames)
        h = torch.relu(self.a(mel))
        return [h, torch.relu(self.b(h))]


# ------------------------------------------------------------------------- network


def test_shapes_codes_and_the_autoencoder_interface() -> None:
    torch.manual_seed(0)
    ae = tiny_ae().eval()
    mel = torch.randn(2, 1, 16, 80)  # (B, 1, frames, n_mels), AutoencoderKL's layout
    z_q, indices, loss, info = ae.encode(mel)
    assert z_q.shape == (2, 4, 8, 40) and indices.shape == (2, 8, 40) and loss.dim() == 0
    assert set(info) >= {"perplexity", "usage", "counts"}
    recon, _, _ = ae(mel)
    assert recon.shape == mel.shape
    assert torch.equal(ae.decode_indices(indices), ae.decode(z_q))
    # the prior's sequence is time-major: all frequency codes of latent frame 0, then frame 1, ...
    seq = ae.indices_to_sequence(indices)
    assert seq.shape == (2, 320) and torch.equal(seq[:, 3 * 40 + 7], indices[:, 3, 7])
    assert torch.equal(ae.sequence_to_indices(seq, freq=40), indices)
    torch.testing.assert_close(ae.decode_indices(seq, shape=(8, 40)), ae.decode_indices(indices))
    # one interface, two latent kinds; same submodule names as the VAE, single-z encoder
    vae = AutoencoderKL(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4)
    assert isinstance(ae, ConvMelAutoencoder) and isinstance(vae, ConvMelAutoencoder)
    assert (ae.latent_kind, vae.latent_kind) == ("discrete", "continuous")
    assert ae.latent_shape(16, 80) == vae.latent_shape(16, 80) == (4, 8, 40)
    assert ae.encoder.conv_out.out_channels == 4 and vae.encoder.conv_out.out_channels == 8
    assert "quantize.codebook" in ae.state_dict() and ae.num_codes == 32
    assert ae.config["quantizer"]["num_codes"] == 32
    assert components("autoencoder")["autoencoder"]["spectrogram_vqgan"] is SpectrogramVQGAN
    assert components("module")["module"]["vqgan"] is VQGANModule
    assert components("network")["network"]["vector_quantizer"] is VectorQuantizer


def test_bad_input_is_refused_by_name() -> None:
    ae = tiny_ae()
    with pytest.raises(ValueError, match="quantizer's dim 3 must equal embed_dim 4"):
        SpectrogramVQGAN(**TINY, quantizer=VectorQuantizer(num_codes=8, dim=3))
    with pytest.raises(ValueError, match=r"SpectrogramVQGAN.encode expects a mel of shape \(B, 1, frames, n_mels\)"):
        ae.encode(torch.zeros(2, 80, 16))
    with pytest.raises(ValueError, match="divisible by the downsample factor 2"):
        ae.encode(torch.zeros(1, 1, 15, 80))
    with pytest.raises(ValueError, match="needs shape="):
        ae.decode_indices(torch.zeros(1, 320, dtype=torch.long))
    with pytest.raises(ValueError, match=r"do not fill a \(8, 41\) grid"):
        ae.decode_indices(torch.zeros(1, 320, dtype=torch.long), shape=(8, 41))
    with pytest.raises(TypeError, match="discrete-latent autoencoder"):
        VQGANModule(AutoencoderKL(ch=8, ch_mult=(1, 2), num_res_blocks=1), mel="demo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="perceptual_weight=1.0 needs a perceptual network"):
        VQGANModule(ae, mel="demo", perceptual_weight=1.0)


def test_paper_config_code_grid_is_5_by_50_for_10_seconds() -> None:
    args = yaml.safe_load((CONFIGS / "vqgan.yaml").read_text())["model"]["init_args"]
    net = dict(args["autoencoder"]["init_args"])
    quantizer = net.pop("quantizer")["init_args"]
    assert quantizer["num_codes"] == 1024 and args["mel"] == "vqgan" and args["disc_start"] > 0
    ae = SpectrogramVQGAN(**{**net, "ch": 8}, quantizer=VectorQuantizer(**quantizer))
    frames = 10 * 32000 // 400  # 10 s at 32 kHz, hop 400
    assert ae.downsample_factor == 16 and ae.latent_shape(frames, 80) == (256, 50, 5)  # (C, time, freq)
    assert any(".attn.0." in k for k in ae.state_dict() if k.startswith("encoder.down.4"))  # attention at 50


# ------------------------------------------------------------------------ losses


def test_feature_distance_hand_made() -> None:
    real = [torch.tensor([3.0, 4.0]).reshape(1, 2, 1, 1)]
    fake = [torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)]
    assert feature_distance(real, fake, normalize=False).item() == pytest.approx(4.0 + 16.0)
    # unit-normalised: (0.6, 0.8) vs (1, 0) -> 0.16 + 0.64
    assert feature_distance(real, fake).item() == pytest.approx(0.8, abs=1e-6)
    # scales are summed, positions averaged, the batch averaged
    two = [torch.zeros(2, 1, 2, 2), torch.zeros(2, 3, 1, 1)]
    other = [torch.ones(2, 1, 2, 2), torch.full((2, 3, 1, 1), 2.0)]
    assert feature_distance(two, other, normalize=False).item() == pytest.approx(1.0 + 12.0)
    with pytest.raises(ValueError, match="1 real and 2 generated"):
        feature_distance(real, two)


def test_perceptual_term_enters_the_loss_and_its_network_stays_frozen() -> None:
    torch.manual_seed(0)
    net = TinyMelNet()
    module = tiny_module(perceptual=net, perceptual_weight=0.5)
    assert module.perceptual_weight == 0.5 and not any(p.requires_grad for p in net.parameters())
    module.train()
    assert not net.training
    x = torch.randn(2, 1, 16, 80)
    recon = torch.randn(2, 1, 16, 80, requires_grad=True)
    losses = module._losses(x, recon, torch.tensor(0.0))
    expected = feature_distance(net(x.transpose(2, 3)), net(recon.transpose(2, 3)))
    torch.testing.assert_close(losses["perceptual"], expected)
    torch.testing.assert_close(losses["nll"], (x - recon).abs().mean() + 0.5 * expected)
    losses["nll"].backward()
    assert recon.grad is not None and all(p.grad is None for p in net.parameters())
    assert tiny_module(perceptual=TinyMelNet()).perceptual_weight == 1.0  # the default with a network


def test_fast_dev_run_trains_the_discriminator_with_the_perceptual_hook(tiny_synth: Path, tmp_path: Path) -> None:
    module = tiny_module(discriminator=NLayerDiscriminator(input_nc=1, ndf=8, n_layers=2), disc_start=0,
                         perceptual=TinyMelNet())
    d_before = [p.detach().clone() for p in module.discriminator.parameters()]
    p_before = [p.detach().clone() for p in module.perceptual.parameters()]
    t = trainer(tmp_path, fast_dev_run=True, limit_val_batches=1)
    t.fit(module, datamodule=tiny_dm(tiny_synth))
    assert module.batches_trained == 1
    assert any(not torch.equal(a, b) for a, b in zip(d_before, module.discriminator.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(p_before, module.perceptual.parameters()))
    logged = t.callback_metrics
    assert {"train/g_adv", "train/disc", "train/perceptual", "train/perplexity", "train/usage"} <= set(logged)
    assert logged["train/adaptive_weight"] > 0


def test_discriminator_is_off_before_disc_start(tiny_synth: Path, tmp_path: Path) -> None:
    module = tiny_module(discriminator=NLayerDiscriminator(input_nc=1, ndf=8, n_layers=2), disc_start=3)
    before = [p.detach().clone() for p in module.discriminator.parameters()]
    t = trainer(tmp_path, max_steps=3)
    t.fit(module, datamodule=tiny_dm(tiny_synth))
    assert module.batches_trained == 3  # one optimizer step per batch before disc_start
    assert all(torch.equal(a, b) for a, b in zip(before, module.discriminator.parameters()))
    assert "train/g_adv" not in t.callback_metrics and "train/disc" not in t.callback_metrics


# ----------------------------------------------------------------------- training


def test_tiny_overfit_lowers_the_reconstruction_loss(tiny_synth: Path, tmp_path: Path) -> None:
    from tta.data.manifest import read_manifest, write_manifest

    four = [i for i in read_manifest(tiny_synth) if i.split == "train"][:4]
    manifest = write_manifest(four, tmp_path / "four.jsonl")
    module = tiny_module(tiny_ae(kmeans_init=True), lr=3e-3)
    dm = tiny_dm(manifest, batch_size=4, val_split="train")  # 1 batch per epoch; val = first crops
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))  # the same 4 clips
    before = float((module.reconstruct(batch["mel"]) - batch["mel"]).abs().mean())
    trainer(tmp_path, max_steps=60).fit(module, datamodule=dm)
    after = float((module.reconstruct(batch["mel"]) - batch["mel"]).abs().mean())
    assert after < 0.5 * before, (before, after)


def test_exact_resume_after_crash(tiny_synth: Path, tmp_path: Path) -> None:
    """Kill at batch 6 (checkpoint at 5), resume: batches 6..10 match an uninterrupted run, with EMA
    codebook statistics, k-means init, dead-code restarts and a discriminator starting after batch 6."""
    steps, disc_start = 10, 6
    max_steps = disc_start + 2 * (steps - disc_start)  # Lightning counts both optimizers' steps

    def make() -> VQGANModule:
        torch.manual_seed(0)
        ae = tiny_ae(num_codes=64, ema_decay=0.9, kmeans_init=True, restart_after=2)
        return tiny_module(ae, discriminator=NLayerDiscriminator(input_nc=1, ndf=8, n_layers=2), disc_start=disc_start,
                           ema_decay=0.9)

    ref = Recorder()
    module = make()
    trainer(tmp_path / "ref", max_steps=max_steps, callbacks=[ref]).fit(module, datamodule=tiny_dm(tiny_synth))
    assert module.batches_trained == steps and len(ref.losses) == steps

    ckpt_dir = tmp_path / "ckpt"
    first = Recorder()
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=5, save_top_k=-1, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path / "a", max_steps=max_steps, callbacks=[first, ckpt, Crash(at=6)],
                enable_checkpointing=True).fit(make(), datamodule=tiny_dm(tiny_synth))
    assert first.losses == ref.losses[:5]
    path = ckpt_dir / "last.ckpt"
    ck = torch.load(path, weights_only=True)
    assert ck["tta"]["component"] == "vqgan" and ck["tta"]["counters"]["batches_trained"] == 5

    second = Recorder()
    resumed = make()
    trainer(tmp_path / "b", max_steps=max_steps, callbacks=[second]).fit(
        resumed, datamodule=tiny_dm(tiny_synth), ckpt_path=str(path))
    assert resumed.batches_trained == steps
    assert second.ids == ref.ids[5:]
    assert second.losses == pytest.approx(ref.losses[5:], rel=1e-6, abs=1e-6)
    for (k, a), b in zip(resumed.state_dict().items(), module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert int(resumed.autoencoder.quantize.steps) == steps
    for k, v in module.ema.shadow.items():
        torch.testing.assert_close(resumed.ema.shadow[k], v, rtol=1e-5, atol=1e-6)


def test_validation_logs_codebook_usage_and_psnr_and_predict_gives_codes(tiny_synth: Path, tmp_path: Path) -> None:
    module, dm = tiny_module(), tiny_dm(tiny_synth)
    t = trainer(tmp_path, max_steps=1, limit_val_batches=2)
    t.fit(module, datamodule=dm)
    metrics = t.validate(module, datamodule=dm, verbose=False)[0]
    assert {"val/rec_loss", "val/vq", "val/psnr", "val/perplexity", "val/codebook_usage",
            "val/codebook_perplexity"} <= set(metrics)
    assert 0.0 < metrics["val/codebook_usage"] <= 1.0 and metrics["val/codebook_perplexity"] >= 1.0
    assert metrics["val/codebook_usage"] >= metrics["val/usage"] - 1e-6  # the epoch's codes cover each batch's
    preds = t.predict(module, dataloaders=dm.val_dataloader())
    assert preds[0]["indices"].shape[1:] == (22, 40)  # 0.5 s = 43 frames -> padded 44, /2; 80 mels /2
    assert preds[0]["indices"].max() < 32
    mel = module.decode_indices(preds[0]["indices"], frames=43)
    assert mel.shape[1:] == (80, 43)


@pytest.mark.parametrize("name", ["vqgan.yaml", "demo/vqgan.yaml"])
def test_config_fast_dev_run(name: str, tiny_synth: Path, tmp_path: Path) -> None:
    from tta.cli import main

    ae = "--model.init_args.autoencoder.init_args."
    args = ["fit", "--config", str(CONFIGS / name), f"--trainer.default_root_dir={tmp_path}",
            "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]", f"{ae}ch=8", f"{ae}z_channels=8",
            f"{ae}embed_dim=8", f"{ae}quantizer.init_args.dim=8", f"{ae}quantizer.init_args.num_codes=64",
            "--model.init_args.discriminator.init_args.ndf=8", "--model.init_args.disc_start=0",
            f"--data.init_args.manifest={tiny_synth}", "--data.init_args.segment_seconds=1.0",
            "--data.init_args.batch_size=4", "--data.init_args.num_workers=0"]
    assert main(args) == 0
