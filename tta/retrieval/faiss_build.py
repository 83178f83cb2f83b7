"""Which FAISS build is installed, and a clear error when two are.

Every FAISS wheel on PyPI (``faiss-cpu``, ``faiss-gpu``, ``faiss-gpu-cu12``, ...) installs the same
top-level ``faiss`` package. pip does not know they conflict: with two installed, the files of the
one installed last are in place, ``pip uninstall`` of either removes files the other needs, and a
GPU build can be shadowed by the CPU one without a word (searches then run on the CPU).
``faiss-cpu`` is a core dependency of tta, so the GPU build is swapped in by hand
(docs/retrieval.md, Install); `check_single_faiss` names the conflict when the swap was incomplete.
"""

from __future__ import annotations

import functools
from importlib import metadata

from tta.utils.errors import TTAError

__all__ = ["FaissInstallError", "check_single_faiss", "faiss_distributions"]

SWAP = ("pip uninstall -y {names} && pip install faiss-gpu   (or faiss-cpu for the CPU build; "
        "see docs/retrieval.md, Install)")


class FaissInstallError(TTAError):
    """More than one installed distribution provides the ``faiss`` package."""


@functools.cache
def faiss_distributions() -> tuple[str, ...]:
    """``"name version"`` of every installed distribution that provides the top-level ``faiss``
    package (one on a sound install), sorted."""
    names = sorted(set(metadata.packages_distributions().get("faiss", [])), key=str.lower)
    return tuple(f"{name} {metadata.version(name)}" for name in names)


def check_single_faiss() -> None:
    """Raise `FaissInstallError` naming the distributions and the fix when several provide ``faiss``."""
    found = faiss_distributions()
    if len(found) > 1:
        names = " ".join(entry.split(" ")[0] for entry in found)
        raise FaissInstallError(
            f"{len(found)} FAISS builds are installed and share the `faiss` package: {', '.join(found)}. "
            "The files of the one installed last are in place (a GPU build may be hidden by the CPU one), and "
            f"uninstalling either breaks the other. Keep one: {SWAP.format(names=names)}")
