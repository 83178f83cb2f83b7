"""Shared fixtures: an isolated cache directory and tiny data/model builders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tta" / "configs"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never write synthetic data or caches into the user's home during tests."""
    monkeypatch.setenv("TTA_CACHE", str(tmp_path_factory.getbasetemp() / "tta_cache"))


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One intra-op thread: faster for tiny networks and immune to a loaded machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset at the demo preset's 22.05 kHz (manifest path)."""
    from tta.data.synth import ensure_synth

    return ensure_synth(tmp_path_factory.mktemp("synth"), n=40, seed=0, sample_rate=22050, duration=1.0)
