"""`tta demo` end to end, with a 2-step training run."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tta.cli import main


def test_demo_writes_report_audio_and_spectrograms(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--clap-steps", "2", "--ldm-steps", "2", "--t2a-prompts", "3", "--t2a-sample-steps", "2", "--dreamaudio-steps", "2", "--clips", "1", "--data-dir", str(tmp_path / "data")]) == 0
    report = json.loads((out / "report.json").read_text())
    metrics = report["metrics"]
    assert set(metrics) == {"vocoder_only", "vae_vocoder_before_training", "vae_vocoder_after_training", "griffinlim"}
    for scores in metrics.values():
        assert all(math.isfinite(v) and v >= 0 for v in scores.values())
    # the pretrained vocoder resynthesises far better than an untrained VAE in front of it
    assert metrics["vocoder_only"]["mel_l1"] < 0.5 * metrics["vae_vocoder_before_training"]["mel_l1"]
    assert report["training"]["steps"] == 2
    assert report["mel"]["sample_rate"] == 22050
    wavs = sorted(p.name for p in (out / "audio").glob("*.wav"))
    assert len(wavs) == 5 and any(n.endswith("_vae_after.wav") for n in wavs)
    assert len(list((out / "spectrograms").glob("*.png"))) == 1
    assert all(Path(f).is_file() for f in report["files"])
    clap = report["clap"]
    assert clap["training"]["steps"] == 2
    assert 0.0 <= clap["text_to_audio_test"]["R@1"] <= clap["text_to_audio_test"]["R@10"] <= 1.0
    assert clap["zero_shot_heldout_clips"] > 0 and 0.0 <= clap["zero_shot_heldout_accuracy"] <= 1.0
    assert len(clap["example_retrievals"]) == 3 and all(len(e["results"]) == 3 for e in clap["example_retrievals"])
    # no leakage: the retrieval datastore (index and training neighbour table) holds training clips only
    from tta.data.manifest import read_manifest
    from tta.demo_ldm import LISTEN_CLIPS
    from tta.retrieval.neighbours import NeighbourTable

    split = {i.id: i.split for i in read_manifest(report["manifest"])}
    table = NeighbourTable.load(clap["index_dir"])
    used = set(table.query_ids) | {n for q in table.query_ids for n, _ in table[q]}
    assert set(table.ids) | used <= {i for i, s in split.items() if s == "train"}
    t2a = report["text_to_audio"]
    assert set(t2a["models"]) == {"audioldm", "re_audioldm"}
    assert "training split only" in t2a["retrieval_datastore"]
    rows = t2a["judge"]["rows"]
    assert set(rows) == {"real test clips", "VAE-reconstructed real clips", "AudioLDM", "Re-AudioLDM"}
    for name, row in rows.items():  # every row carries point estimates with bootstrap intervals
        acc = row["accuracy_all"]
        assert acc["n"] == t2a["judge"]["prompts"] == 3 and acc["low"] <= acc["mean"] <= acc["high"], (name, acc)
    assert all(name in t2a["table"] for name in rows) and "chance" in t2a["table"]
    tail = t2a["tail_difference"]
    assert tail["low"] <= tail["mean"] <= tail["high"] and "Re-AudioLDM - AudioLDM tail accuracy" in tail["statement"]
    for m in t2a["models"].values():
        assert m["training"]["steps"] == 2 and m["prompts"] == 3 and -1.0 <= m["clap_score"] <= 1.0
        assert 0.0 <= m["accuracy"]["all"] <= 1.0
        assert len(list(Path(m["audio_dir"]).glob("griffinlim/*.wav"))) == m["prompts"]  # what the judge heard
        assert len(list(Path(m["audio_dir"]).glob("*.wav"))) == min(3, LISTEN_CLIPS)  # HiFi-GAN listening examples
    assert all(len(e["neighbours"]) == 3 for e in t2a["models"]["re_audioldm"]["examples"])
    for m in t2a["models"].values():  # FAD / KL / IS with YAMNet and the CLAP score, through `tta.evaluation`
        names = set(m["evaluation"]["metrics"])
        assert {"fad", "is", "clap_score"} <= names and any(n.startswith("kl") for n in names), names
        assert (Path(m["evaluation"]["eval_dir"]) / "eval.md").is_file()
    # the customization stage: DreamAudio on held-out classes, beside the same model without references
    custom = report["customization"]
    assert custom["training"]["steps"] == 2 and custom["eval_items"] == 3
    stage = json.loads(Path(custom["report"]).read_text())
    assert {"DreamAudio, with references", "DreamAudio, references dropped", "Re-AudioLDM (demo)"} <= set(stage["rows"])
    assert set(stage["step_sweep"]) == {"4", "8", "16", "32"}
    purity = stage["data"]["split_purity"]
    assert set(purity["heldout_classes"]) == set(custom["heldout_classes"]) and purity["heldout_classes"]
    assert purity["shared_clips"] == 0 and Path(stage["training"]["checkpoint"]).is_file()
    rows = dict(stage["rows"])
    assert set(rows) == {"real targets", "VAE-reconstructed targets", "chance", "DreamAudio, with references",
                         "DreamAudio, references dropped", "Re-AudioLDM (demo)"}
    assert math.isclose(rows["real targets"]["clap_a"]["mean"], 1.0, abs_tol=1e-6)  # a clip against itself
    chance = rows.pop("chance")
    assert chance["clap_a"]["n"] == 3 and chance["accuracy"]["mean"] == stage["judge"]["probe_chance"]
    assert 0.0 < chance["heldout_accuracy"]["mean"] == stage["judge"]["heldout_chance"] <= 1.0
    for name, row in rows.items():
        for key in ("clap_a", "accuracy", "heldout_accuracy", "clap_score"):
            e = row[key]
            assert e["n"] == 3 and e["low"] <= e["mean"] <= e["high"], (name, key, e)
        assert -1.0 - 1e-6 <= row["clap_a"]["mean"] <= 1.0 + 1e-6 and 0.0 <= row["heldout_accuracy"]["mean"] <= 1.0
    # the references change the generation (the zero projections moved after two steps)
    diag = stage["diagnostics"]
    assert diag["zero_projection_abs_max"] > 0 and diag["mel_change_by_references"] > 0
    assert all(name in stage["table"] for name in rows)
    from tta.demo_dreamaudio import LISTEN

    wavs = {Path(f).name for f in stage["files"]}
    assert len(wavs) == LISTEN * 4 and all(Path(f).is_file() for f in stage["files"])  # target + 3 systems per item
    # the stage's own CLI rescoring that checkpoint (no training), on one item without the Re-AudioLDM row
    from tta.demo_dreamaudio import main as stage_main

    assert stage_main(["--demo", str(out), "--out", str(tmp_path / "rescored"), "--checkpoint",
                       stage["training"]["checkpoint"], "--eval-items", "1", "--sample-steps", "1",
                       "--step-sweep", "1", "--no-re-audioldm", "--threads", "1"]) == 0
    rescored = json.loads((tmp_path / "rescored" / "dreamaudio" / "report.json").read_text())
    assert rescored["training"]["seconds"] == 0.0 and rescored["data"]["eval_items"] == 1  # loaded, not trained
    assert "Re-AudioLDM (demo)" not in rescored["rows"] and set(rescored["step_sweep"]) == {"1"}
