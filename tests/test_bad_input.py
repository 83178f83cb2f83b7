"""Hostile input and operator mistakes (issue 17): one parametrized row per bad input.

Each row runs ``tta ...`` through `tta.cli.main` and asserts the exit code (2 usage, 1 data),
that the one-line message names the file / field / argument, that no traceback is printed and
that no output file is left behind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import CONFIGS
from tta.cli import main
from tta.data.manifest import ManifestItem, write_manifest

SR = 22050


def _wav(path: Path, samples: int, amplitude: float = 0.1, sr: int = SR) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, amplitude * np.random.default_rng(0).standard_normal(samples), sr, subtype="PCM_16")
    return path


def _manifest(tmp: Path, clips: dict[str, Path], split: str = "train") -> Path:
    items = [ManifestItem(id=k, audio=v, captions=[f"the sound of {k}"], split=split) for k, v in clips.items()]
    return write_manifest(items, tmp / "m.jsonl")


def _truncated(path: Path) -> Path:
    full = _wav(path, SR).read_bytes()
    path.write_bytes(full[: len(full) // 2])
    return path


@dataclass
class Case:
    """A bad input: ``make(tmp, ctx)`` returns the ``tta`` argument list; ``names``: what the
    message must name; ``out``: a path (relative to tmp) that must not exist afterwards."""

    make: Callable[[Path, dict], list[str]]
    code: int
    names: tuple[str, ...]
    out: str | None = None
    error_line: bool = True  # False: a `tta data check` report (table + details), not an error line


def _gen(*extra: str) -> Callable[[Path, dict], list[str]]:
    return lambda tmp, ctx: ["generate", "a dog barks", "--pipeline", str(ctx["ckpt"]), "--vocoder", "griffinlim",
                             "--out", str(tmp / "gen"), *extra]


def _check(clips: Callable[[Path], dict[str, Path]], *extra: str) -> Callable[[Path, dict], list[str]]:
    return lambda tmp, ctx: ["data", "check", str(_manifest(tmp, clips(tmp))), "--mel", "demo", *extra]


def _bad_utf8(tmp: Path, ctx: dict) -> list[str]:
    path = tmp / "m.jsonl"
    _wav(tmp / "a.wav", SR)
    path.write_bytes(b'{"id": "a", "audio": "a.wav"}\n{"id": "caf\xe9", "audio": "a.wav"}\n')
    return ["data", "check", str(path)]


def _fit_short_clip(tmp: Path, ctx: dict) -> list[str]:
    manifest = _manifest(tmp, {"tiny": _wav(tmp / "tiny.wav", 300), "ok": _wav(tmp / "ok.wav", SR)})
    return ["fit", "--config", str(CONFIGS / "demo" / "vae.yaml"), f"--trainer.default_root_dir={tmp / 'run'}",
            "--trainer.max_steps=1", "--trainer.callbacks=[]", f"--data.init_args.manifest={manifest}",
            "--data.init_args.batch_size=1"]


def _eval(*extra: str) -> Callable[[Path, dict], list[str]]:
    return lambda tmp, ctx: ["eval", "--generated", str(tmp), "--reference", str(tmp), "--out", str(tmp / "ev"),
                             *extra]


def _eval_short_clip(tmp: Path, ctx: dict, *extra: str) -> list[str]:
    """Generated and reference folders, each with a 1-s clip and a 300-sample one (the evaluation
    spectrogram, AudioLDM's mel at 16 kHz, needs 480)."""
    for side in ("gen", "ref"):
        _wav(tmp / side / "ok.wav", 16000, sr=16000)
        _wav(tmp / side / "tiny.wav", 300, sr=16000)
    return ["eval", "--generated", str(tmp / "gen"), "--reference", str(tmp / "ref"), "--out", str(tmp / "ev"),
            "--metrics", "psnr", *extra]


CASES: dict[str, Case] = {
    # row 6: arguments refused by name, nothing substituted
    "generate --steps 0": Case(_gen("--steps", "0"), 2, ("--steps", ">= 1", "got 0"), "gen"),
    "generate --candidates 0": Case(_gen("--candidates", "0"), 2, ("--candidates", "got 0"), "gen"),
    "generate --guidance nan": Case(_gen("--guidance", "nan"), 2, ("--guidance", "finite", "nan"), "gen"),
    "generate --duration inf": Case(_gen("--duration", "inf"), 2, ("--duration", "finite"), "gen"),
    "generate --duration 0": Case(_gen("--duration", "0"), 2, ("--duration", "> 0"), "gen"),
    "generate --duration 100000": Case(_gen("--duration", "100000"), 2,
                                       ("--duration", "<= 327.68", "max_duration", "100000"), "gen"),
    "generate --batch-size 0": Case(_gen("--batch-size", "0"), 2, ("--batch-size",), "gen"),
    "generate --strength 2": Case(lambda tmp, ctx: _gen("--init-audio", str(_wav(tmp / "i.wav", SR)), "--strength",
                                                        "2")(tmp, ctx), 2, ("--strength", "<= 1"), "gen"),
    "generate --split without --manifest": Case(_gen("--split", "test"), 2, ("--split", "--manifest"), "gen"),
    "generate missing pipeline": Case(lambda tmp, ctx: ["generate", "x", "--pipeline", str(tmp / "nope"), "--out",
                                                        str(tmp / "gen")], 2, ("nope", "pipeline"), "gen"),
    "eval --silence-threshold nan": Case(_eval("--silence-threshold", "nan"), 2, ("--silence-threshold", "nan"),
                                         "ev"),
    "eval --silence-threshold -1": Case(_eval("--silence-threshold", "-1"), 2, ("--silence-threshold", ">= 0"),
                                        "ev"),
    "eval --seconds 0": Case(_eval("--seconds", "0"), 2, ("--seconds",), "ev"),
    # rows 3, 4, 10: an index meets a CLAP (content hash of its towers); the demo's index had none
    "index search with another CLAP": Case(lambda tmp, ctx: ["index", "search", str(ctx["index"]), "a dog", "--clap",
                                                             str(ctx["other_clap"])], 1,
                                           ("another CLAP", "other.ckpt", "text tower", "index")),
    "index search, index without content hash": Case(lambda tmp, ctx: ["index", "search", str(ctx["untracked"]), "a dog",
                                                                       "--clap", str(ctx["clap"])], 1,
                                                     ("untracked", "embedding model")),
    "index search -k 0": Case(lambda tmp, ctx: ["index", "search", str(ctx["index"]), "a dog", "-k", "0"], 2, ("-k",)),
    "index search, no index": Case(lambda tmp, ctx: ["index", "search", str(tmp), "a dog"], 2, ("no index", "meta.json")),
    "generate --index on a model that does not retrieve": Case(
        lambda tmp, ctx: _gen("--index", str(ctx["index"]))(tmp, ctx), 2, ("--index", "does not retrieve"), "gen"),
    # row 7: a missing file anywhere on the line is one line, not a traceback
    "fit --config missing": Case(lambda tmp, ctx: ["fit", "--config", str(tmp / "absent.yaml")], 2,
                                 ("config file not found", "absent.yaml")),
    "data check missing manifest": Case(lambda tmp, ctx: ["data", "check", str(tmp / "absent.jsonl")], 2,
                                        ("absent.jsonl",)),
    "data check directory as manifest": Case(lambda tmp, ctx: ["data", "check", str(tmp)], 1, ("is a directory",)),
    "data check --mel unknown": Case(lambda tmp, ctx: ["data", "check", str(tmp / "m.jsonl"), "--mel", "nope"], 2,
                                     ("--mel", "'nope'")),
    "data check --silence-threshold nan": Case(_check(lambda t: {"a": _wav(t / "a.wav", SR)}, "--silence-threshold",
                                                      "nan"), 2, ("--silence-threshold",)),
    # row 8: the manifest line that is not UTF-8, by number
    "data check invalid UTF-8 line": Case(_bad_utf8, 1, ("m.jsonl:2", "not valid UTF-8", "0xe9")),
    # rows 1 and 8: clips that crash or poison training, each reported once by `tta data check`
    "data check clip too short for the mel": Case(_check(lambda t: {"tiny": _wav(t / "tiny.wav", 300)}), 1,
                                                  ("too_short_for_mel", "tiny: 300 samples", "needs at least 512"),
                                                  error_line=False),
    "data check truncated wav": Case(_check(lambda t: {"cut": _truncated(t / "cut.wav")}), 1,
                                     ("cut: truncated", "declares 44100 bytes"), error_line=False),
    "data check all-silent clip": Case(_check(lambda t: {"quiet": _wav(t / "q.wav", SR, amplitude=0.0)}), 1,
                                       ("silent", "quiet: silent: peak 0"), error_line=False),
    "data check directory as clip": Case(_check(lambda t: {"dir": (t / "clip.wav").mkdir() or t / "clip.wav"}), 1,
                                         ("not_a_file", "clip.wav is a directory"), error_line=False),
    # row 1 for eval: a clip shorter than the evaluation spectrogram's STFT needs, by file, minimum stated
    "eval clip too short for the mel": Case(_eval_short_clip, 1, (
        "1 generated clip(s) too short", "tiny (", "tiny.wav): 300 samples at 16000 Hz", "at least 480 samples",
        "--pad-short-clips"), "ev"),
    "eval --seconds shorter than the mel window": Case(
        lambda tmp, ctx: _eval_short_clip(tmp, ctx, "--seconds", "0.01"), 2, ("--seconds", "0.030 s"), "ev"),
    # row 1: a run started without a check refuses the clip by name
    "fit with a clip too short for the mel": Case(_fit_short_clip, 1, ("tta fit: error:", "tiny", "unusable"),
                                                  "run/checkpoints"),
}


def _other_clap(ckpt: Path, out: Path) -> Path:
    """The same CLAP checkpoint with one text-tower weight changed: another embedding space."""
    import torch

    state = torch.load(ckpt, weights_only=True)
    key = next(k for k in state["state_dict"] if "text_projection" in k and k.endswith("weight"))
    state["state_dict"][key] = state["state_dict"][key] + 0.5
    torch.save(state, out)
    return out


@pytest.fixture(scope="module")
def ctx(trained_ckpt: Path, tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny trained AudioLDM checkpoint; a flat index built with a tiny CLAP, the CLAP, another
    CLAP, and a copy of the index without content hashes (as the demo wrote them)."""
    import json
    import shutil

    from tests.ldm_fixtures import component_checkpoints

    root = tmp_path_factory.mktemp("bad_index")
    _, clap = component_checkpoints(root / "components", mel="demo")
    index = root / "index"
    assert main(["index", "build", "--manifest", str(tiny_synth), "--clap", str(clap), "--out", str(index),
                 "--type", "flat", "--neighbours", "3"]) == 0
    untracked = Path(shutil.copytree(index, root / "untracked"))
    meta = json.loads((untracked / "meta.json").read_text())
    del meta["embedding_content"]
    meta["embedding_model"] = "demo CLAP (untracked checkpoint)"
    (untracked / "meta.json").write_text(json.dumps(meta))
    return {"ckpt": trained_ckpt, "clap": clap, "index": index, "other_clap": _other_clap(clap, root / "other.ckpt"),
            "untracked": untracked}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, ctx: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES[name]
    argv = case.make(tmp_path, ctx)
    capsys.readouterr()
    assert main(argv) == case.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    command = " ".join(argv[:2]) if argv[0] in ("data", "index", "pipeline") else argv[0]
    if case.error_line:
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"tta {command}: error: "), err
        report = line
    else:
        report = out + err
    for text in case.names:
        assert text in report, (text, report)
    if not case.error_line:  # each problem reported once: the clip's detail line appears once
        detail = case.names[1]
        assert report.count(detail) == 1, report
    if case.out is not None:
        assert not (tmp_path / case.out).exists()


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["data", "check", str(tmp_path / "absent.jsonl")]
    for extra, env in ((["--debug"], None), ([], "1")):
        if env:
            monkeypatch.setenv("TTA_DEBUG", env)
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "FileNotFoundError" in err
        assert err.strip().splitlines()[-1] == f"tta data check: error: manifest not found: {tmp_path / 'absent.jsonl'}"


def test_unexpected_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from tta.utils.errors import EXIT_DATA, EXIT_USAGE, UsageError, exit_code, run_guarded

    def torch_error() -> int:
        import torch

        torch.zeros(2) @ torch.zeros(3)  # a RuntimeError inside torch: a bug, not the user's input
        return 0

    with pytest.raises(RuntimeError):
        run_guarded("x", torch_error)

    def numpy_value_error() -> int:
        np.zeros(2).reshape(3)  # a ValueError raised by numpy, not by tta: unexpected
        return 0

    with pytest.raises(ValueError):
        run_guarded("x", numpy_value_error)
    import tta

    def raised_in_tta(code: str) -> BaseException:  # an exception whose innermost frame is a tta module
        try:  # compiled under a tta file name: the innermost frame then counts as tta's own code
            exec(compile(code, str(Path(tta.__file__).parent / "cli.py"), "exec"), {})  # noqa: S102 (test input)
        except (KeyError, FileNotFoundError) as exc:
            return exc
        raise AssertionError(code)

    assert exit_code(raised_in_tta("{}['missing']")) is None  # a failed lookup in tta code is a bug
    assert exit_code(raised_in_tta("raise KeyError('unknown mel preset x')")) == EXIT_DATA
    assert exit_code(raised_in_tta("raise FileNotFoundError('no such file a.wav')")) == EXIT_USAGE
    assert exit_code(UsageError("--x must be ...")) == EXIT_USAGE
    assert exit_code(FileNotFoundError("nope")) is None  # never raised: no traceback frames to judge

    def tta_value_error() -> int:
        from tta.data.mel import MelConfig

        MelConfig.preset("demo", win_length=4096)  # tta refuses it by name
        return 0

    assert run_guarded("x", tta_value_error) == EXIT_DATA


def _vae_fit(tmp: Path, manifest: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "demo" / "vae.yaml"), f"--trainer.default_root_dir={tmp}",
            "--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
            '--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
            '"init_args": {"save_last": true, "dirpath": "' + str(tmp / "ck") + '"}}]',
            f"--data.init_args.manifest={manifest}", "--data.init_args.batch_size=2",
            "--data.init_args.segment_seconds=0.5", "--model.init_args.autoencoder.init_args.ch=8", *extra]


def test_stale_temporaries_removed_and_resume_with_other_model_arguments_refused(
        tiny_synth: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    """Row 9: a ``kill -9`` during a checkpoint write leaves ``.last.ckpt.<random>.tmp``; the next run removes it.
    Row 5: ``--ckpt_path`` with model arguments other than the checkpoint's is refused, both values shown."""
    ck = tmp_path / "ck"
    ck.mkdir()
    stale, other = ck / ".last.ckpt.k3x9q_1a.tmp", ck / "notes.tmp"
    stale.write_bytes(b"")
    other.write_text("not written by tta")
    with caplog.at_level("WARNING", logger="tta"):
        assert main(_vae_fit(tmp_path, tiny_synth)) == 0
    assert not stale.exists() and other.exists() and (ck / "last.ckpt").is_file()
    assert not [p for p in ck.iterdir() if p.name.startswith(".")]
    assert any(str(stale) in r.getMessage() and "interrupted" in r.getMessage() for r in caplog.records)
    last = ck / "last.ckpt"
    before = last.read_bytes()
    capsys.readouterr()
    assert main(_vae_fit(tmp_path, tiny_synth, f"--ckpt_path={last}", "--model.init_args.lr=0.01",
                         "--model.init_args.autoencoder.init_args.ch=4")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"tta fit: error: --ckpt_path {last} was trained with other model arguments: ")
    assert "model.init_args.autoencoder.init_args.ch: checkpoint 8, now 4" in line
    assert "model.init_args.lr: checkpoint 0.002, now 0.01" in line, line
    assert last.read_bytes() == before  # nothing written
    # the same arguments resume (max_steps already reached: nothing more to train)
    assert main(_vae_fit(tmp_path, tiny_synth, f"--ckpt_path={last}")) == 0


def test_generate_index_refuses_another_clap(ctx: dict) -> None:
    """Row 3: `tta generate --index` checks the index against the pipeline's own CLAP (text tower)."""
    from tta import load_pipeline
    from tta.pipelines.commands import check_index_clap
    from tta.retrieval.index import IndexMismatchError

    clap = load_pipeline(ctx["ckpt"], vocoder="griffinlim").generator.model.text.clap
    with pytest.raises(IndexMismatchError, match=r"built with another CLAP than the pipeline's CLAP: (audio|text) tower"):
        check_index_clap(ctx["index"], clap, "the pipeline's CLAP")
    with pytest.raises(IndexMismatchError, match="records no content hash.*'demo CLAP \\(untracked checkpoint\\)'"):
        check_index_clap(ctx["untracked"], clap, "the pipeline's CLAP")
    from tta.encoders.clap_towers import load_clap_network

    check_index_clap(ctx["index"], load_clap_network(ctx["clap"]), "the CLAP that built it")  # the same: accepted


def test_third_party_noise_is_filtered_unless_verbose(caplog: pytest.LogCaptureFixture) -> None:
    """Row 11: known third-party noise is dropped from the log, other warnings stay (WARNING), --verbose shows all."""
    import logging

    from tta.utils.logs import setup_logging

    noise = "The 'train_dataloader' does not have many workers which may be a bottleneck."
    lines = [("py.warnings", noise), ("py.warnings", "a real deprecation"),
             ("transformers.modeling_utils", "BertModel LOAD REPORT from: /x"), ("tta.data", "tta's own line")]
    try:
        for verbose, expected in ((False, ["a real deprecation", "tta's own line"]), (True, [m for _, m in lines])):
            setup_logging(verbose=verbose)
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                for name, message in lines:
                    logging.getLogger(name).warning(message)
            assert [r.getMessage() for r in caplog.records] == expected
        assert logging.getLogger("py.warnings").handlers or logging.getLogger().handlers
    finally:
        setup_logging(verbose=False)


def test_nonfinite_per_sample_losses_name_their_clips(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Row 2 (the base's part): the clips whose loss is NaN/Inf are named and recorded; the rest train."""
    import json
    from types import SimpleNamespace

    import torch

    from tta.training.base import TTAModule

    module = TTAModule(mel="demo")
    module._trainer = SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=True)  # a run's folder
    losses = torch.tensor([1.0, float("nan"), 3.0, float("inf")], requires_grad=True)
    with caplog.at_level("WARNING", logger="tta"):
        mean = module.finite_mean(losses, ["a", "b", "c", "d"])
    assert mean.item() == 2.0
    mean.backward()
    assert losses.grad.tolist() == [0.5, 0.0, 0.5, 0.0]  # only the finite clips get gradients
    assert "clip(s) b, d" in caplog.text and "2 of 4 clips still train" in caplog.text
    row = json.loads((tmp_path / "nonfinite.jsonl").read_text())
    assert row == {"batch": 0, "ids": ["b", "d"], "loss": ["nan", "inf"]}
    assert not torch.isfinite(module.finite_mean(torch.tensor([float("nan")]), ["e"]))  # all bad: the step is skipped
    assert len((tmp_path / "nonfinite.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="one loss per clip"):
        module.finite_mean(torch.zeros(3), ["a"])


def _tiny_fit(bar: object, max_steps: int = 5) -> None:
    """A 2-batch-per-epoch fit of a linear layer with ``max_epochs: -1``, stopped by ``max_steps``."""
    import lightning as L
    import torch

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            loss = self.lin(batch).pow(2).mean()
            self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=2)
    trainer = L.Trainer(max_epochs=-1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[bar], accelerator="cpu")
    trainer.fit(Tiny(), data)


def test_step_bounded_runs_show_steps_not_epoch_minus_two(caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Row 11: ``max_epochs: -1`` with ``max_steps: 5``: the plain log lines (output redirected) and the
    rich bar (a terminal) count steps; neither shows Lightning's ``Epoch 2/-2``."""
    import io
    import sys

    import rich

    from tta.cli import build_cli, default_progress
    from tta.training.callbacks import ProgressLog, StepProgressBar

    with caplog.at_level("INFO", logger="tta"):
        _tiny_fit(ProgressLog(every_seconds=0))  # a line per step (the CLI's default: every 30 s and the last)
    lines = [r.getMessage() for r in caplog.records if r.name == "tta.training.callbacks"]
    assert [line.split(":")[0] for line in lines] == [
        "step 1/5 (epoch 0, batch 1/2)", "step 2/5 (epoch 0, batch 2/2)", "step 3/5 (epoch 1, batch 1/2)",
        "step 4/5 (epoch 1, batch 2/2)", "step 5/5 (epoch 2, batch 1/2)"]
    assert "steps/s, eta " in lines[-1] and "; loss " in lines[-1]
    console = io.StringIO()
    try:
        _tiny_fit(StepProgressBar(console_kwargs={"file": console, "force_terminal": True, "width": 100}))
    finally:
        rich.reconfigure()  # the bar reconfigured the global console
    text = console.getvalue()
    assert "Epoch 2, step" in text and " 5/5 " in text, text[-400:]
    assert "/-2" not in text and "/-1" not in text
    assert isinstance(default_progress(interactive=True), StepProgressBar)
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # redirected output: `tta fit` logs its progress
    cli = build_cli(["--config", str(CONFIGS / "demo" / "vae.yaml"), f"--trainer.default_root_dir={tmp_path}"],
                    run=False)
    assert isinstance(cli.trainer.progress_bar_callback, ProgressLog)


def test_eval_pads_short_clips_when_asked(tmp_path: Path) -> None:
    """Row 1 for eval, the explicit option: ``--pad-short-clips`` zero-pads them (logged, recorded)."""
    import json

    assert main(_eval_short_clip(tmp_path, {}, "--pad-short-clips")) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["protocol"]["pad_short_clips"] is True
    assert set(report["per_item"]) == {"ok", "tiny"} and math.isfinite(report["metrics"]["psnr"])
