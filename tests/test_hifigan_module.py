"""HiFiGANModule training, and the mel composition check between components."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from tta.data.datamodule import AudioDataModule
from tta.data.mel import MelConfig, MelMismatchError
from tta.vocoders.factory import build_vocoder, check_composition
from tta.vocoders.griffinlim import GriffinLimVocoder
from tta.vocoders.hifigan.discriminators import (
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
)
from tta.vocoders.hifigan.generator import HiFiGANGenerator
from tta.vocoders.hifigan.module import HiFiGANModule


def tiny_hifigan(**kwargs) -> HiFiGANModule:
    torch.manual_seed(0)
    gen = HiFiGANGenerator(n_mels=80, upsample_rates=(8, 8, 4), upsample_kernel_sizes=(16, 16, 8),
                           upsample_initial_channel=16, resblock="2", resblock_kernel_sizes=(3,),
                           resblock_dilation_sizes=((1, 3),))
    return HiFiGANModule(gen, MultiPeriodDiscriminator(periods=(2, 3), channel_mult=0.0625),
                         MultiScaleDiscriminator(num_scales=1, channel_mult=0.0625), mel="demo", **kwargs)


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, enable_checkpointing=False, **kwargs)


def test_fast_dev_run_trains_all_three_networks(tiny_synth: Path, tmp_path: Path) -> None:
    module = tiny_hifigan(disc_start=0)
    nets = (module.generator, module.mpd, module.msd)
    before = [[p.detach().clone() for p in n.parameters()] for n in nets]
    dm = AudioDataModule(manifest=str(tiny_synth), mel="demo", segment_seconds=0.25, batch_size=2)
    _trainer(tmp_path, fast_dev_run=True).fit(module, datamodule=dm)
    for net, old in zip(nets, before):
        assert any(not torch.equal(a, b) for a, b in zip(old, net.parameters())), type(net).__name__


def test_generator_mel_loss_drops(tiny_synth: Path, tmp_path: Path) -> None:
    """Mel-loss-only warm-up (discriminators off) fits a fixed segment."""
    module = tiny_hifigan(disc_start=10_000, lr=2e-3)
    dm = AudioDataModule(manifest=str(tiny_synth), mel="demo", segment_seconds=0.25, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))

    def mel_l1() -> float:
        with torch.no_grad():
            return float(module._mel_l1(batch["wav"], module.generator(batch["mel"])))

    before = mel_l1()
    _trainer(tmp_path, max_steps=40, limit_val_batches=0).fit(
        module, datamodule=_FixedBatch(batch, dm.mel_config))
    assert mel_l1() < 0.7 * before


class _FixedBatch(L.LightningDataModule):
    def __init__(self, batch: dict, mel: MelConfig) -> None:
        super().__init__()
        self.batch, self.mel_config = batch, mel

    def train_dataloader(self):
        from torch.utils.data import DataLoader

        return DataLoader([self.batch], batch_size=None)


def test_generator_must_match_mels() -> None:
    gen = HiFiGANGenerator(n_mels=64, upsample_rates=(5, 4, 2, 2, 2), upsample_kernel_sizes=(16, 16, 8, 4, 4),
                           upsample_initial_channel=32)
    with pytest.raises(ValueError, match="does not match mel front-end 'demo'"):
        HiFiGANModule(gen, MultiPeriodDiscriminator(channel_mult=0.0625), MultiScaleDiscriminator(channel_mult=0.0625),
                      mel="demo")


def test_composition_refuses_mismatched_mels() -> None:
    vocoder = GriffinLimVocoder("audioldm")
    with pytest.raises(MelMismatchError, match="sample_rate: 22050 != 16000"):
        check_composition(MelConfig.preset("demo"), vocoder, "VAE and vocoder")
    check_composition(MelConfig.preset("audioldm"), vocoder)
    with pytest.raises(MelMismatchError, match="hop_length: 160 != 256"):
        build_vocoder("universal", MelConfig.preset("audioldm"))
    with pytest.raises(ValueError, match="unknown vocoder"):
        build_vocoder("wavenet", MelConfig.preset("demo"))
