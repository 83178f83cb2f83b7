"""The torch CPU thread count of a job, chosen from the cores it may use and the machine's load.

On a small CPU machine that is already busy, more torch threads than free cores make every
operator wait on the others (on a loaded 2-core machine two threads ran ~6x slower than one),
so the demo and the benches set the count deliberately instead of taking torch's default.
"""

from __future__ import annotations

import logging
import os
import time

import torch

__all__ = ["choose_threads", "set_threads"]

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def busy_cores(seconds: float = 0.5) -> float:
    """Cores' worth of CPU time other processes use now: ``/proc/stat`` sampled over ``seconds``
    (the 1-minute load average where there is no ``/proc``; it lags behind jobs that just ended)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    total = max(1, total1 - total0)
    return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / total)


def choose_threads(cores: int | None = None, load: float | None = None) -> int:
    """The usable cores not already busy (`busy_cores` unless ``load`` is given), at least 1."""
    cores = usable_cores() if cores is None else int(cores)
    if load is None:
        load = busy_cores()
    return max(1, min(cores, cores - round(load)))


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count (``None``: `choose_threads`); returns it."""
    n = choose_threads() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    log.info("torch threads: %d (%d usable cores; `--threads N` to choose)", n, usable_cores())
    return n
