"""``tta serve``: a web page in front of one loaded pipeline (docs/serve.md).

`tta.serve.service` holds the pipeline, the lock that serializes generations, their progress and
their result files; `tta.serve.app` is the FastAPI application and its command line (it needs the
``serve`` extra). Nothing else in tta imports this package; the CLI calls `main`.
"""

from __future__ import annotations

import importlib.util

__all__ = ["SERVE_MODULES", "main"]

#: the import names of the ``serve`` extra's packages
SERVE_MODULES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}


def main(argv: list[str]) -> int:
    """``tta serve ...``; a `UsageError` naming the missing packages when the ``serve`` extra is not installed."""
    from tta.utils.errors import UsageError

    missing = [package for module, package in SERVE_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UsageError(f"tta serve needs the serve extra: pip install 'tta[serve]' (missing {', '.join(missing)})")
    from tta.serve.app import main as serve_main

    return serve_main(argv)
