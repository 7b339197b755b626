"""A few worker processes for native work that may crash or hang: decoding, featurising, drawing.

``serve`` must go on answering while it reads a hostile input: a 120,000-atom SMILES once
segfaulted the whole server, and RDKit drew a 5,000-atom one for over 100 s while
``/health`` stood still. So every such job runs in one of a few *spawned* processes
(spawned, not forked: the server's threads and torch's thread pools do not survive a
fork). The caller waits at most ``timeout`` seconds, counting the wait for a free worker.
A worker that overruns is killed and replaced; one that dies (a segfault, the kernel's
out-of-memory killer) is replaced too. Either way only the job it was running fails,
with one line saying why, and the other workers go on.

Example:
    >>> pool = WorkerPool(2, init=setup, init_args=(options,))
    >>> pool.call(parse, "CCO", timeout=10)   # blocking; from async code: run_in_threadpool
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import threading
import time
from typing import Any, Callable, Sequence

from ...errors import OneEncoderError, SampleError

log = logging.getLogger("oneencoder.apps.serve")

#: Seconds a fresh worker may take to import its libraries before it is given up on.
START_TIMEOUT = 180.0


class WorkerError(OneEncoderError):
    """A job did not finish: it ran past its time, or its worker process died."""


class WorkerTimeout(WorkerError):
    """A job ran past its time limit (its worker was killed and replaced)."""


class WorkerCrash(WorkerError):
    """The worker process died while running a job (a segfault, out of memory)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _worker_main(conn: Any, init: Callable[..., None] | None, init_args: Sequence[Any]) -> None:
    """A worker's life: run ``init``, say ready, then answer ``(fn, args)`` jobs until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which stops its workers
    try:
        if init is not None:
            init(*init_args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which decides
        conn.send(("failed", _first_line(e)))
        return
    conn.send(("ready", None))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the server is gone
            return
        if job is None:
            return
        fn, args = job
        try:
            reply: tuple[str, Any] = ("ok", fn(*args))
        except SampleError as e:
            reply = ("sample", str(e))
        except OneEncoderError as e:
            reply = ("user", str(e))
        except Exception as e:  # noqa: BLE001 - a bug or a library's own error: one line to the parent
            reply = ("raised", _first_line(e))
        try:
            conn.send(reply)
        except Exception as e:  # noqa: BLE001 - a result that cannot be pickled
            conn.send(("raised", f"cannot send the result back ({_first_line(e)})"))


class _Slot:
    """One worker process and the pipe to it; used by one caller at a time (the pool sees to it)."""

    def __init__(self, ctx: Any, init: Callable[..., None] | None, init_args: Sequence[Any], name: str) -> None:
        self._ctx, self._init, self._init_args, self.name = ctx, init, tuple(init_args), name
        self.process: Any = None
        self.conn: Any = None
        self.ready = False

    def start(self) -> None:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker_main, args=(child, self._init, self._init_args),
                                    name=self.name, daemon=True)
        process.start()
        child.close()  # so a dead worker reads as EOF here
        self.process, self.conn, self.ready = process, parent, False

    def stop(self, kill: bool = False) -> None:
        """End the worker: ask it (``kill=False``), or kill it; either way reap it."""
        if self.process is None:
            return
        try:
            if not kill and self.process.is_alive():
                self.conn.send(None)
                self.process.join(2)
        except (OSError, ValueError):
            pass
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()
        self.process, self.conn, self.ready = None, None, False

    def _exit_reason(self) -> str:
        self.process.join(5)
        code = self.process.exitcode
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit status {code}"

    def _wait_ready(self) -> None:
        if self.ready:
            return
        if not self.conn.poll(START_TIMEOUT):
            self.stop(kill=True)
            raise WorkerError(f"a worker process did not start within {START_TIMEOUT:g} s")
        try:
            status, payload = self.conn.recv()
        except (EOFError, OSError):
            reason = self._exit_reason()
            self.stop(kill=True)
            raise WorkerError(f"a worker process died while starting ({reason})") from None
        if status != "ready":
            self.stop(kill=True)
            raise OneEncoderError(f"a worker process could not start: {payload}")
        self.ready = True

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float, limit: float) -> Any:
        """Run one job, waiting ``timeout`` s for it (``limit``: the caller's whole limit, for the message)."""
        if self.process is None or not self.process.is_alive():
            if self.process is not None:
                self.stop(kill=True)
            self.start()
        self._wait_ready()  # a fresh worker's imports do not count against the job's time
        self.conn.send((fn, args))
        if not self.conn.poll(max(0.0, timeout)):
            self.stop(kill=True)
            self.start()  # its replacement imports while the caller reads the message
            raise WorkerTimeout(f"it took over {limit:g} s, serve's limit per query; it was stopped")
        try:
            status, payload = self.conn.recv()
        except (EOFError, OSError):
            reason = self._exit_reason()
            self.stop(kill=True)
            self.start()
            raise WorkerCrash(f"it crashed the worker process reading it ({reason}); the server goes on") from None
        if status == "ok":
            return payload
        if status == "sample":
            raise SampleError(payload)
        if status == "user":
            raise OneEncoderError(payload)
        raise RuntimeError(payload)


class WorkerPool:
    """``size`` spawned worker processes; :meth:`call` runs one job in a free one, with a time limit.

    Args:
        size: Processes (jobs that can run at once).
        init: Run once in each new worker before its first job (module-level, picklable).
        init_args: Its arguments (pickled to every worker).
    """

    def __init__(self, size: int, init: Callable[..., None] | None = None, init_args: Sequence[Any] = ()) -> None:
        if size < 1:
            raise OneEncoderError(f"workers must be at least 1, got {size}")
        ctx = multiprocessing.get_context("spawn")
        self._slots = [_Slot(ctx, init, init_args, f"oneencoder-worker-{i}") for i in range(size)]
        self._free: queue.Queue[_Slot] = queue.Queue()
        self._closed = threading.Event()
        for slot in self._slots:
            slot.start()  # all import in parallel now, not at the first query
            self._free.put(slot)

    @property
    def size(self) -> int:
        return len(self._slots)

    def pids(self) -> list[int]:
        """Process ids of the live workers (for tests and logs)."""
        return [s.process.pid for s in self._slots if s.process is not None and s.process.is_alive()]

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
        """``fn(*args)`` in a worker; blocks at most ``timeout`` s (queueing for a free worker included).

        Raises:
            WorkerTimeout: it (or the wait for a worker) ran past ``timeout``; the worker was replaced.
            WorkerCrash: the worker died running it; it was replaced.
            SampleError, OneEncoderError: what ``fn`` raised; ``RuntimeError`` with one line for
                anything else.
        """
        if self._closed.is_set():
            raise WorkerError("the server is shutting down")
        deadline = time.monotonic() + timeout
        try:
            slot = self._free.get(timeout=max(0.0, timeout))
        except queue.Empty:
            raise WorkerTimeout(f"all {self.size} workers stayed busy for {timeout:g} s; try again") from None
        try:
            return slot.call(fn, args, deadline - time.monotonic(), timeout)
        finally:
            self._free.put(slot)

    def close(self) -> None:
        """Stop every worker: an idle one is asked to, a busy one is killed."""
        self._closed.set()
        idle = list(self._free.queue)
        for slot in self._slots:
            try:
                slot.stop(kill=slot not in idle)
            except Exception:  # noqa: BLE001 - closing must not raise
                log.exception("stopping %s", slot.name)
