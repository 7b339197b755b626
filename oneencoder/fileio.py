"""Atomic file writes, hashing helpers, and one-line errors for storage that cannot be written."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, Iterator

from .errors import OneEncoderError, StorageError

#: Deepest nesting of JSON arrays and objects read from any file (manifests, tables, oneencoder.json):
#: checked before parsing, so a hostile file is one line, never Python's RecursionError.
MAX_JSON_DEPTH = 64
# A JSON string (escapes included) or one bracket: the tokens that decide the nesting depth.
_JSON_DEPTH_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')

#: errno values that mean "this location cannot take the write": the user's to fix, not a bug.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's io::Error ends (safetensors, tokenizers)


def storage_errno(exc: BaseException) -> int | None:
    """The storage errno behind ``exc`` (see ``STORAGE_ERRNOS``), or None if it is another failure.

    Besides ``OSError``, this reads the errno that libraries keep only in their message:
    safetensors (``... (os error 28)``) and LMDB (``mdb_txn_commit: Input/output error``).
    """
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in STORAGE_ERRNOS else None
    text = str(exc)
    match = _RUST_OS_ERROR.search(text)
    if match:
        code = int(match.group(1))
        return code if code in STORAGE_ERRNOS else None
    return next((code for code in sorted(STORAGE_ERRNOS) if os.strerror(code) in text), None)


def not_utf8(where: str, e: UnicodeDecodeError) -> str:
    """``<where>: not valid UTF-8 (byte 0xff at offset 3); save the file as UTF-8``."""
    return f"{where}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); save the file as UTF-8"


def json_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> int | None:
    """The 1-based line of ``text`` where JSON nesting first exceeds ``limit`` levels, or None.

    A linear scan with a counter, not a parser: it cannot overflow the stack however deep
    the text goes. Text with at most ``limit`` brackets is cleared without scanning.
    """
    if text.count("[") + text.count("{") <= limit:
        return None
    depth = 0
    for match in _JSON_DEPTH_TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > limit:
                return text.count("\n", 0, match.start()) + 1
        elif token in "]}":
            depth = max(depth - 1, 0)
    return None


def too_deep_message(limit: int = MAX_JSON_DEPTH) -> str:
    """The phrase every reader uses for JSON nested deeper than ``limit``."""
    return f"JSON nested deeper than {limit} levels of arrays/objects (the limit)"


def load_json_text(text: str, where: str) -> Any:
    """``json.loads(text)`` after the nesting check; a refusal is one ``OneEncoderError`` naming ``where``.

    Args:
        text: The file's text.
        where: The file, for the message (its line is added for a too-deep refusal).

    Raises:
        OneEncoderError: ``text`` nests deeper than :data:`MAX_JSON_DEPTH`.
        json.JSONDecodeError: ``text`` is not JSON (callers word that themselves).
    """
    line = json_too_deep(text)
    if line is not None:
        raise OneEncoderError(f"{where}:{line}: {too_deep_message()}")
    return json.loads(text)


def _no_space(path: Path) -> bool:
    """Whether the file system holding ``path`` is (nearly) full."""
    for folder in (path, *path.parents):
        if folder.exists():
            with contextlib.suppress(OSError):
                return shutil.disk_usage(folder).free < (1 << 20)
            return False
    return False


def storage_error(path: str | os.PathLike, exc: BaseException) -> StorageError:
    """One line saying why ``path`` cannot be written, for an ``exc`` with a ``storage_errno``.

    LMDB reports a full disk as a short write (EIO), so an EIO on a full file system is
    reported as no space left.
    """
    path = Path(path)
    code = storage_errno(exc)
    if code == errno.EIO and _no_space(path):
        code = errno.ENOSPC
    if code in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on" if code == errno.ENOSPC else "disk quota exceeded on"
        return StorageError(f"{why} {path}; free some space there or write elsewhere")
    if code == errno.EROFS:
        return StorageError(f"cannot write {path}: read-only file system; choose a writable location")
    if code in (errno.EACCES, errno.EPERM):
        return StorageError(f"cannot write {path}: permission denied")
    return StorageError(f"cannot write {path}: {os.strerror(code) if code else exc}")


def _target_of(exc: BaseException, path: Path) -> Path | None:
    """What a failed write of ``path`` should name: ``path`` (or the parent folder that could not
    be made), or None when ``exc`` is about another file (an input the writer was reading)."""
    name = getattr(exc, "filename", None)
    if not name:
        return path  # a failed write() on an open file, or a library's error without a file name
    named = Path(name)
    if named.parent == path.parent and named.name.startswith(f".{path.name}."):
        return path  # our own temporary file
    return named if named == path or named in path.parents else None


def _create_temp(path: Path) -> Path:
    """Create an empty temporary file next to ``path``, with the mode the umask allows.

    ``tempfile.mkstemp`` would make it 0600 whatever the umask, and the rename keeps that
    mode: a model directory shared with other users would be unreadable to them.
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it into place on success.

    A crash mid-write leaves the old file (or nothing), never a truncated one. The file
    gets the mode the umask allows (0644 under umask 022). A location that cannot be
    written (read-only, no permission, no space left) raises ``StorageError`` naming it.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temp(path)
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0666 less the umask
        yield tmp
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # a writer that made its own file (safetensors: 0600)
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        target = _target_of(e, path) if isinstance(e, Exception) and storage_errno(e) is not None else None
        if target is not None:
            raise storage_error(target, e) from None
        raise


def ensure_writable(path: str | os.PathLike) -> None:
    """Fail now, with one line, if the file ``path`` cannot be written (before the work that makes it).

    Creates the missing parent folders, as the write would, and a probe file that is removed.
    """
    path = Path(path)
    if path.is_dir():
        raise StorageError(f"cannot write {path}: it is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.unlink(_create_temp(path))
    except OSError as e:
        target = _target_of(e, path) or path
        if storage_errno(e) is not None:
            raise storage_error(target, e) from None
        if isinstance(e, (FileExistsError, NotADirectoryError)):
            raise StorageError(f"cannot write {path}: {target} is a file, not a folder") from None
        raise StorageError(f"cannot write {target}: {e.strerror}") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def jsonl_line(row: Any) -> str:
    """``row`` as one JSONL line: UTF-8 text as is, but ``\\u`` escapes for a string with a lone
    surrogate (e.g. a rejected id ``"\\udc80"``), which UTF-8 cannot hold."""
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(row)  # only such rows: every other line keeps its bytes
    return line + "\n"


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(jsonl_line(r) for r in rows))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one line; a line is written with a single write() so readers never see half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(jsonl_line(row))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
