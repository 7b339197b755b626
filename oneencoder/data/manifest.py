"""JSONL manifests: one sample per line, with an ``id``, a ``split`` and modality fields.

Example line::

    {"id": "animals/mammals/badger", "image": "/usr/share/.../badger.png",
     "caption": "A badger.", "group": "3f2a...", "split": "train", ...}

The format is described in docs/manifest.md and, as a JSON Schema, in
``oneencoder/data/manifest.schema.json`` (see :func:`manifest_schema`). :func:`read_manifest`
checks every row against the same facts by hand (jsonschema is not a dependency) and
resolves relative file paths against the manifest's own folder; :func:`write_manifest`
writes paths relative to that folder when the file lies under it, else absolute.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from ..errors import OneEncoderError
from ..fileio import json_too_deep, not_utf8, too_deep_message, write_jsonl_atomic

SPLITS = ("train", "val", "test")
#: Manifest field whose normalised value defines caption groups and the fixed split.
CAPTION_FIELD = "caption"
#: Keys beginning with this are reserved for oneencoder's own bookkeeping.
RESERVED_PREFIX = "_"
SCHEMA_FILE = "manifest.schema.json"
#: Longest sample id, in UTF-8 bytes. The feature cache keys LMDB entries by ``<2-byte prefix><id>``
#: and LMDB refuses keys over 511 bytes; 500 leaves room. A longer id is a per-sample reject.
MAX_ID_BYTES = 500


def caption_key(caption: str) -> str:
    """Normalised caption: samples that share it are one group and share a split."""
    return caption.strip().lower()


def caption_bucket(caption: str) -> int:
    """Bucket 0-9 of the fixed caption-hash split (see docs/concepts.md)."""
    return int(hashlib.sha1(caption_key(caption).encode("utf-8")).hexdigest(), 16) % 10


def caption_split(caption: str) -> str:
    """test if bucket in {0, 1}, val if 2, else train. No test caption is ever trained on."""
    b = caption_bucket(caption)
    return "test" if b in (0, 1) else "val" if b == 2 else "train"


def caption_group(caption: str) -> str:
    """Group id of a caption: samples whose captions match after :func:`caption_key` share it."""
    return hashlib.sha1(caption_key(caption).encode("utf-8")).hexdigest()[:16]


class Manifest(list):
    """Rows of a manifest file (a plain ``list`` of dicts) that remember where the file lies.

    Attributes:
        path: The manifest file, as given.
        root: Absolute folder of the manifest; relative file paths were resolved against it.
    """

    def __init__(self, rows: Iterable[dict] = (), path: str | Path | None = None) -> None:
        super().__init__(rows)
        self.path = Path(path) if path is not None else None
        self.root = Path(os.path.abspath(path)).parent if path is not None else None


@functools.lru_cache(maxsize=1)
def manifest_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one manifest row, shipped as package data."""
    return json.loads(resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))


def _modality_fields() -> tuple[set[str], set[str]]:
    """``(record keys of every registered modality, those that hold file paths)``."""
    from ..modality import MODALITIES  # lazy: torch and the registry are not needed to split captions

    specs = [MODALITIES.get(n).spec for n in MODALITIES.names()]
    return {s.record_key for s in specs}, {s.record_key for s in specs if s.reads_files}


# ----- validation ---------------------------------------------------------------------------


def _preview(value: str, chars: int = 40) -> str:
    """``value`` for a message: its repr, cut to ``chars`` characters (an id may be kilobytes long)."""
    return repr(value) if len(value) <= chars else repr(value[:chars]) + f"... ({len(value)} characters)"


def lone_surrogate(value: str) -> bool:
    """Whether ``value`` holds a lone UTF-16 surrogate (``"\\udc80"``): not text, and not writable as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def id_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a sample id in the feature cache, as one phrase naming it, or None.

    Ids are LMDB keys: a non-empty string of at most :data:`MAX_ID_BYTES` UTF-8 bytes, which
    a lone surrogate cannot be encoded to.
    """
    if not isinstance(value, str) or not value:
        return f"id must be a non-empty string, got {json.dumps(value, default=str)[:80]}"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return (f"id {value[:80]!r} holds a lone surrogate "
                "(a \\ud800-\\udfff escape), which is not text; fix the id")
    if size > MAX_ID_BYTES:
        return (f"id {_preview(value)} is {size} bytes in UTF-8; ids are limited to {MAX_ID_BYTES} bytes "
                "(the feature cache's key size); shorten it")
    return None


def _surrogate_field(row: dict) -> str | None:
    """The first field (key) of ``row`` with a lone surrogate in its name or anywhere in its value."""
    for key, value in row.items():
        stack = [key, value]
        while stack:  # a loop, not recursion: the nesting depth was checked, but needs no stack here
            item = stack.pop()
            if isinstance(item, str):
                if lone_surrogate(item):
                    return key
            elif isinstance(item, list):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
    return None


_TYPE_WORDS = {"string": "a string", "null": "null", "array": "a list", "object": "an object",
               "number": "a number", "integer": "an integer", "boolean": "true or false"}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "null": type(None), "array": list, "object": dict,
                              "boolean": bool}[name])


def _describe(rule: dict[str, Any]) -> str:
    """Words for what ``rule`` (one schema property) accepts, e.g. "a non-empty string"."""
    if "enum" in rule:
        return "one of " + ", ".join(map(str, rule["enum"]))
    types = rule.get("type", [])
    words = []
    for t in [types] if isinstance(types, str) else types:
        word = _TYPE_WORDS[t]
        if t == "string" and rule.get("minLength"):
            word = "a non-empty string"
        if t == "array" and rule.get("items", {}).get("type") == "string":
            word = "a list of strings"
        words.append(word)
    return " or ".join(words)


def _accepts(rule: dict[str, Any], value: Any) -> bool:
    """Whether ``value`` meets ``rule``; only the keywords manifest.schema.json uses."""
    if "enum" in rule and value not in rule["enum"]:
        return False
    types = rule.get("type")
    if types is None:
        return True
    types = [types] if isinstance(types, str) else types
    if not any(_is_type(value, t) for t in types):
        return False
    if isinstance(value, str) and len(value) < rule.get("minLength", 0):
        return False
    if isinstance(value, list) and "items" in rule:
        return all(_accepts(rule["items"], v) for v in value)
    return True


def _rules() -> tuple[dict[str, dict], list[str], set[str]]:
    """``(field rules, required fields, file fields)``: the schema's, plus every registered modality's."""
    schema = manifest_schema()
    rules = dict(schema["properties"])
    record_keys, files = _modality_fields()
    for key in record_keys - set(rules):  # plugin modalities: a string (or a path), or null
        rules[key] = {"type": ["string", "null"]}
    return rules, list(schema.get("required", [])), files


def check_row(row: Any, rules: dict[str, dict] | None = None, required: list[str] | None = None,
              keyed: bool = True) -> tuple[str | None, str] | None:
    """What makes ``row`` an invalid manifest row: ``(field or None, one short phrase)``, or None.

    Args:
        row: One parsed JSON line.
        rules: Field rules (default: the schema's and the registered modalities').
        required: Required fields (default: the schema's).
        keyed: Also check that the id can key the feature cache (:func:`id_problem`). Reading a
            manifest does not: a too-long id is the one sample's reject in ``cache build``.
    """
    if rules is None or required is None:
        rules, required, _ = _rules()
    if not isinstance(row, dict):
        return None, f"each line must be a JSON object, got {type(row).__name__}"
    bad = _surrogate_field(row)  # first: a message quoting such a value could not be printed
    if bad is not None:
        return bad, (f"field {bad!r} holds a lone surrogate (a \\ud800-\\udfff escape), which is not text; "
                     "fix that escape")
    for key in required:
        if key not in row:
            return key, f"field {key!r} is missing"
    for key, value in row.items():
        if key.startswith(RESERVED_PREFIX):
            return key, f"field {key!r}: keys beginning with {RESERVED_PREFIX!r} are reserved for oneencoder"
        rule = rules.get(key)
        if rule is not None and not _accepts(rule, value):
            return key, f"field {key!r} must be {_describe(rule)}, got {json.dumps(value, ensure_ascii=False)[:80]}"
    if keyed:
        why = id_problem(row["id"]) if "id" in row else None
        if why:
            return "id", why
    return None


# ----- reading and writing -----------------------------------------------------------------


def _resolve(value: Any, root: Path) -> Any:
    if isinstance(value, str) and value and not os.path.isabs(value):
        return os.path.normpath(root / value)
    return value


def read_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest; every problem is one error naming file, line and field.

    Relative values of file fields (inputs of modalities that read files) are resolved
    against the manifest's own folder, so the manifest works from any current folder.
    A row without ``split`` is a training row (manifests written before splits were required).

    Raises:
        OneEncoderError: The file is missing or empty, or a line is not valid UTF-8, not
            valid JSON, not a valid row, or repeats an id.
    """
    path = Path(path)
    if not path.is_file():
        raise OneEncoderError(f"manifest not found: {path} (create one with `oneencoder data import` "
                              "or `oneencoder data tuxpaint`)")
    rules, required, files = _rules()
    rows, seen = Manifest(path=path), set()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a byte-order mark
            except UnicodeDecodeError as e:
                raise OneEncoderError(not_utf8(f"{path}:{lineno}", e)) from None
            if not line.strip():
                continue
            if json_too_deep(line) is not None:  # before json.loads, which would raise RecursionError
                raise OneEncoderError(f"{path}:{lineno}: {too_deep_message()}")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise OneEncoderError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            problem = check_row(row, rules, required, keyed=False)
            if problem:
                raise OneEncoderError(f"{path}:{lineno}: {problem[1]}")
            if row["id"] in seen:
                raise OneEncoderError(f"{path}:{lineno}: duplicate id {row['id']!r}")
            seen.add(row["id"])
            row.setdefault("split", "train")
            for key in files & row.keys():
                row[key] = _resolve(row[key], rows.root)
            rows.append(row)
    if not rows:
        raise OneEncoderError(f"manifest {path} has no samples")
    return rows


def _under(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def portable_path(value: Any, root: str | Path) -> Any:
    """A file path as a manifest in ``root`` stores it: relative (POSIX) when under ``root``, else absolute.

    Relative inputs are taken relative to the current folder; non-strings and "" pass through.
    """
    if not isinstance(value, str) or not value:
        return value
    absolute, root = os.path.abspath(value), os.path.abspath(root)
    return Path(os.path.relpath(absolute, root)).as_posix() if _under(absolute, root) else absolute


def write_manifest(path: str | Path, rows: list[dict]) -> Path:
    """Write ``rows`` atomically as a manifest whose file paths work from any folder.

    File paths under the manifest's folder are written relative to it (the folder can be
    moved as a whole); others are written absolute.
    """
    path = Path(path)
    _, files = _modality_fields()
    root = os.path.dirname(os.path.abspath(path))
    out = [{k: portable_path(v, root) if k in files else v for k, v in row.items()} for row in rows]
    write_jsonl_atomic(path, out)
    return path


def _relative_if_under(value: Any, root: str) -> Any:
    if isinstance(value, str) and os.path.isabs(value) and _under(value, root):
        return Path(os.path.relpath(value, root)).as_posix()
    return value  # byte-identical otherwise, so hashes of absolute manifests never move


def manifest_hash(rows: Iterable[dict]) -> str:
    """Content hash of a manifest, recorded in the model's stage history.

    For rows from :func:`read_manifest`, file paths under the manifest's folder are hashed
    relative to it: the hash is of the data, not of where the folder lies. Absolute paths
    elsewhere (e.g. ``/usr/share/tuxpaint/...``) are hashed as they are.
    """
    root = getattr(rows, "root", None)
    files = _modality_fields()[1] if root is not None else set()
    h = hashlib.sha256()
    for row in rows:
        if files & row.keys():
            row = {k: _relative_if_under(v, str(root)) if k in files else v for k, v in row.items()}
        h.update(json.dumps(row, sort_keys=True).encode("utf-8"))
    return h.hexdigest()
