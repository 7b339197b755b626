"""Import a table of samples (CSV, TSV or JSONL) as a checked manifest.

Columns are mapped to modalities (``image=path`` puts the ``path`` column in the image
modality's manifest field); relative paths are resolved against the table's own folder.
Every file is checked (it exists, can be read, and the modality's own ``load`` decodes
it); a row that fails any check goes to ``<out stem>.rejects.jsonl`` with its line and
reason, and the import goes on with the good rows. Every row gets a stable id, a group
and a split, so reruns give the same manifest.

Example:
    >>> report = import_table("pairs.csv", "data/manifest.jsonl", ["image=path", "text=caption"])
    >>> print(report.summary())
    wrote data/manifest.jsonl: 120 samples (train 84, val 12, test 24), 3 rejected (see ...)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..progress import progress_bar

from ..errors import ConfigError, OneEncoderError, SampleError
from ..fileio import json_too_deep, too_deep_message, write_jsonl_atomic
from ..modality import MODALITIES
from .manifest import CAPTION_FIELD, SPLITS, caption_group, caption_split, check_row, write_manifest

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
#: Shares of the default split when there is no caption to split by (as the caption-hash split).
DEFAULT_VAL, DEFAULT_TEST = 0.1, 0.2
_MANIFEST_FIELDS = ("id", "split", "group", "heldout")
#: Longest table cell (characters) imported; a row with a longer one is rejected. As Python's
#: csv module's default limit, which would otherwise stop the whole import at such a cell.
MAX_CELL_CHARS = 131_072


@dataclass
class ImportReport:
    """What an import wrote.

    Attributes:
        manifest: The manifest file.
        rejects_path: The rejects file (written even when empty, so no stale one is left).
        samples: Manifest rows as written (file paths absolute here).
        rejects: ``{"line", "id", "field", "reason"}`` per rejected row.
        straddling: Groups whose samples lie in more than one split (only with a split column).
        notes: One-line remarks for the user (e.g. an unused column named like a manifest field).
    """

    manifest: Path
    rejects_path: Path
    samples: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    straddling: int = 0
    notes: list[str] = field(default_factory=list)

    def split_counts(self) -> dict[str, int]:
        counts = Counter(r["split"] for r in self.samples)
        return {s: counts.get(s, 0) for s in SPLITS}

    def summary(self) -> str:
        """One line, e.g. ``wrote m.jsonl: 120 samples (train 84, val 12, test 24), 3 rejected (see ...)``."""
        splits = ", ".join(f"{s} {n}" for s, n in self.split_counts().items())
        line = f"wrote {self.manifest}: {len(self.samples)} samples ({splits}), {len(self.rejects)} rejected"
        return line + (f" (see {self.rejects_path})" if self.rejects else "")


@dataclass
class _Row:
    line: int
    values: dict[str, Any]
    problem: tuple[str | None, str] | None = None  # (column, reason) of a row that cannot be parsed


def rejects_path_for(out: str | Path) -> Path:
    """``manifest.jsonl`` -> ``manifest.rejects.jsonl`` (same folder)."""
    out = Path(out)
    return out.with_name(f"{out.stem if out.suffix else out.name}.rejects.jsonl")


def parse_mapping(items: Sequence[str]) -> dict[str, str]:
    """``["image=path", "text=caption"]`` -> ``{"image": "path", "text": "caption"}``.

    Raises:
        ConfigError: No item, an item that is not ``MODALITY=COLUMN``, an unknown modality,
            or a modality (or manifest field) mapped twice.
    """
    if not items:
        raise ConfigError("give at least one --map MODALITY=COLUMN, one per modality; modalities: "
                          f"{', '.join(MODALITIES.names())}")
    mapping: dict[str, str] = {}
    keys: dict[str, str] = {}
    for item in items:
        name, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not name or not column:
            raise ConfigError(f"--map {item!r}: expected MODALITY=COLUMN (a modality name, '=', a column of "
                              "the table)")
        if name not in MODALITIES:
            raise ConfigError(f"--map {item!r}: unknown modality {name!r}; registered: "
                              f"{', '.join(MODALITIES.names())}")
        if name in mapping:
            raise ConfigError(f"--map {item!r}: modality {name!r} is already mapped to column {mapping[name]!r}")
        key = MODALITIES.get(name).spec.record_key
        if key in keys:
            raise ConfigError(f"--map {item!r}: modalities {keys[key]!r} and {name!r} share the field {key!r}")
        mapping[name], keys[key] = column, name
    return mapping


def fraction_split(group: str, val: float, test: float) -> str:
    """Split of a group from a stable hash: test with probability ``test``, val with ``val``."""
    u = int(hashlib.sha1(f"split|{group}".encode("utf-8")).hexdigest()[:13], 16) / 16**13
    return "test" if u < test else "val" if u < test + val else "train"


# ----- reading tables ------------------------------------------------------------------------


def _bad_utf8(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes stand for bytes that are not UTF-8
        return True
    return False


def read_table(path: Path, fmt: str) -> tuple[list[str], list[_Row]]:
    """Column names and rows; rows that cannot be parsed carry a ``problem`` instead of aborting."""
    try:
        content = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    except OSError as e:
        raise OneEncoderError(f"cannot read {path}: {e.strerror or e}") from None
    if fmt == "jsonl":
        return _read_jsonl(content)
    # csv's own field limit raises mid-file and would end the import; no cell can exceed the whole
    # file, and our MAX_CELL_CHARS turns a long one into that row's reject (see _record).
    limit = csv.field_size_limit(max(len(content) + 1, csv.field_size_limit()))
    try:
        return _read_csv(path, content, fmt)
    finally:
        csv.field_size_limit(limit)


def _read_csv(path: Path, content: str, fmt: str) -> tuple[list[str], list[_Row]]:
    reader = csv.reader(io.StringIO(content, newline=""), delimiter="\t" if fmt == "tsv" else ",")
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise OneEncoderError(f"{path} is empty; the first line must name the columns") from None
    except csv.Error as e:
        raise OneEncoderError(f"{path}:1: cannot parse the header ({e})") from None
    if any(_bad_utf8(name) for name in header):
        raise OneEncoderError(f"{path}:1: the header is not valid UTF-8; save the file as UTF-8")
    dupes = sorted(n for n, c in Counter(header).items() if c > 1)
    if dupes:
        raise OneEncoderError(f"{path}:1: duplicate column name(s) {dupes}")
    rows, previous = [], reader.line_num
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise OneEncoderError(f"{path}:{reader.line_num}: cannot parse this line ({e})") from None
        line, previous = previous + 1, reader.line_num
        if not cells or all(not c.strip() for c in cells):
            continue
        row = _Row(line, dict(zip(header, cells)))
        if len(cells) != len(header):
            row.problem = (None, f"{len(cells)} values, but the header names {len(header)} columns")
        rows.append(row)
    return header, rows


def _read_jsonl(content: str) -> tuple[list[str], list[_Row]]:
    columns: dict[str, None] = {}
    rows = []
    for line, raw in enumerate(content.splitlines(), 1):
        if not raw.strip():
            continue
        if json_too_deep(raw) is not None:  # before json.loads, which would raise RecursionError
            rows.append(_Row(line, {}, (None, too_deep_message())))
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            rows.append(_Row(line, {}, (None, f"not valid JSON ({e.msg})")))
            continue
        if not isinstance(obj, dict):
            rows.append(_Row(line, {}, (None, f"not a JSON object ({type(obj).__name__})")))
            continue
        columns.update(dict.fromkeys(obj))
        rows.append(_Row(line, obj))
    return list(columns), rows


# ----- one row ---------------------------------------------------------------------------------


def _cell(value: Any) -> Any:
    """A table value as a manifest value: strings stripped, "" -> None, numbers -> strings."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def check_file(modality: str, path: str, loader: Any) -> str | None:
    """Why ``path`` is no good input of ``modality``, or None."""
    if not os.path.exists(path):
        return f"{modality} file not found: {path}"
    if not os.path.isfile(path):
        return f"{modality} input is not a file: {path}"
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    try:
        loader.load(path)
    except SampleError as e:
        return str(e)
    except Exception as e:  # a decoder's own error types: still only this row's problem
        return f"{path}: cannot load as {modality} ({type(e).__name__}: {e})"
    return None


def _id_base(values: dict[str, Any], files: list[str], base_dir: str) -> str:
    """Stable id of a sample: its first file's path (relative to the table) without extension."""
    for key in files:
        path = values.get(key)
        if isinstance(path, str):
            rel = os.path.relpath(path, base_dir)
            stem = os.path.splitext(path if rel.split(os.sep)[0] == os.pardir else rel)[0]
            return Path(stem).as_posix().lstrip("/")
    return hashlib.sha1(json.dumps(values, sort_keys=True).encode("utf-8")).hexdigest()[:12]


def _stable_ids(records: list[dict | None], files: list[str], base_dir: str) -> None:
    """Give every record without an id the id of its first file, disambiguated by content if shared.

    Bases are counted over every parsed row, rejected ones included, so a file that goes
    missing never renames the others.
    """
    bases = {i: _id_base(rec["_values"], files, base_dir) for i, rec in enumerate(records)
             if rec is not None and rec.get("id") is None}
    counts = Counter(bases.values())
    for i, base in bases.items():
        rec = records[i]
        if counts[base] > 1:  # e.g. one image with two captions
            digest = hashlib.sha1(json.dumps(rec["_values"], sort_keys=True).encode("utf-8")).hexdigest()[:8]
            base = f"{base}-{digest}"
        rec["id"] = base


# ----- the import --------------------------------------------------------------------------------


def import_table(src: str | Path, out: str | Path, mapping: Sequence[str], *, fmt: str | None = None,
                 split_col: str | None = None, val: float | None = None, test: float | None = None,
                 group_col: str | None = None, id_col: str | None = None, progress: bool = True) -> ImportReport:
    """Read a table, check every row, and write the manifest and its rejects file atomically.

    Args:
        src: CSV, TSV or JSONL file, one sample per row (CSV/TSV with a header line).
        out: Manifest to write; its rejects go to :func:`rejects_path_for` ``(out)``.
        mapping: ``MODALITY=COLUMN`` items, e.g. ``["image=path", "text=caption"]``.
        fmt: ``"csv"``, ``"tsv"`` or ``"jsonl"`` (default: from the file name).
        split_col: Column holding ``train``/``val``/``test`` (instead of a hash split).
        val: Share of groups in val, by a stable hash of the group (with ``test``).
        test: Share of groups in test. Default split without either: the caption-hash split.
        group_col: Column holding group ids (default: the caption's group, else the id).
        id_col: Column holding sample ids (default: the first file's path without extension).
        progress: Show a progress bar while files are checked.

    Raises:
        ConfigError: A malformed or unknown ``--map``, a column the table lacks, bad fractions.
        OneEncoderError: The table cannot be read, or no row survives the checks.
    """
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise OneEncoderError(f"input table not found: {src}")
    if os.path.abspath(src) == os.path.abspath(out):
        raise ConfigError(f"--out {out} is the input table; write the manifest to another file")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name the manifest file, e.g. {out / 'manifest.jsonl'}")
    fmt = fmt.lower() if fmt else FORMATS.get(src.suffix.lower())
    if fmt not in ("csv", "tsv", "jsonl"):
        raise ConfigError(f"cannot tell the format of {src.name}; name it .csv, .tsv or .jsonl or pass --format")
    names = parse_mapping(mapping)
    if split_col and (val is not None or test is not None):
        raise ConfigError("use either --split-col or --val/--test, not both")
    fractions = None if val is None and test is None else (val or 0.0, test or 0.0)
    if fractions and (min(fractions) < 0 or sum(fractions) > 1):
        raise ConfigError(f"--val {fractions[0]} --test {fractions[1]}: shares must be >= 0 and sum to at most 1")

    columns, rows = read_table(src, fmt)
    options = [(f"--map {m}={c}", c) for m, c in names.items()]
    options += [(f"{opt} {c}", c) for opt, c in (("--split-col", split_col), ("--group-col", group_col),
                                                 ("--id-col", id_col)) if c]
    for option, column in options:
        if column not in columns:
            raise ConfigError(f"{option}: {src.name} has no column {column!r} (columns: {', '.join(columns)})")

    specs = {m: MODALITIES.get(m).spec for m in names}
    files = [specs[m].record_key for m in names if specs[m].reads_files]
    # Manifest field -> the table column it comes from, to name the column in rejects.
    column_of = {specs[m].record_key: c for m, c in names.items()}
    column_of.update({k: c for k, c in (("id", id_col), ("group", group_col), ("split", split_col)) if c})
    record_keys = {MODALITIES.get(n).spec.record_key for n in MODALITIES.names()}
    used = set(column_of.values())
    reserved = set(_MANIFEST_FIELDS) | record_keys
    extras = [c for c in columns if c not in used and c not in reserved and not c.startswith("_")]
    report = ImportReport(out, rejects_path_for(out))
    report.notes = [f"column {c!r} is not used (pass --{c}-col {c} to use it)" for c in columns
                    if c in ("id", "split", "group") and c not in used]
    base_dir = os.path.dirname(os.path.abspath(src))

    records = [None if row.problem else _record(row, names, specs, column_of, base_dir, extras) for row in rows]
    _stable_ids(records, files, base_dir)

    loaders: dict[str, Any] = {}
    seen: dict[str, int] = {}
    for row, rec in progress_bar(list(zip(rows, records)), desc="check files", unit="row", enabled=progress):
        problem = row.problem
        if rec is not None:
            del rec["_values"]
            own = rec.pop("_problem")
            problem = problem or own
        if problem is None:
            _finish(rec, group_col, split_col, fractions)
            problem = _row_problem(rec, names, specs, column_of, loaders)
        if problem is None and rec["id"] in seen:
            problem = (column_of.get("id"), f"duplicate id {rec['id']!r} (first on line {seen[rec['id']]})")
        if problem is None:
            seen[rec["id"]] = row.line
            report.samples.append(rec)
        else:
            report.rejects.append({"line": row.line, "id": rec.get("id") if rec else None,
                                   "field": problem[0], "reason": problem[1]})

    if split_col:
        splits_of = defaultdict(set)
        for rec in report.samples:
            splits_of[rec["group"]].add(rec["split"])
        report.straddling = sum(1 for s in splits_of.values() if len(s) > 1)
    write_jsonl_atomic(report.rejects_path, report.rejects)
    if not report.samples:
        raise OneEncoderError(f"no row of {src} could be imported: {len(report.rejects)} rejected "
                              f"(see {report.rejects_path})")
    write_manifest(out, report.samples)
    return report


def _record(row: _Row, names: dict[str, str], specs: dict, column_of: dict[str, str], base_dir: str,
            extras: list[str]) -> dict:
    """The manifest row of a parsed table row; ``_problem`` holds the first thing wrong with it."""
    problem = next(((c, f"column {c!r} is not valid UTF-8 (bad bytes, or a lone \\ud800-\\udfff escape)")
                    for c, v in row.values.items() if _bad_utf8(v)), None)
    problem = problem or next(((c, _too_long(v)) for c, v in row.values.items()
                               if isinstance(v, str) and len(v) > MAX_CELL_CHARS), None)
    values: dict[str, Any] = {}
    for modality, column in names.items():
        key, value = specs[modality].record_key, _cell(row.values.get(column))
        if specs[modality].reads_files and isinstance(value, str) and not os.path.isabs(value):
            value = os.path.normpath(os.path.join(base_dir, value))  # relative to the table, not the cwd
        values[key] = value
    if problem is None and all(v is None for v in values.values()):
        problem = (None, f"no value in any mapped column ({', '.join(names.values())})")
    rec: dict[str, Any] = {"id": None, **values}
    for key in ("id", "group", "split"):
        column = column_of.get(key)
        if column:
            value = _cell(row.values.get(column))
            rec[key] = value.lower() if key == "split" and isinstance(value, str) else value
            if value is None and problem is None:
                problem = (column, f"column {column!r} is empty")
    rec.update({c: row.values[c] for c in extras if c in row.values})
    rec["_values"], rec["_problem"] = values, problem
    return rec


def _too_long(cell: str) -> str:
    """Why a cell over :data:`MAX_CELL_CHARS` is rejected; a newline in it hints at an unclosed quote."""
    why = f"{len(cell):,} characters in one cell; cells are limited to {MAX_CELL_CHARS:,}"
    if "\n" in cell:
        why += " (the cell spans lines: an unclosed quote makes the rest of the file one cell)"
    return why


def _finish(rec: dict, group_col: str | None, split_col: str | None, fractions: tuple[float, float] | None) -> None:
    """Fill in the default group and split."""
    caption = rec.get(CAPTION_FIELD)
    if isinstance(caption, list):
        caption = next((c for c in caption if isinstance(c, str) and c.strip()), None)
    by_caption = not group_col and isinstance(caption, str) and bool(caption.strip())
    if not group_col:
        rec["group"] = caption_group(caption) if by_caption else str(rec["id"])
    if split_col:
        return
    if fractions:
        rec["split"] = fraction_split(rec["group"], *fractions)
    else:  # the fixed caption-hash split (as Tux Paint's); groups without a caption by the same shares
        rec["split"] = caption_split(caption) if by_caption else fraction_split(rec["group"], DEFAULT_VAL,
                                                                                 DEFAULT_TEST)


def _row_problem(rec: dict, names: dict[str, str], specs: dict, column_of: dict[str, str],
                 loaders: dict[str, Any]) -> tuple[str | None, str] | None:
    """``(column, reason)`` of the first problem: the schema's check of the row, then each mapped file's."""
    bad = check_row(rec)
    if bad:
        return column_of.get(bad[0], bad[0]), bad[1]
    for modality, column in names.items():
        value = rec.get(specs[modality].record_key)
        if specs[modality].reads_files and isinstance(value, str):
            if modality not in loaders:
                loaders[modality] = MODALITIES.get(modality)()  # default options: decoding, not features
            why = check_file(modality, value, loaders[modality])
            if why:
                return column, why
    return None
