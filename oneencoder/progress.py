"""Progress bars and status lines: one switch for the whole toolkit.

On a terminal a bar is tqdm's usual one. Anywhere else (a pipe, a log file, CI) it
prints one plain line every ``interval`` seconds and one when it ends, and never a
carriage return, so ``oneencoder train 2>&1 | tee log`` stays readable.

Bars and status lines go to stderr; results go to stdout, so ``--json`` output pipes
cleanly. Switches (the CLI's ``--no-progress`` and ``--quiet`` set them for one command
through :func:`configure`; otherwise the environment gives them):

* ``ONEENCODER_PROGRESS=0``: no progress bars;
* ``ONEENCODER_QUIET=1``: no bars and no status lines (results and errors only);
* ``ONEENCODER_PROGRESS_INTERVAL``: seconds between plain lines (default 10).

Example:
    >>> from oneencoder.progress import progress_bar, status
    >>> with progress_bar(total=len(items), desc="encode", unit="item") as bar:
    ...     for batch in batches:
    ...         bar.update(len(batch))
    >>> status("resuming from step 40")
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Iterable, Optional, TextIO

from tqdm.autonotebook import tqdm as _auto_tqdm
from tqdm.std import tqdm as _terminal_tqdm

_DEFAULT_INTERVAL = 10.0


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value not in ("0", "false", "no", "off")


_switches: dict[str, Optional[bool]] = {"progress": None, "quiet": None}  # None: the environment decides


def configure(*, progress: Optional[bool] = None, quiet: Optional[bool] = None) -> None:
    """Turn progress bars and status lines on or off in this process (None: as the environment says)."""
    _switches.update(progress=progress, quiet=quiet)


def is_quiet() -> bool:
    quiet = _switches["quiet"]
    return _env_flag("ONEENCODER_QUIET", False) if quiet is None else quiet


def progress_allowed() -> bool:
    """Whether bars may be shown at all (neither ``--no-progress`` nor ``--quiet``)."""
    progress = _switches["progress"]
    return (_env_flag("ONEENCODER_PROGRESS", True) if progress is None else progress) and not is_quiet()


def _interval() -> float:
    try:
        value = float(os.environ.get("ONEENCODER_PROGRESS_INTERVAL", _DEFAULT_INTERVAL))
    except ValueError:
        return _DEFAULT_INTERVAL
    return value if math.isfinite(value) and value >= 0 else _DEFAULT_INTERVAL


def _on_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


class LogLinesBar(_terminal_tqdm):
    """A tqdm bar for logs: a whole line per report, at most one per interval, and a last one.

    tqdm redraws with ``\\r``; in a file each redraw would pile up on one line (a 180-step
    run wrote 362 of them). Here every report is its own line and nothing is ever erased.
    """

    def __init__(self, *args: Any, interval: float = _DEFAULT_INTERVAL, **kwargs: Any) -> None:
        self._interval = interval
        self._last_line_at = -math.inf
        self._shown: Optional[tuple] = None
        total = kwargs.get("total", len(args[0]) if args and hasattr(args[0], "__len__") else None)
        kwargs.setdefault("bar_format", "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, "
                          "{rate_fmt}{postfix}]" if total else "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]")
        super().__init__(*args, mininterval=0, miniters=1, **kwargs)

    def _line(self) -> None:
        self._shown = (self.n, self.postfix)
        self._last_line_at = time.monotonic()
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()

    def display(self, msg: Optional[str] = None, pos: Optional[int] = None) -> bool:
        if msg is None and time.monotonic() - self._last_line_at >= self._interval:
            self._line()
        return True

    def clear(self, nolock: bool = False) -> None:  # nothing is ever erased in a log
        pass

    def moveto(self, n: int) -> None:  # no cursor in a log
        pass

    def close(self) -> None:
        if getattr(self, "disable", True):
            return
        if self._shown != (self.n, self.postfix):
            self._line()  # where it ended, unless the last line already says so
        self.sp = None  # tqdm's close then writes no '\r' or '\n' of its own
        super().close()


def progress_bar(iterable: Optional[Iterable] = None, *, enabled: Optional[bool] = True,
                 file: Optional[TextIO] = None, **kwargs: Any) -> _terminal_tqdm:
    """A tqdm bar that follows the toolkit's switches and suits where it is written.

    Args:
        iterable: Optional iterable to wrap, as with ``tqdm(iterable)``.
        enabled: False: no bar. None: a bar only on a terminal (for quick calls whose
            bar would only clutter a log). True: a bar, as plain lines off a terminal.
        file: Stream to write to (default: stderr).
        **kwargs: tqdm's options (``total``, ``desc``, ``unit``, ``initial``...).

    Returns:
        A tqdm instance (a disabled one when bars are off), usable as a context manager.
    """
    stream = file if file is not None else sys.stderr
    terminal = _on_terminal(stream)
    show = progress_allowed() and enabled is not False and (enabled or terminal)
    if not show:
        return _terminal_tqdm(iterable, disable=True, **kwargs)
    if _auto_tqdm is not _terminal_tqdm:  # a Jupyter kernel: its widget bar
        return _auto_tqdm(iterable, file=file, **kwargs)
    if terminal:
        return _terminal_tqdm(iterable, file=stream, **kwargs)
    return LogLinesBar(iterable, file=stream, interval=_interval(), **kwargs)


def status(message: str) -> None:
    """A status line on stderr ("resuming from step 40"), unless quiet; it never breaks a bar."""
    if is_quiet():
        return
    _terminal_tqdm.write(message, file=sys.stderr)
