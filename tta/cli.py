"""The ``tta`` command.

``tta fit|validate|test|predict`` are Lightning's CLI (config files, ``--print_config``); the
resolved config is stored in every checkpoint and components may be named by their registry
name (``class_path: vae`` or ``--model vae``). ``tta list``, ``tta data ...`` and ``tta demo``
are tta's own commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
USAGE = """usage: tta <command> [options]

commands:
  fit | validate | test | predict   Lightning CLI: tta fit --config configs/demo/vae.yaml
  list [KIND]                       registered components by kind
  data {synth,manifest,check}       datasets: synthetic data, manifests from public datasets, checks
  index {build,search}              FAISS index of CLAP embeddings; text queries
  generate PROMPT --pipeline DIR     text-to-audio generation: WAV + spectrogram PNG
  pipeline export CKPT --out DIR     a self-describing pipeline folder from a latent_diffusion checkpoint
  pipeline import-audioldm DIR --out DIR   a pipeline folder from a diffusers AudioLDM folder
  eval --generated X --reference Y  FAD, KL, IS, CLAP score, ... -> eval.json + eval.md
  demo [--out DIR]                  the end-to-end demo on the built-in synthetic data
  serve --pipeline DIR [--port N]   a web page that generates with a pipeline (extra: serve)

`tta <command> --help` for the options of a command. Anywhere on the line, --debug (or TTA_DEBUG=1)
shows the traceback of a refused input, --verbose shows every third-party warning and log line.
"""
#: options of every command, taken out of the line before the command sees it
GLOBAL_FLAGS = ("--debug", "--verbose")

_COMPONENT_FLAGS = ("--model", "--data")


def _resolve_component_arg(value: str) -> str:
    from tta.registry import resolve

    return resolve(value) if value and "." not in value and not value.startswith(("{", "[")) else value


def _resolve_inline(key: str, val: str) -> str:
    """Registry names in an override's value: ``--x.class_path=unet`` or an inline JSON/YAML
    dict/list (``--trainer.callbacks=[{"class_path": "eval_metrics", ...}]``)."""
    from tta.registry import resolve_config

    if key.endswith(".class_path"):
        return _resolve_component_arg(val)
    if val.lstrip().startswith(("{", "[")):
        try:
            data = yaml.safe_load(val)
        except yaml.YAMLError:
            return val  # not YAML after all: jsonargparse reports it
        resolved = resolve_config(data)
        return val if resolved == data else json.dumps(resolved)
    return val


def preprocess_args(argv: list[str]) -> list[str]:
    """Resolve registry names in config files, in ``--model``/``--data`` values and in inline
    overrides (``--a.class_path=NAME``, ``--a={"class_path": NAME, ...}`` or a list of those).

    Config files given with ``--config`` are read, their ``class_path`` names resolved, and passed
    on as YAML text (jsonargparse accepts both).
    """
    from tta.registry import resolve_config

    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, val = arg.partition("=")
        if key in ("--config", "-c") or key in _COMPONENT_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    out.append(arg)
                    break
                val = argv[i + 1]
                i += 1
            if key in _COMPONENT_FLAGS:
                val = _resolve_component_arg(val)
            else:
                path = Path(val)
                if not path.is_file():
                    raise FileNotFoundError(f"config file not found: {val}")
                data = yaml.safe_load(path.read_text())
                val = yaml.safe_dump(resolve_config(data) if data is not None else {}, sort_keys=False)
            out.extend([key, val])
        elif arg.startswith("--") and eq:
            out.append(f"{key}={_resolve_inline(key, val)}")
        elif arg.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            out.extend([arg, _resolve_inline(arg, argv[i + 1])])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def _make_cli_class() -> type:
    import lightning as L
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.cli import LightningCLI

    from tta.training.callbacks import AtomicCheckpointIO, ConfigInCheckpoint
    from tta.training.slurm import slurm_trainer_setup

    class TTACLI(LightningCLI):
        """LightningCLI with tta's defaults: atomic checkpoints loaded with ``weights_only``,
        the resolved config stored in every checkpoint, progress that reads right for step-bounded
        runs (`default_progress`), and ``fit --ckpt_path`` refused when the model arguments differ
        from the checkpoint's."""

        def _parse_ckpt_path(self) -> None:
            # Lightning would now overwrite the model arguments with the checkpoint's hyperparameters
            sub = self.config.get("subcommand")
            cfg = self.config.get(sub) if sub else None
            if sub == "fit" and cfg is not None and cfg.get("ckpt_path"):
                current = yaml.safe_load(self._parser(sub).dump(cfg, skip_none=False))
                check_resume_arguments(cfg["ckpt_path"], current.get("model"))
            super()._parse_ckpt_path()

        def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> L.Trainer:
            parser = self._parser(self.subcommand)
            cfg = self.config.get(str(self.subcommand), self.config)
            callbacks = list(callbacks) + [ConfigInCheckpoint(parser.dump(cfg, skip_none=False))]
            configured = config.get("callbacks") or []
            if config.get("enable_progress_bar", True) is not False and not any(
                isinstance(c, ProgressBar) for c in list(configured) + callbacks
            ):
                callbacks.append(default_progress())
            if not config.get("plugins"):
                config = {**config, "plugins": [AtomicCheckpointIO()]}
            config, callbacks = slurm_trainer_setup(config, callbacks)  # no-op outside SLURM
            return super()._instantiate_trainer(config, callbacks)

    return TTACLI


def default_progress(interactive: bool | None = None) -> Any:
    """The progress display `tta fit` adds when the config names none: on a terminal the rich bar
    (`StepProgressBar`: ``Epoch 6, step 120/500``), otherwise (output redirected: SLURM, CI) plain
    log lines (`ProgressLog`: ``step 120/500 (epoch 6, batch 3/20): ...``). ``interactive`` None:
    whether standard output is a terminal."""
    from tta.training.callbacks import ProgressLog, StepProgressBar

    if interactive is None:
        interactive = sys.stdout.isatty()
    return StepProgressBar() if interactive else ProgressLog()


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def check_resume_arguments(ckpt_path: str, model: dict[str, Any] | None) -> None:
    """Refuse (`UsageError`, every differing ``model.*`` argument with both values) to resume
    ``ckpt_path`` with model arguments other than the ones stored in it by `tta fit`: the
    checkpoint's weights and optimizer state would silently override them."""
    from tta.utils.errors import UsageError
    from tta.utils.weights import load_checkpoint

    if model is None or not Path(ckpt_path).is_file():
        return  # Lightning names a missing checkpoint itself
    stored_yaml = (load_checkpoint(ckpt_path).get("tta") or {}).get("config")
    if not stored_yaml:
        return  # not written by `tta fit`: nothing to compare
    stored = _flatten(yaml.safe_load(stored_yaml).get("model"), "model")
    given = _flatten(model, "model")
    differ = [k for k in sorted(set(stored) | set(given)) if stored.get(k) != given.get(k)]
    if differ:
        shown = "; ".join(f"{k}: checkpoint {stored.get(k)!r}, now {given.get(k)!r}" for k in differ[:8])
        more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
        raise UsageError(f"--ckpt_path {ckpt_path} was trained with other model arguments: {shown}{more}. Resume "
                         "with the checkpoint's arguments, or start a new run without --ckpt_path")


def build_cli(argv: list[str], run: bool = True) -> Any:
    """The Lightning CLI for ``argv`` (``["fit", "--config", ...]``, or no subcommand with
    ``run=False`` to only instantiate the model, datamodule and trainer)."""
    import warnings

    import lightning as L

    from tta.registry import load_builtin, load_plugins

    load_builtin()
    load_plugins()
    cli_cls = _make_cli_class()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return cli_cls(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=preprocess_args(argv),
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "yaml"},
        )


def run_lightning(argv: list[str]) -> int:
    """Run ``tta fit|validate|test|predict`` with ``argv`` (including the subcommand)."""
    build_cli(argv)
    return 0


def list_components(kind: str | None = None) -> int:
    """Print registered components as a table."""
    from rich.console import Console
    from rich.table import Table

    from tta.registry import class_path, components

    table = Table(title="tta components")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("class_path")
    for k, entries in components(kind).items():
        for name, cls in sorted(entries.items()):
            table.add_row(k, name, class_path(cls))
    Console().print(table)
    return 0


def _dispatch(cmd: str, rest: list[str], argv: list[str]) -> int:
    """Run command ``cmd`` with its arguments ``rest`` (``argv``: the whole line after ``tta``)."""
    if cmd in LIGHTNING_COMMANDS:
        return run_lightning(argv)
    if cmd == "list":
        return list_components(rest[0] if rest else None)
    if cmd == "data":
        from tta.data.commands import main as data_main

        return data_main(rest)
    if cmd == "index":
        from tta.retrieval.commands import main as index_main

        return index_main(rest)
    if cmd == "generate":
        from tta.pipelines.commands import main as generate_main

        return generate_main(rest)
    if cmd == "pipeline":
        if not rest or rest[0] not in ("export", "import-audioldm"):
            sys.stderr.write("usage: tta pipeline export CHECKPOINT --out DIR [--vocoder universal]\n"
                             "       tta pipeline import-audioldm DIFFUSERS_FOLDER --out DIR\n")
            return 2
        from tta.pipelines.commands import export_main, import_audioldm_main

        return (export_main if rest[0] == "export" else import_audioldm_main)(rest[1:])
    if cmd == "eval":
        from tta.evaluation.commands import main as eval_main

        return eval_main(rest)
    if cmd == "demo":
        from tta.demo import main as demo_main

        return demo_main(rest)
    if cmd == "serve":
        from tta.serve import main as serve_main

        return serve_main(rest)
    sys.stderr.write(f"tta: unknown command {cmd!r}\n\n{USAGE}")
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tta`` console script: a refused input (`tta.utils.errors`) prints one
    line ``tta <command>: error: <message>`` and exits 2 (usage) or 1 (data); ``--debug`` or
    ``TTA_DEBUG=1`` adds its traceback; unexpected exceptions keep theirs."""
    from tta.utils.errors import debug_enabled, debug_mode, run_guarded
    from tta.utils.logs import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    debug, verbose = "--debug" in argv, "--verbose" in argv
    argv = [a for a in argv if a not in GLOBAL_FLAGS]
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    setup_logging(verbose=verbose)
    cmd, rest = argv[0], argv[1:]
    name = f"{cmd} {rest[0]}" if cmd in ("data", "index", "pipeline") and rest and not rest[0].startswith("-") else cmd
    with debug_mode(debug or debug_enabled()):
        return run_guarded(name, lambda: _dispatch(cmd, rest, argv))


if __name__ == "__main__":
    sys.exit(main())
