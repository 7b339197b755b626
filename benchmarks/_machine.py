"""How busy other processes keep the CPUs while a benchmark runs (Linux ``/proc/stat``)."""

from __future__ import annotations

import os
import time


class OtherLoad:
    """CPU cores that *other* processes kept busy between ``start()`` and ``cores()`` (Linux /proc/stat)."""

    def start(self) -> "OtherLoad":
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy_seconds(), _own_cpu_seconds()
        return self

    def cores(self) -> float | None:
        busy = self._busy_seconds()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        return max(0.0, (busy - self.busy0) - (_own_cpu_seconds() - self.own0)) / max(wall, 1e-9)

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited (e.g. DataLoader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def load_note(label: str, cores: float | None) -> str:
    if cores is None:
        return ""
    note = f"other processes kept {cores:.2f} of {os.cpu_count()} cores busy {label}"
    if cores > 0.25:
        note += ("\nWARNING: other processes competed for the CPUs; torch threads then wait on each other and "
                 "the timings are unreliable; rerun on an idle machine")
    return note


def wait_for_quiet(limit_s: float, probe_s: float = 2.0, threshold: float = 0.25) -> float | None:
    """Wait (at most ``limit_s``) until other processes keep under ``threshold`` cores busy for ``probe_s``.

    Returns the last probe's load (None without /proc/stat). A shared machine's bursts then
    fall between the timed runs rather than inside them, without starving anyone else.
    """
    deadline = time.perf_counter() + limit_s
    while True:
        probe = OtherLoad().start()
        time.sleep(probe_s)
        cores = probe.cores()
        if cores is None or cores < threshold or time.perf_counter() >= deadline:
            return cores
