"""`tta demo --system vqgan`: the VQGAN stage end to end at 2 steps per model on a tiny synthetic set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tta.demo_vqgan import PRIORS, prior_args


def test_prior_args_change_only_the_text_mode_and_length(tmp_path: Path) -> None:
    ckpt = tmp_path / "v.ckpt"
    common = {f"--model.init_args.vqgan_checkpoint={ckpt}", "--model.init_args.prior.init_args.max_codes=330",
              "--data.init_args.segment_seconds=3.0"}
    assert set(prior_args("sequence", ckpt, 330, 3.0)) == common | {"--model.init_args.text_features=sequence"}
    assert set(prior_args("pooled", ckpt, 330, 3.0)) == common | {
        "--model.init_args.text_features=pooled", "--model.init_args.prior.init_args.prefix_length=1"}
    assert set(prior_args("none", ckpt, 330, 3.0)) == common | {
        "--model.init_args.text_features=none", "--model.init_args.prior.init_args.prefix_length=1",
        "--model.init_args.text_encoder=null"}


@pytest.mark.slow
def test_stage_end_to_end(tmp_path: Path, single_thread: None) -> None:
    from tta.data.synth import ensure_synth
    from tta.demo_vqgan import run_vqgan_stage

    manifest = ensure_synth(tmp_path / "synth", n=40, seed=0, sample_rate=22050, duration=3.0)
    report = run_vqgan_stage(tmp_path / "out", manifest=manifest, classifier_steps=2, vqgan_steps=2, prior_steps=2,
                             clap_steps=2, n_prompts=3)
    assert json.loads((tmp_path / "out" / "vqgan" / "report.json").read_text())["rows"] == report["rows"]
    assert set(report["rows"]) == {"real test clips", "VQGAN-reconstructed real clips", *PRIORS, "chance"}
    training = report["training"]
    assert training["mel_classifier"]["steps"] == 2 and training["vqgan"]["steps"] == 2
    for mode in PRIORS.values():
        assert training[f"prior_{mode}"]["steps"] == 2 and Path(training[f"prior_{mode}"]["checkpoint"]).is_file()
    assert Path(training["vqgan"]["checkpoint"]).is_file() and Path(training["mel_classifier"]["checkpoint"]).is_file()
    cb = report["codebook"]
    assert cb["num_codes"] == 128 and 0 < cb["usage"] <= 1 and 1 <= cb["perplexity"] <= cb["codes_used"] + 1e-6
    assert cb["codes"] == 3 * 33 * 10  # 3 whole test clips of 259 frames: 33 columns x 10 rows each
    assert report["prior_max_codes"] == 330
    for name, r in report["rows"].items():
        for key in ("accuracy", "clap", "mmkl", "mmkl_bernoulli"):
            e = r.get(key)
            if e is None or e["low"] is None:
                continue
            assert e["n"] == 3 and math.isfinite(e["mean"]) and e["low"] <= e["mean"] <= e["high"], (name, key, e)
        if r.get("mel_fid") is not None:
            assert math.isfinite(r["mel_fid"]) and r["mel_fid"] >= 0
    for title in PRIORS:
        # SpecVQGAN's sigmoid "KL" is unnormalised (may be < 0); the Bernoulli KL is a true divergence
        assert report["rows"][title]["mmkl_bernoulli"]["mean"] >= 0 and 0 <= report["rows"][title]["silent"] <= 1
    assert report["rows"]["chance"]["accuracy"]["mean"] == pytest.approx(report["judge"]["chance"])
    assert all(name in report["table"] for name in report["rows"])
    assert len(report["files"]) == 3 * (2 + len(PRIORS)) and all(Path(f).is_file() for f in report["files"])
