"""One FAISS build at a time: the install, the extras, the conflict error, and the GPU search path."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tta.retrieval import faiss_build
from tta.retrieval.faiss_build import FaissInstallError, check_single_faiss, faiss_distributions
from tta.retrieval.index import IndexSpec, build_index

REPO = Path(__file__).resolve().parents[1]


def _vectors(n: int = 64, d: int = 16) -> tuple[np.ndarray, list[str]]:
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), [f"clip{i}" for i in range(n)]


def test_this_install_has_exactly_one_faiss_build() -> None:
    found = faiss_distributions()
    assert len(found) == 1 and found[0].split(" ")[0].startswith("faiss-"), found
    check_single_faiss()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_no_extra_installs_a_second_faiss_build() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = [r for r in project["dependencies"] if r.lower().startswith("faiss")]
    assert len(core) == 1 and core[0].startswith("faiss-cpu"), core
    for extra, requirements in project["optional-dependencies"].items():
        builds = [r for r in requirements if r.lower().startswith("faiss")]
        assert not builds, f"extra {extra!r} would install {builds} beside the core's {core[0]}"


def test_two_builds_are_named_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = {"faiss-cpu": "1.15.1", "faiss-gpu": "1.15.1"}
    monkeypatch.setattr(faiss_build.metadata, "packages_distributions", lambda: {"faiss": list(installed)})
    monkeypatch.setattr(faiss_build.metadata, "version", lambda name: installed[name])
    faiss_distributions.cache_clear()
    try:
        assert faiss_distributions() == ("faiss-cpu 1.15.1", "faiss-gpu 1.15.1")
        with pytest.raises(FaissInstallError, match=r"2 FAISS builds .*faiss-cpu 1\.15\.1, faiss-gpu 1\.15\.1.*"
                                                    r"pip uninstall -y faiss-cpu faiss-gpu && pip install faiss-gpu"):
            check_single_faiss()
        x, ids = _vectors()
        with pytest.raises(FaissInstallError):  # an index that may search on the GPU checks first
            build_index(x, ids, IndexSpec(type="flat", use_gpu=True))
        assert build_index(x, ids, IndexSpec(type="flat", use_gpu=False)).search_device == "cpu"
    finally:
        faiss_distributions.cache_clear()


@pytest.mark.cuda
def test_gpu_search_equals_cpu_search() -> None:
    import faiss
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if faiss.get_num_gpus() < 1:
        pytest.skip(f"the installed FAISS ({', '.join(faiss_distributions())}) has no GPU support: swap in "
                    "faiss-gpu as docs/retrieval.md (Install) says")
    x, ids = _vectors(n=2000, d=64)
    queries = x[:50] + 0.01 * np.random.default_rng(1).standard_normal((50, 64)).astype(np.float32)
    for spec in (IndexSpec(type="flat"), IndexSpec(type="ivf", nlist=16, nprobe=16)):
        gpu = build_index(x, ids, replace(spec, use_gpu=True))
        cpu = build_index(x, ids, replace(spec, use_gpu=False))
        assert (gpu.search_device, cpu.search_device) == ("gpu", "cpu"), spec.type
        (gpu_ids, gpu_scores), (cpu_ids, cpu_scores) = gpu.search(queries, 10), cpu.search(queries, 10)
        assert gpu_ids == cpu_ids, spec.type
        np.testing.assert_allclose(gpu_scores, cpu_scores, atol=1e-4)
