"""Logging for the ``tta`` command: tta's lines on stderr, third-party warnings through `logging`.

`setup_logging` gives the ``tta`` logger a handler, routes Python warnings (``warnings.warn``
from Lightning, torch, transformers, ...) to the ``py.warnings`` logger at WARNING, and, unless
``verbose``, drops the known third-party noise listed in `NOISE` (one ``(logger, substring)``
pair per kind of line), so a log redirected to a file (SLURM, CI) keeps tta's own lines readable.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["NOISE", "NoiseFilter", "setup_logging"]

_FORMAT = "%(levelname)s %(name)s: %(message)s"

#: (logger name, substring of the message) of third-party lines hidden without ``--verbose``
NOISE: tuple[tuple[str, str], ...] = (
    ("transformers.modeling_utils", "LOAD REPORT"),
    ("transformers.utils.loading_report", "LOAD REPORT"),
    ("lightning.pytorch.utilities.rank_zero", "Tip:"),
    ("lightning.pytorch.utilities.rank_zero", "available: "),  # GPU / TPU / HPU available: ...
    ("lightning.fabric.utilities.rank_zero", "available: "),
    ("py.warnings", "does not have many workers"),
    ("py.warnings", "persistent_workers"),
    ("py.warnings", "LightningCLI's args parameter"),
    ("py.warnings", "The number of training batches"),
    ("py.warnings", "is smaller than the logging interval"),
    ("py.warnings", "torch.cuda.amp"),
)


class NoiseFilter(logging.Filter):
    """Drops records whose message contains one of ``substrings``."""

    def __init__(self, substrings: list[str]) -> None:
        super().__init__()
        self.substrings = list(substrings)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(s in message for s in self.substrings)


def _install_filters() -> None:
    by_logger: dict[str, list[str]] = {}
    for name, text in NOISE:
        by_logger.setdefault(name, []).append(text)
    for name, texts in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, NoiseFilter) for f in logger.filters):
            logger.addFilter(NoiseFilter(texts))


def _remove_filters() -> None:
    for name in {name for name, _ in NOISE}:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, NoiseFilter)]:
            logger.removeFilter(f)


def setup_logging(level: int = logging.INFO, verbose: bool = False) -> None:
    """Log tta's messages to stderr (Lightning configures its own loggers); Python warnings go to
    the ``py.warnings`` logger (WARNING) on the same handler; known noise is dropped unless ``verbose``."""
    logger = logging.getLogger("tta")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG if verbose else level)
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    if not warnings_logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        warnings_logger.addHandler(handler)
    if verbose:
        _remove_filters()
    else:
        _install_filters()
        if not sys.stderr.isatty():  # progress bars in a log file are noise (read when huggingface_hub loads)
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
