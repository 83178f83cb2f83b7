"""Checkpoints: atomic writes, weights-only loading, refusal of code-running pickles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tta.training.callbacks import AtomicCheckpointIO
from tta.utils.weights import UnsafeCheckpointError, atomic_save, load_checkpoint


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_code_running_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Evil()}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt"):
        load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_atomic_save_round_trip_and_no_temp_files(tmp_path: Path) -> None:
    state = {"w": torch.arange(4.0), "meta": {"step": 3}}
    path = atomic_save(state, tmp_path / "sub" / "a.ckpt")
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["w"], state["w"]) and loaded["meta"] == {"step": 3}
    assert [p.name for p in path.parent.iterdir()] == ["a.ckpt"]


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    path = atomic_save({"v": torch.tensor(1)}, tmp_path / "c.ckpt")
    with pytest.raises(Exception):
        AtomicCheckpointIO().save_checkpoint({"v": torch.tensor(2), "bad": lambda: None}, path)
    assert int(load_checkpoint(path)["v"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]


def test_safetensors_and_missing_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, tmp_path / "m.safetensors")
    assert torch.equal(load_checkpoint(tmp_path / "m.safetensors")["x"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        load_checkpoint(tmp_path / "nothing.ckpt")
