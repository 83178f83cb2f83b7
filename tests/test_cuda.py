"""CUDA and bf16 paths: training every demo system on the GPU in bf16-mixed (AudioLDM on CLAP audio
embeddings too), generation on the GPU matching the CPU, the T5 fp32 island, FAD on CUDA tensors.

Skipped without a CUDA GPU (CI has none). ``TTA_TEST_ACCELERATOR=cpu`` runs the same checks on the
CPU (bf16-mixed there too), which is how these tests themselves are debugged without a GPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import CONFIGS
from tta.cli import main

ACCEL = os.environ.get("TTA_TEST_ACCELERATOR", "gpu")
DEVICE = "cuda" if ACCEL == "gpu" else "cpu"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ACCEL == "gpu" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _manifest_ids(manifest: Path) -> list[str]:
    return [json.loads(line)["id"] for line in manifest.read_text().splitlines() if line.strip()]


def fit_bf16(config: str, root: Path, manifest: Path, *overrides: str, steps: int = 4,
             callbacks: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    """``tta fit`` of a demo config on ``ACCEL`` in bf16-mixed for ``steps`` batches (validation
    every 2, metrics in ``root/metrics.csv``); returns the last checkpoint after checking that
    every stored float tensor is finite."""
    ck = root / "ck"
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(ck), "save_last": True}}
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(root), "name": "", "version": ""}}
    args = ["fit", "--config", str(CONFIGS / "demo" / config), f"--trainer.default_root_dir={root}",
            f"--trainer.accelerator={ACCEL}", "--trainer.devices=1", "--trainer.precision=bf16-mixed",
            f"--trainer.max_steps={steps}", "--trainer.max_time=null", "--trainer.val_check_interval=2",
            "--trainer.check_val_every_n_epoch=null", "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0", f"--trainer.logger={json.dumps(logger)}",
            "--trainer.enable_progress_bar=false", f"--trainer.callbacks={json.dumps([checkpoint, *callbacks])}",
            f"--data.init_args.manifest={manifest}", *overrides]
    assert main(args) == 0
    ckpt = torch.load(ck / "last.ckpt", weights_only=True, map_location="cpu")
    bad = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"non-finite weights after bf16 training on {ACCEL}: {bad[:5]}"
    assert ckpt["tta"]["counters"]["batches_trained"] >= 2
    return ckpt


def test_vae_trains_in_bf16(tiny_synth: Path, tmp_path: Path) -> None:
    fit_bf16("vae.yaml", tmp_path, tiny_synth, "--data.init_args.batch_size=2",
             "--data.init_args.segment_seconds=0.5", "--model.init_args.autoencoder.init_args.ch=8")


def test_hifigan_trains_in_bf16(tiny_synth: Path, tmp_path: Path) -> None:
    fit_bf16("hifigan.yaml", tmp_path, tiny_synth, "--data.init_args.batch_size=2", steps=6)


def test_clap_trains_in_bf16(tiny_synth: Path, tmp_path: Path) -> None:
    from tests.hf_fixtures import make_bert_folder

    text = {"class_path": "tta.encoders.text.BertTextEncoder",  # tiny stand-in for the demo's MiniLM
            "init_args": {"path": str(make_bert_folder(tmp_path / "bert")), "max_length": 16}}
    fit_bf16("clap.yaml", tmp_path, tiny_synth, "--data.init_args.batch_size=4", "--data.init_args.segment_seconds=0.5",
             "--model.init_args.clap.init_args.audio_encoder.init_args.window_seconds=0.5",
             f"--model.init_args.clap.init_args.text_encoder={json.dumps(text)}")


def test_audioldm_trains_on_clap_audio_embeddings_in_bf16(tiny_synth: Path, tmp_path: Path) -> None:
    """AudioLDM's recipe (film_source=audio): waveforms resampled and embedded by CLAP's audio
    tower on the device under bf16 autocast."""
    from tests.test_cli import ldm_overrides

    overrides = ldm_overrides(CONFIGS / "demo" / "audioldm.yaml", tmp_path)
    fit_bf16("audioldm.yaml", tmp_path, tiny_synth, *overrides, "--model.init_args.film_source=audio",
             "--data.init_args.segment_seconds=0.75")


@pytest.fixture(scope="module")
def re_audioldm_ckpt(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Re-AudioLDM (tiny frozen VAE / CLAP, a feature store over the manifest's clips) trained in
    bf16-mixed on ``ACCEL``."""
    from tests.test_cli import ldm_overrides, ldm_widths
    from tta.retrieval.index import IndexSpec, build_index

    root = tmp_path_factory.mktemp("re_audioldm")
    ids = _manifest_ids(tiny_synth)
    overrides = ldm_overrides(CONFIGS / "demo" / "re_audioldm.yaml", root, ids=ids)
    # the test-time index that generation (eval callback, `tta generate`) queries with CLAP text embeddings
    joint = ldm_widths(CONFIGS / "demo" / "re_audioldm.yaml")["film"]
    unit = torch.randn(len(ids), joint, generator=torch.Generator().manual_seed(0))
    build_index(torch.nn.functional.normalize(unit, dim=-1).numpy(), ids, IndexSpec(type="flat")).save(root / "index")
    # the eval_metrics callback: generate_for_eval (DPM-Solver++) and CLAP score / PSNR on the device
    scores = {"class_path": "eval_metrics",
              "init_args": {"manifest": str(tiny_synth), "split": None, "n_clips": 2, "seconds": 0.5,
                            "metrics": ["clap", "psnr"], "clap_checkpoint": str(root / "clap.ckpt")}}
    fit_bf16("re_audioldm.yaml", root, tiny_synth, *overrides, "--data.init_args.segment_seconds=0.75",
             callbacks=(scores,))
    logged = (root / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    assert "eval/clap_score" in header and "eval/psnr" in header, header
    column = header.index("eval/clap_score")
    assert any(row.split(",")[column] not in ("", "nan") for row in logged[1:]), "eval/clap_score never logged"
    return root / "ck" / "last.ckpt"


def test_re_audioldm_trains_and_generates_on_the_device(re_audioldm_ckpt: Path, tmp_path: Path) -> None:
    pipe_dir = tmp_path / "pipe"
    assert main(["pipeline", "export", str(re_audioldm_ckpt), "--out", str(pipe_dir), "--vocoder", "griffinlim",
                 "--steps", "3"]) == 0
    out = tmp_path / "out"
    assert main(["generate", "a bell rings", "a dog barks", "--pipeline", str(pipe_dir), "--duration", "0.5",
                 "--out", str(out), "--device", DEVICE, "--allow-silent"]) == 0
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all((out / r["audio"]).is_file() for r in rows)
    edited = tmp_path / "edited"  # style transfer of the first generation, and CLAP re-ranking, on the device
    assert main(["generate", "a dog barks", "--pipeline", str(pipe_dir), "--duration", "0.5", "--out", str(edited),
                 "--device", DEVICE, "--allow-silent", "--init-audio", str(out / rows[0]["audio"]),
                 "--strength", "0.5", "--candidates", "2"]) == 0
    row = json.loads((edited / "generations.jsonl").read_text())
    assert row["generation"]["strength"] == 0.5 and -1.0 <= row["generation"]["clap_score"] <= 1.0


def test_generation_on_the_device_matches_the_cpu(re_audioldm_ckpt: Path, tmp_path: Path) -> None:
    """Seeded noise is drawn on the CPU, so a device and the CPU start from the same latents and
    (fp32, no TF32) end at the same mel up to float rounding."""
    from tta.training.loading import load_trained

    module = load_trained(re_audioldm_ckpt)
    captions, frames = ["a bell rings", "water drips"], 40
    neighbours = [["synth_00001", "synth_00002", "synth_00003"], ["synth_00004", "synth_00005", "synth_00006"]]
    cpu = module.generator.generate_mel(captions, frames, steps=4, guidance=2.0, seed=5, neighbours=neighbours)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        dev = module.to(DEVICE).generator.generate_mel(captions, frames, steps=4, guidance=2.0, seed=5, neighbours=neighbours)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert dev.device.type == DEVICE and torch.isfinite(dev).all()
    torch.testing.assert_close(dev.cpu(), cpu, atol=2e-3, rtol=2e-3)


def test_t5_stays_float32_under_bf16_autocast_on_the_device(tmp_path: Path) -> None:
    from tests.hf_fixtures import make_t5_folder
    from tta.encoders.text import T5TextEncoder

    t5 = T5TextEncoder(path=str(make_t5_folder(tmp_path / "t5")), max_length=16).to(DEVICE)
    texts = ["a dog barks", "rain falls on a tin roof while thunder rolls in the distance"]
    ref = t5(texts)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        emb = t5(texts)
    assert emb.seq.device.type == DEVICE and emb.seq.dtype == emb.pooled.dtype == torch.float32
    torch.testing.assert_close(emb.pooled, ref.pooled, atol=1e-5, rtol=1e-5)


def test_fad_on_device_tensors_equals_cpu() -> None:
    from tta.metrics.fad import FrechetAudioDistance

    g = torch.Generator().manual_seed(0)
    gen, ref = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g) + 0.5
    values = []
    for device in ("cpu", DEVICE):
        fad = FrechetAudioDistance().to(device)
        fad.update(gen.to(device), ids=[f"g{i}" for i in range(64)])
        fad.update(ref.to(device), ids=[f"r{i}" for i in range(64)], real=True)
        values.append(float(fad.compute()))
    assert values[0] > 0.1 and values[1] == pytest.approx(values[0], rel=1e-9)


def test_feature_store_is_written_on_the_device_in_bf16(tiny_synth: Path, tmp_path: Path) -> None:
    """`tta predict` of the neighbour feature store (AudioMAE tokens, T5 caption states) on the
    device under bf16-mixed: T5 stays an fp32 island and every stored feature is finite."""
    from tests.hf_fixtures import make_t5_folder
    from tta.retrieval.features import FeatureStore

    out = tmp_path / "store"
    text = {"class_path": "tta.encoders.text.T5TextEncoder",
            "init_args": {"path": str(make_t5_folder(tmp_path / "t5")), "max_length": 50}}
    assert main(["predict", "--config", str(CONFIGS / "demo" / "retrieval_features.yaml"),
                 f"--trainer.default_root_dir={tmp_path}", f"--trainer.accelerator={ACCEL}", "--trainer.devices=1",
                 "--trainer.precision=bf16-mixed", "--trainer.enable_progress_bar=false",
                 f"--model.init_args.out_dir={out}", "--model.init_args.audio_encoder.init_args.clip_seconds=1.0",
                 f"--model.init_args.text_encoder={json.dumps(text)}", f"--data.init_args.manifest={tiny_synth}",
                 "--data.init_args.segment_seconds=1.0"]) == 0
    store = FeatureStore.open(out, require=("audio", "text"), expect_text_length=50)
    ids = _manifest_ids(tiny_synth)
    assert sorted(store.ids) == sorted(ids)
    feats = store.lookup([ids[:4]])
    assert feats["text"].shape[:3] == (1, 4, 50) and feats["text_mask"].any()
    assert all(torch.isfinite(feats[k]).all() for k in ("audio", "text"))
