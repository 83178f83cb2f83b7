"""The mel classifier (Melception stand-in): network shapes, labels and losses of the module, a tiny
`tta fit` overfit, the checkpoint -> `load_mel_classifier` round trip, the VQGAN perceptual term from
that checkpoint, spectrogram FID, MMKL on a hand-made example, and `tta eval --melception`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.test_eval_cli import N, sets  # noqa: F401  (the generated / reference folders of the eval tests)
from tta.data.manifest import read_manifest, write_manifest
from tta.data.mel import MelFrontend, MelMismatchError
from tta.encoders.mel_classifier import MelClassifierModule, load_mel_classifier
from tta.metrics.fad import FrechetAudioDistance
from tta.metrics.melception import MelceptionMMKL, MelClassifierEmbedder, mmkl
from tta.metrics.pairing import IdMismatchError
from tta.nn.mel_classifier import MelClassifierNet

pytestmark = pytest.mark.usefixtures("single_thread")

NET = {"n_mels": 80, "channels": [8, 16, 32], "convs_per_stage": 1, "dropout": 0.0}


def eight_clips(manifest: Path) -> list:
    return sorted((i for i in read_manifest(manifest) if i.split == "train"), key=lambda i: i.id)[:8]


@pytest.fixture(scope="module")
def trained(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`tta fit` (60 steps) of a tiny multi-label classifier on 8 clips (validated on the same 8): the checkpoint,
    the run's logged metrics, the clips' mels and labels."""
    from tta.cli import build_cli

    root = tmp_path_factory.mktemp("melclf")
    items = eight_clips(tiny_synth)
    manifest = write_manifest(items, root / "eight.jsonl")
    vocab = sorted({label for i in items for label in i.labels})
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 60, "val_check_interval": 60,
                    "check_val_every_n_epoch": None, "num_sanity_val_steps": 0, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(root / "ckpt"), "save_last": True}}]},
        "model": {"class_path": "mel_classifier",
                  "init_args": {"mel": "demo", "multi_label": True, "lr": 1e-2,
                                "classifier": {"class_path": "mel_classifier_net",
                                               "init_args": {**NET, "num_classes": len(vocab)}}}},
        "data": {"class_path": "audio", "init_args": {"manifest": str(manifest), "mel": "demo", "segment_seconds": 1.0,
                                                       "batch_size": 8, "val_split": "train"}},
    }  # fmt: skip
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", "--config", str(path)])
    frontend = MelFrontend("demo")
    from tta.data.audio import load_audio

    mels = torch.stack([frontend(load_audio(i.audio)[0])[0] for i in items])
    return {"ckpt": root / "ckpt" / "last.ckpt", "metrics": dict(cli.trainer.callback_metrics), "mels": mels,
            "labels": [list(i.labels) for i in items], "ids": [i.id for i in items], "vocab": vocab}  # fmt: skip


# ------------------------------------------------------------------------- network


def test_network_shapes_of_logits_features_and_embedding() -> None:
    torch.manual_seed(0)
    net = MelClassifierNet(n_mels=80, num_classes=5, channels=(4, 8, 16)).eval()
    mel = torch.randn(2, 80, 43)
    feats = net.features(mel)
    assert [tuple(f.shape) for f in feats] == [(2, 4, 80, 43), (2, 8, 40, 22), (2, 16, 20, 11)]
    assert net.embedding(mel).shape == (2, 16) and net(mel).shape == (2, 5)
    torch.testing.assert_close(net(mel.unsqueeze(1)), net(mel))  # (B, 1, n_mels, frames) too
    with pytest.raises(ValueError, match=r"expected log-mels \(B, 80, frames\)"):
        net(torch.randn(2, 64, 43))


def test_module_labels_and_losses_are_checked_by_name() -> None:
    net = MelClassifierNet(n_mels=80, num_classes=3, channels=(4,))
    with pytest.raises(ValueError, match="holds 2 labels but the classifier has num_classes=3"):
        MelClassifierModule(net, labels=["a", "b"], mel="demo")
    with pytest.raises(ValueError, match="takes 80 mel bins but mel preset 'audioldm' has 64"):
        MelClassifierModule(net, labels=["a", "b", "c"], mel="audioldm")
    multi = MelClassifierModule(net, labels=["a", "b", "c"], mel="demo")
    targets = multi.targets([["a", "c"], ["b"]], ["x", "y"])
    assert targets.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match=r"clip 'y' labels \['dog'\] are not in the vocabulary of 3"):
        multi.targets([["a"], ["dog"]], ["x", "y"])
    with pytest.raises(ValueError, match="clip 'x' carries no label"):
        multi.targets([[]], ["x"])
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    torch.testing.assert_close(multi.loss(logits, targets), F.binary_cross_entropy_with_logits(logits, targets))
    single = MelClassifierModule(net, labels=["a", "b", "c"], multi_label=False, mel="demo")
    with pytest.raises(ValueError, match="carries 2 labels but multi_label=false needs exactly one"):
        single.targets([["a", "c"]], ["x"])
    one_hot = single.targets([["c"], ["b"]], ["x", "y"])
    torch.testing.assert_close(single.loss(logits, one_hot), F.cross_entropy(logits, torch.tensor([2, 1])))


# ------------------------------------------------------------------ training, I/O


@pytest.mark.slow  # the `trained` fixture: a 60-step `tta fit` (and the CLI's imports when it runs first)
def test_tiny_overfit_reaches_accuracy_one_on_eight_clips(trained: dict) -> None:
    m = trained["metrics"]
    torch.manual_seed(0)
    fresh = MelClassifierNet(**NET, num_classes=len(trained["vocab"])).eval()
    module = MelClassifierModule(fresh, labels=trained["vocab"], mel="demo")
    targets = module.targets(trained["labels"], trained["ids"])
    with torch.no_grad():
        initial = float(module.loss(fresh(trained["mels"]), targets))
    assert float(m["val/acc"]) == 1.0 and float(m["val/n_clips"]) == 8
    assert float(m["val/loss"]) < 0.5 * initial, (initial, float(m["val/loss"]))
    assert float(m["val/mAP"]) > 0.9


def test_checkpoint_round_trip_gives_identical_outputs(trained: dict) -> None:
    from tta.utils.weights import load_checkpoint

    net = load_mel_classifier(trained["ckpt"])
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.labels == trained["vocab"] and net.multi_label and net.mel_config.name == "demo"
    state = load_checkpoint(trained["ckpt"])["state_dict"]
    assert load_checkpoint(trained["ckpt"])["tta"]["labels"] == trained["vocab"]
    rebuilt = MelClassifierNet(**NET, num_classes=len(trained["vocab"]))
    rebuilt.load_state_dict({k[len("classifier."):]: v for k, v in state.items() if k.startswith("classifier.")})
    with torch.no_grad():
        torch.testing.assert_close(net(trained["mels"]), rebuilt.eval()(trained["mels"]), rtol=0, atol=0)
        # the features the VQGAN's perceptual term reads, and the embedding of the FID
        for a, b in zip(net.features(trained["mels"]), rebuilt.features(trained["mels"])):
            assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="mel classifier checkpoint not found"):
        load_mel_classifier(trained["ckpt"].with_name("missing.ckpt"))


def test_vqgan_perceptual_from_the_checkpoint_trains_and_refuses_another_mel(trained: dict, tiny_synth: Path,
                                                                            tmp_path: Path) -> None:  # fmt: skip
    from tests.test_vae_module import tiny_dm, trainer
    from tests.test_vqgan import TinyMelNet, tiny_ae, tiny_module

    module = tiny_module(perceptual_checkpoint=str(trained["ckpt"]))
    assert module.perceptual_weight == 1.0 and not module.perceptual.training
    before = [p.detach().clone() for p in module.perceptual.parameters()]
    t = trainer(tmp_path, fast_dev_run=True)
    t.fit(module, datamodule=tiny_dm(tiny_synth))
    assert module.batches_trained == 1 and float(t.callback_metrics["train/perceptual"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, module.perceptual.parameters()))
    with pytest.raises(MelMismatchError, match=r"mel classifier of .*\(vqgan vs demo\).*sample_rate: 32000 != 22050"):
        tiny_module(tiny_ae(), mel="vqgan", perceptual_checkpoint=str(trained["ckpt"]))
    with pytest.raises(ValueError, match="at most one of perceptual"):
        tiny_module(perceptual=TinyMelNet(), perceptual_checkpoint=str(trained["ckpt"]))


# ----------------------------------------------------------------------- metrics


def test_spectrogram_fid_is_zero_for_identical_sets_and_grows_with_a_shift(trained: dict, tiny_synth: Path) -> None:
    from tta.data.audio import load_audio

    embedder = MelClassifierEmbedder.from_checkpoint(trained["ckpt"])
    wav = torch.stack([load_audio(i.audio)[0] for i in eight_clips(tiny_synth)])
    fid = {}
    for name, gen in (("same", wav), ("louder", 10.0 * wav)):  # +20 dB: every log-mel bin shifted by ln 10
        metric = FrechetAudioDistance(embedder=embedder)
        metric.update(wav, real=True)
        metric.update(gen)
        fid[name] = float(metric.compute())
    assert abs(fid["same"]) < 1e-6 and fid["louder"] > 1e-2, fid
    emb = embedder.embed_mel(trained["mels"])
    torch.testing.assert_close(emb, embedder.embed(wav))  # the checkpoint's own front-end
    assert emb.shape == (8, 32)


def test_mmkl_hand_made_example() -> None:
    ln3 = math.log(3.0)
    # softmax: references p = (1/2, 1/2) and (3/4, 1/4) of key a, (1/4, 3/4) of key b
    ref = torch.tensor([[0.0, 0.0], [ln3, 0.0], [0.0, ln3]])
    gen = torch.tensor([[ln3, 0.0], [0.0, 0.0]])  # q = (3/4, 1/4) for key a, (1/2, 1/2) for key b
    kl_a1 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL((1/2,1/2) || (3/4,1/4)); the 2nd a: 0
    kl_b = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL((1/4,3/4) || (1/2,1/2))
    out = mmkl(gen, ["a", "b"], ref, ["a", "a", "b"], "softmax", reduce="max")
    torch.testing.assert_close(out, torch.tensor([kl_a1, kl_b], dtype=torch.float64))
    mean = mmkl(gen, ["a", "b"], ref, ["a", "a", "b"], "softmax", reduce="mean")
    torch.testing.assert_close(mean, torch.tensor([kl_a1 / 2, kl_b], dtype=torch.float64))
    # multi-label, one class: sigmoid(0) = 1/2 vs sigmoid(ln 3) = 3/4
    one = mmkl(torch.tensor([[ln3]]), ["a"], torch.tensor([[0.0]]), ["a"], "sigmoid")
    torch.testing.assert_close(one, torch.tensor([0.5 * math.log(0.5 / 0.75)], dtype=torch.float64))
    bern = mmkl(torch.tensor([[ln3]]), ["a"], torch.tensor([[0.0]]), ["a"], "bernoulli")
    torch.testing.assert_close(bern, torch.tensor([kl_a1], dtype=torch.float64))
    with pytest.raises(IdMismatchError, match="1 generated keys have no reference clip: c"):
        mmkl(gen, ["a", "c"], ref, ["a", "a", "b"], "softmax")
    # the metric: two generated samples of one reference (SpecVQGAN's `_sample_k`), a DDP repeat counted once
    metric = MelceptionMMKL("softmax")
    metric.update(ref[[0, 2]], ["a", "b"], real=True)
    metric.update(gen[[0, 0, 1]], ["a#0", "a#1", "b#0"], keys=["a", "a", "b"])
    metric.update(gen[[1]], ["b#0"], keys=["b"])
    torch.testing.assert_close(metric.compute(), torch.tensor((2 * kl_a1 + kl_b) / 3, dtype=torch.float64))


def test_tta_eval_with_melception(trained: dict, sets: dict, tmp_path: Path,  # noqa: F811
                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from tta.cli import main
    from tta.data.audio import load_audio
    from tta.utils.files import file_sha256

    out = tmp_path / "out"
    argv = ["eval", "--generated", str(sets["gen"]), "--reference", str(sets["ref"]), "--out", str(out),
            "--metrics", "mel_fid,mmkl", "--melception", str(trained["ckpt"]), "--no-cache"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    m, p = report["metrics"], report["protocol"]["melception"]
    assert p["classifier"]["weight_sha256"] == file_sha256(trained["ckpt"]) and p["classifier"]["mmkl_kl"] == "sigmoid"
    assert p["classifier"]["front_end"]["name"] == "demo" and p["classifier"]["labels"] == len(trained["vocab"])
    assert m["mel_fid"] > 0 and m["mmkl_bernoulli"] > 0 and math.isfinite(m["mmkl"])
    scored = [i for k, i in enumerate(sets["ids"]) if k not in (1, 2)]  # clip 1 silent, clip 2 NaN: not scored
    assert sorted(report["per_item"]) == sorted(scored) and len(scored) == N - 2
    # mmkl = mean sigmoid KL(p_ref || q_gen) of the scored pairs, recomputed by hand
    embedder = MelClassifierEmbedder.from_checkpoint(trained["ckpt"])
    ref = {i.id: i.audio for i in read_manifest(sets["ref"])}
    gen_logits = embedder.classify(torch.stack([load_audio(sets["gen"] / f"{i}.wav")[0] for i in scored]))
    ref_logits = embedder.classify(torch.stack([load_audio(ref[i])[0] for i in scored]))
    p_ref, q_gen = torch.sigmoid(ref_logits.double()), torch.sigmoid(gen_logits.double())
    assert m["mmkl"] == pytest.approx(float((p_ref * (p_ref.log() - q_gen.log())).sum(1).mean()), rel=1e-5)
    assert "MMKL (mel classifier)" in (out / "eval.md").read_text()
    capsys.readouterr()
    assert main(argv[:-3] + ["--no-cache"]) == 1  # mel_fid / mmkl without a classifier
    assert "need a mel classifier (--melception CHECKPOINT" in capsys.readouterr().err
    assert main([*argv[:8], "psnr", *argv[9:]]) == 2  # a classifier but none of its metrics
    assert "--melception is only used by the metrics mel_fid and mmkl" in capsys.readouterr().err
