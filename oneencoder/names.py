"""Names that become paths: stage, modality, index and run names, checked in one place.

A name from a stage file, an option or a model record may end up joined into a path
and, for runs, handed to ``shutil.rmtree``. So every such name goes through
:func:`safe_name`, and every folder that is about to be removed goes through
:func:`remove_tree_inside` (which uses :func:`path_inside`): ``..``, absolute paths,
separators, NUL and empty strings never reach the file system.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from .errors import ConfigError

# Letters, digits, '_', '-' and '.', starting with a letter or digit: a file name on every
# platform that cannot climb (no '/', '\\', leading '.', or '..').
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
MAX_NAME_CHARS = 100


def safe_name(value: Any, what: str) -> str:
    """``value`` if it is a safe single path component, else a one-line :class:`ConfigError`.

    Args:
        value: the name as given (any type: stage files can hold numbers or lists).
        what: how the user wrote it, for the message, e.g. ``"[stage] name"``.
    """
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, got {type(value).__name__} {_shown(value)}")
    if not _SAFE.fullmatch(value) or ".." in value or len(value) > MAX_NAME_CHARS:
        raise ConfigError(f"{what} = {_shown(value)} is not a safe name: use 1-{MAX_NAME_CHARS} letters, digits, "
                          f"'_', '-' or '.', starting with a letter or digit")
    return value


def _shown(value: Any) -> str:
    """``repr(value)``, cut short: a hostile name may be megabytes long, the message stays one line."""
    text = repr(value)
    return text if len(text) <= MAX_NAME_CHARS + 2 else text[:MAX_NAME_CHARS] + "..."


def path_inside(parent: str | Path, *parts: str) -> Path:
    """``parent/parts...`` after checking it lies strictly inside ``parent``.

    The folders on the way are resolved (a link among them that leads out is refused),
    but the last component is not: a link there is the entry itself, which
    :func:`remove_tree_inside` unlinks rather than follows.
    """
    where = repr("/".join(map(str, parts)))[: MAX_NAME_CHARS * 2]
    if any("\x00" in str(p) for p in parts):
        raise ConfigError(f"{where} under {parent} holds a NUL character; refusing to use it")
    try:
        root = Path(parent).resolve()
        lexical = root.joinpath(*parts)
        container = lexical.parent.resolve()
    except (ValueError, OSError) as e:  # NUL bytes, a loop of links
        raise ConfigError(f"{where} under {parent} is not a usable path ({e})") from None
    target = container / lexical.name
    if lexical.name in ("", ".", "..") or not (container == root or root in container.parents):
        raise ConfigError(f"{where} would leave {parent}; refusing to use it")
    return target


def remove_tree_inside(parent: str | Path, *parts: str) -> None:
    """Delete ``parent/parts...`` (a folder this command owns), only if it is provably inside ``parent``.

    A link is removed, never followed; a missing entry is not an error.
    """
    target = path_inside(parent, *parts)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
