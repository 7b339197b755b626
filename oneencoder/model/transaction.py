"""Several files of one directory replaced as one unit: a reader sees all old or all new.

A model-directory update rewrites ``oneencoder.json`` and one or more weights files.
Each file alone is replaced atomically (``fileio.atomic_path``), but a kill between two
of them would leave new weights under an old checksum record. So an update runs in
three phases, the way a write-ahead journal does:

1. every new file is written beside its target as ``<name>.next``;
2. the journal ``.commit.json`` naming them is written atomically: the commit point;
3. each ``.next`` replaces its target, then the journal is removed.

A kill before the commit point leaves ``.next`` files without a journal, and
:func:`recover` deletes them: the old version stands. A kill after it leaves the journal,
and :func:`recover` finishes the replacements: the new version stands. Readers that
may not write (another user, a read-only copy) call :func:`visible_path`, which reads
through an unfinished commit to the new files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from ..fileio import atomic_path, write_json_atomic
from ..names import path_inside

JOURNAL = ".commit.json"
PENDING = ".next"


def _pending(directory: Path, rel: str) -> Path:
    return directory / (rel + PENDING)


def _journal_files(directory: Path) -> list[str] | None:
    path = directory / JOURNAL
    try:
        files = list(json.loads(path.read_text(encoding="utf-8"))["files"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, RecursionError):
        return []  # a journal is written atomically; an unreadable one was never a commit
    # We only ever name files inside the directory: a journal naming one outside (an edited
    # or hostile model directory) was never ours, and nothing it names is moved.
    try:
        for rel in files:
            if not isinstance(rel, str):
                return []
            path_inside(directory, *rel.split("/"))
    except ConfigError:
        return []
    return files


def _roll_forward(directory: Path, files: list[str]) -> None:
    for rel in files:
        pending = _pending(directory, rel)
        if pending.exists():
            os.replace(pending, directory / rel)
    (directory / JOURNAL).unlink(missing_ok=True)


def recover(directory: str | Path) -> str | None:
    """Finish or undo an update a kill interrupted; returns ``"finished"``, ``"undone"`` or None."""
    directory = Path(directory)
    files = _journal_files(directory)
    if files is not None:
        _roll_forward(directory, files)
        return "finished"
    stale = [*directory.glob(f"*{PENDING}"), *directory.glob(f"*/*{PENDING}")]
    for path in stale:
        path.unlink(missing_ok=True)
    return "undone" if stale else None


def commit(directory: str | Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write each ``rel -> writer(tmp_path)`` and make them visible together.

    Args:
        directory: The directory the files live in (created if missing).
        writers: Relative path -> a function that writes that file's new content to the path it gets.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    recover(directory)
    for rel, write in writers.items():
        pending = _pending(directory, rel)
        pending.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(pending) as tmp:
            write(tmp)
    write_json_atomic(directory / JOURNAL, {"files": list(writers)})
    _roll_forward(directory, list(writers))


def visible_path(directory: str | Path, rel: str) -> Path:
    """Where ``rel`` is read now: its pending version while a committed update is being applied."""
    directory = Path(directory)
    if (directory / JOURNAL).exists():
        pending = _pending(directory, rel)
        if pending.exists():
            return pending
    return directory / rel
