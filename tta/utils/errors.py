"""The CLI's error boundary: which exceptions are the user's, and the one line they print.

An exception is *the user's* (bad arguments, bad files, incompatible artefacts) when

- it is a `TTAError`, or one of tta's typed errors listed in `TYPED_ERRORS` (they predate
  `TTAError` and keep their builtin bases), anywhere it is raised; or
- it is a builtin `FileNotFoundError`, `ValueError` or `KeyError` raised by tta's own code: the
  innermost frame of its traceback is a module of the ``tta`` package (tta raises these with a
  message naming the file, field or argument). A `KeyError` must carry a sentence (a message with a
  space), so a failed ``mapping[key]`` lookup, a bug, keeps its traceback.

Everything else (an error inside torch, numpy, Lightning, ...) is unexpected and keeps its
traceback. `UsageError` and `FileNotFoundError` (a path that does not exist) exit with
`EXIT_USAGE` (2), every other user error with `EXIT_DATA` (1).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["EXIT_DATA", "EXIT_USAGE", "TYPED_ERRORS", "TTAError", "UsageError", "check_float", "check_int",
           "debug_enabled", "debug_mode", "exit_code", "one_line", "run_guarded"]

log = logging.getLogger(__name__)

EXIT_DATA = 1
EXIT_USAGE = 2
_PACKAGE = Path(__file__).resolve().parents[1]

#: tta's typed errors defined before `TTAError` (module and class name: nothing is imported to check)
TYPED_ERRORS = frozenset({
    "tta.data.audio.AudioLoadError", "tta.data.adapters.MetadataError", "tta.data.manifest.ManifestError",
    "tta.data.mel.MelMismatchError", "tta.data.datamodule.TooManyBadClipsError",
    "tta.evaluation.clips.SilentGenerationError", "tta.training.base.NonFiniteLossError",
    "tta.training.loading.CheckpointConfigError", "tta.generators.conditioning.base.MissingInputError",
    "tta.metrics.pairing.IdMismatchError", "tta.metrics.yamnet.YAMNetUnavailableError",
    "tta.pipelines.guard.BrokenOutputError", "tta.retrieval.leakage.DatastoreLeakError",
    "tta.retrieval.features.MissingFeaturesError", "tta.retrieval.index.IndexMismatchError",
    "tta.retrieval.features_write.FeatureStoreMismatchError", "tta.registry.UnknownComponentError",
    "tta.vocoders.hifigan.importers.VocoderWeightsNotFoundError", "tta.encoders.clap.text_only.NoAudioTowerError",
    "tta.encoders.text_hf.HFFolderError", "tta.utils.weights.UnsafeCheckpointError",
    "tta.utils.weights.WeightMismatchError",
})  # fmt: skip
_USAGE_TYPED = frozenset({"tta.registry.UnknownComponentError"})


class TTAError(Exception):
    """Base of tta's errors about the user's input (printed as one line by the CLI)."""


class UsageError(TTAError, ValueError):
    """A command-line option or API argument is invalid; the message names it."""


def _names(exc: BaseException) -> set[str]:
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in type(exc).__mro__}


def _raised_in_tta(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    try:
        return Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)
    except OSError:
        return False


def exit_code(exc: BaseException) -> int | None:
    """The exit status of a user error (`EXIT_USAGE` / `EXIT_DATA`); None for an unexpected exception."""
    names = _names(exc)
    if isinstance(exc, UsageError) or names & _USAGE_TYPED:
        return EXIT_USAGE
    typed = isinstance(exc, TTAError) or bool(names & TYPED_ERRORS)
    if not typed and isinstance(exc, (FileNotFoundError, ValueError, KeyError)) and _raised_in_tta(exc):
        typed = not isinstance(exc, KeyError) or (len(exc.args) == 1 and " " in str(exc.args[0]))
    if not typed:
        return None
    return EXIT_USAGE if isinstance(exc, FileNotFoundError) else EXIT_DATA


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a KeyError's message without its quotes)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
    return " ".join(text.split()) or type(exc).__name__


_DEBUG: contextvars.ContextVar[bool] = contextvars.ContextVar("tta_debug", default=False)


def debug_enabled() -> bool:
    """True inside `debug_mode` (``tta --debug``) or when ``TTA_DEBUG`` is set to something other than ``""`` / ``0``."""
    return _DEBUG.get() or os.environ.get("TTA_DEBUG", "") not in ("", "0")


@contextlib.contextmanager
def debug_mode(enabled: bool = True) -> Iterator[None]:
    """Within the block, `run_guarded` also prints the traceback of a refused input."""
    token = _DEBUG.set(enabled)
    try:
        yield
    finally:
        _DEBUG.reset(token)


def run_guarded(command: str, fn: Callable[[], int], debug: bool | None = None) -> int:
    """Run ``fn`` (a command returning its exit status); a user error prints
    ``tta <command>: error: <message>`` to stderr (and its traceback when ``debug``, default
    `debug_enabled`) and returns its exit code. Unexpected exceptions propagate."""
    try:
        return fn()
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        if debug_enabled() if debug is None else debug:
            traceback.print_exception(exc, file=sys.stderr)
        sys.stderr.write(f"tta {command}: error: {one_line(exc)}\n")
        sys.stderr.flush()
        return code


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, or `UsageError` naming ``name`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None,
                low_open: bool = False, what_high: str = "") -> float:
    """``value`` as a finite float in [low, high] (``(low, high]`` with ``low_open``), or
    `UsageError` naming ``name`` (and ``what_high``, what sets the upper bound)."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if low is not None and (value <= low if low_open else value < low):
        raise UsageError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and value > high:
        bound = f" ({what_high})" if what_high else ""
        raise UsageError(f"{name} must be <= {high:g}{bound}, got {value:g}")
    return value
