"""`tta fit` -> `tta pipeline export` -> `tta generate` / `load_pipeline` on a tiny AudioLDM (the
`trained_ckpt` fixture of conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tta.cli import main
from tta.pipelines.guard import BrokenOutputError, check_output


def test_export_generate_and_python_api(trained_ckpt: Path, tmp_path: Path, single_thread: None,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    pipe_dir = tmp_path / "pipe"
    assert main(["pipeline", "export", str(trained_ckpt), "--out", str(pipe_dir), "--vocoder", "griffinlim",
                 "--steps", "3"]) == 0
    meta = json.loads((pipe_dir / "pipeline.json").read_text())
    assert meta["format"] == "tta-pipeline/1" and meta["source"]["ema"] is True
    assert {p.name for p in pipe_dir.iterdir()} >= {"unet.safetensors", "vae.safetensors", "clap.safetensors",
                                                    "conditioners.safetensors", "vocoder.safetensors"}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na bell rings\n\nwater drips then a door knocks\n")
    out = tmp_path / "out"
    assert main(["generate", "a siren wails", "--prompts", str(prompts), "--pipeline", str(pipe_dir),
                 "--duration", "0.5", "--out", str(out), "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["captions"][0] for r in rows] == ["a siren wails", "a bell rings", "water drips then a door knocks"]
    for r in rows:
        assert (out / r["audio"]).is_file() and (out / r["audio"]).with_suffix(".png").is_file()
        assert r["generation"]["steps"] == 3 and r["generation"]["guidance"] == 3.5
        assert r["duration"] == pytest.approx(0.5, abs=0.02)

    capsys.readouterr()
    assert main(["generate", "a bell", "--pipeline", str(pipe_dir), "--index", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err  # transformers' weight-loading progress may come first
    assert err.splitlines()[-1].startswith("tta generate: error: --index given") and "does not retrieve" in err
    assert "Traceback" not in err

    from tta import load_pipeline

    pipe = load_pipeline(pipe_dir)
    wavs = pipe(["a bell rings"], duration=0.4, steps=2, seed=1)
    assert len(wavs) == 1 and wavs[0].shape == (round(0.4 * 22050),)
    again = pipe(["a bell rings"], duration=0.4, steps=2, seed=1)
    assert torch.equal(wavs[0], again[0])
    best = pipe.generate(["a bell rings", "a dog"], duration=0.3, steps=2, candidates=2)
    assert best.wav.shape[0] == 2 and best.clap_scores is not None and len(best.clap_scores) == 2
    with pytest.raises(ValueError, match="non-empty"):
        pipe([""], duration=0.3)

    from tests.ldm_fixtures import component_checkpoints

    _, clap_ckpt = component_checkpoints(tmp_path / "components", mel="demo")
    reranked = tmp_path / "reranked"
    assert main(["generate", "a bell rings", "--pipeline", str(pipe_dir), "--duration", "0.3", "--steps", "2",
                 "--candidates", "2", "--rerank-clap", str(clap_ckpt), "--out", str(reranked)]) == 0
    row = json.loads((reranked / "generations.jsonl").read_text())
    assert row["generation"]["rerank_clap"] == str(clap_ckpt) and -1.0 <= row["generation"]["clap_score"] <= 1.0


def test_loading_refuses_tampered_pipeline(trained_ckpt: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from tta import load_pipeline
    from tta.utils.weights import WeightMismatchError

    pipe_dir = tmp_path / "pipe"
    main(["pipeline", "export", str(trained_ckpt), "--out", str(pipe_dir), "--vocoder", "griffinlim"])
    unet = load_file(str(pipe_dir / "unet.safetensors"))
    unet.pop(next(iter(unet)))
    save_file(unet, str(pipe_dir / "unet.safetensors"))
    with pytest.raises(WeightMismatchError, match="missing keys"):
        load_pipeline(pipe_dir)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint nor a pipeline"):
        load_pipeline(tmp_path)


def test_output_guard() -> None:
    ok = torch.randn(2, 100) * 0.1
    assert check_output(ok) == []
    with pytest.raises(BrokenOutputError, match="NaN/Inf for \\['b'\\]"):
        check_output(torch.stack([ok[0], torch.full((100,), float("nan"))]), names=["a", "b"])
    silent = torch.stack([ok[0], torch.zeros(100)])
    with pytest.raises(BrokenOutputError, match="silent"):
        check_output(silent, names=["a", "b"])
    assert check_output(silent, allow_silent=True, names=["a", "b"]) == ["silent: b"]


def test_style_transfer_edits_given_audio(trained_ckpt: Path, tmp_path: Path, single_thread: None,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """AudioLDM's style transfer (SDEdit): a small strength stays near the given audio's mel."""
    from tta import load_pipeline
    from tta.data.audio import save_audio

    pipe_dir = tmp_path / "pipe"
    assert main(["pipeline", "export", str(trained_ckpt), "--out", str(pipe_dir), "--vocoder", "griffinlim"]) == 0
    pipe = load_pipeline(pipe_dir)
    t = torch.arange(round(0.4 * pipe.sample_rate)) / pipe.sample_rate
    source = 0.3 * torch.sin(2 * torch.pi * 440 * t)
    frames = pipe.frames_for(0.4)
    codec = pipe.generator.codec  # the VAE's reconstruction of the source is what a small strength keeps
    target = codec.decode(codec.encode(pipe._init_mel(source, 1, 1, 0.4, frames), sample=False), frames)
    near = pipe.generate(["a dog barks"], duration=0.4, steps=4, init_audio=source, strength=0.25)
    far = pipe.generate(["a dog barks"], duration=0.4, steps=4)
    assert near.settings["strength"] == 0.25 and near.mel.shape == far.mel.shape == (1, 80, frames)
    assert (near.mel - target).abs().mean() < 0.5 * (far.mel - target).abs().mean()
    with pytest.raises(ValueError, match=r"init_audio must be \(T,\) or \(2, T\)"):
        pipe.generate(["a", "b"], duration=0.4, steps=2, init_audio=torch.zeros(3, 100), strength=0.5)

    wav_path = tmp_path / "source.wav"
    save_audio(wav_path, source, pipe.sample_rate)
    out = tmp_path / "out"
    assert main(["generate", "a dog barks", "--pipeline", str(pipe_dir), "--duration", "0.4", "--steps", "4",
                 "--init-audio", str(wav_path), "--strength", "0.25", "--out", str(out)]) == 0
    row = json.loads((out / "generations.jsonl").read_text())
    assert row["generation"]["init_audio"] == str(wav_path) and row["generation"]["strength"] == 0.25
    capsys.readouterr()
    assert main(["generate", "a dog", "--pipeline", str(pipe_dir), "--strength", "0.5", "--out", str(out)]) == 2
    assert capsys.readouterr().err == "tta generate: error: --strength needs --init-audio (the audio to edit)\n"
