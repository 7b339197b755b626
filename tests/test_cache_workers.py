"""DataLoader workers of ``cache build``: they die with their parent, and sensible defaults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from oneencoder.features.workers import default_workers, loader_options
from oneencoder.fileio import write_jsonl_atomic


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat and stat[1] != "Z" and int(stat[2]) == pid:
                out.append(int(entry.name))
    return out


def _stat(pid: int) -> list[str] | None:
    """``[comm, state, ppid, ...]`` of /proc/<pid>/stat, or None once the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return [raw[raw.index("(") + 1 : raw.rindex(")")], *raw[raw.rindex(")") + 2 :].split()]


def _stat_name(cmd: list[str]) -> str:
    """The ``comm`` the kernel shows for processes started by ``cmd`` (the interpreter's name, at most 15 bytes)."""
    return Path(cmd[0]).name[:15]


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] != "Z"  # a zombie has exited; only its parent's wait() is missing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_kill_9_of_cache_build_leaves_no_worker(small_records, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    write_jsonl_atomic(manifest, small_records)
    cmd = [sys.executable, "-m", "oneencoder.cli.main", "cache", "build", "--manifest", str(manifest),
           "--cache-dir", str(tmp_path / "cache"), "--workers", "2", "--batch-size", "4", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    build = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and build.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            workers = _children(build.pid)
        assert len(workers) == 2, (workers, build.poll(), build.stderr.read().decode() if build.poll() else "")
        build.send_signal(signal.SIGKILL)
        build.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [pid for pid in workers if _alive(pid)]
        assert not survivors, f"workers {survivors} outlived their killed parent"
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
        for pid in workers:  # only if the test failed: never leave them behind (now children of init)
            if _alive(pid) and _stat(pid)[0] == _stat_name(cmd):
                os.kill(pid, signal.SIGKILL)


def test_loader_options_and_default_workers() -> None:
    assert loader_options(0, "cpu") == {"num_workers": 0, "pin_memory": False}
    options = loader_options(2, "cpu")
    assert options["num_workers"] == 2 and options["worker_init_fn"].keywords == {"parent": os.getpid()}
    assert loader_options(2, "cuda")["pin_memory"] is True  # host->GPU copies overlap the forward
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_workers("cpu") == max(0, min(8, cores - torch.get_num_threads()))
    assert default_workers("cuda") == max(1, min(8, cores - 1))
