"""The demo's torch thread count: the usable cores not already busy."""

from __future__ import annotations

import pytest
import torch

from tta.utils.threads import choose_threads, set_threads


@pytest.mark.parametrize(("cores", "load", "expected"), [(2, 0.0, 2), (2, 1.2, 1), (2, 3.5, 1), (16, 4.4, 12), (1, 0.0, 1)])
def test_choose_threads_leaves_busy_cores_alone(cores: int, load: float, expected: int) -> None:
    assert choose_threads(cores, load) == expected


def test_set_threads_sets_torch_and_refuses_zero() -> None:
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads must be >= 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_busy_cores_is_a_share_of_the_machine() -> None:
    import os

    from tta.utils.threads import busy_cores

    assert 0.0 <= busy_cores(0.05) <= (os.cpu_count() or 1) + 1e-6
