"""DataLoader settings for feature extraction: how many decode workers, and workers that die with us.

A DataLoader worker blocked on a full pipe outlives a ``kill -9`` of its parent for minutes
(PyTorch's own watchdog only runs between batches), holding its copy of the parent's memory.
On Linux each worker asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from typing import Any

import torch

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(worker_id: int, parent: int) -> None:
    """``worker_init_fn``: SIGKILL this worker when ``parent`` exits (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl in this libc: keep PyTorch's own watchdog
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. under taskset or a cgroup cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(device: str | torch.device) -> int:
    """Decode workers for ``cache build`` when the user names none.

    On a GPU the backbone waits for decoding, so every core but the main process's decodes.
    On the CPU the backbone's intra-op threads already use every core; a worker then only
    preempts them, so decoding runs in the main process between forwards unless cores are
    left over (``benchmarks/bench_extract.py`` measures both on this machine).
    """
    cores = available_cores()
    if torch.device(device).type != "cpu":
        return max(1, min(8, cores - 1))
    return max(0, min(8, cores - torch.get_num_threads()))


def loader_options(num_workers: int, device: str | torch.device) -> dict[str, Any]:
    """Keyword arguments of ``DataLoader`` for a one-pass extraction with ``num_workers`` workers."""
    options: dict[str, Any] = {"num_workers": num_workers,
                               "pin_memory": torch.device(device).type == "cuda"}  # async host->GPU copies
    if num_workers > 0:
        options["worker_init_fn"] = functools.partial(die_with_parent, parent=os.getpid())
        options["prefetch_factor"] = 2  # batches in flight per worker: the backbone never waits on one
        # One pass over the data: persistent workers would only keep memory alive afterwards.
        options["persistent_workers"] = False
    return options
