"""Import a folder as it is: Hugging Face ``imagefolder``/``audiofolder`` layouts as a checked manifest.

The layout (any modality whose files a registered modality recognises by extension,
plugins included):

```
mydata/
  train/                      optional split folders: train/, validation/ (or val/), test/
    metadata.csv              optional: file_name (and any <x>_file_name), plus any columns
    cat/0001.png              class subfolders: the first folder level becomes `label`
    dog/0002.png
  test/...
```

* **Files.** Every file whose extension a modality claims (``Modality.file_extensions``) is
  one sample; other files (``.txt``, ``.md``...) are ignored. A metadata row that names
  several files (``file_name``, ``audio_file_name``...) makes them one sample.
* **Metadata.** ``metadata.csv`` or ``metadata.jsonl`` in any folder; its ``file_name``
  values are relative to that folder. A column named like a modality or its manifest
  field (``text``, ``caption``, ``smiles``...) fills that field; a ``label`` column
  overrides the folder label; other columns are copied as they are.
* **Captions.** A sample without one gets ``template`` filled with its label ("A cat.").
* **Splits.** From the split folders; without them, a caption from the metadata gives the
  caption-hash split, and a caption made from a label gives a hash of the file, so every
  class lies in every split (a per-class split would test on classes never trained on).

Bad or unreadable files go to the rejects file with the reason; the import goes on.

Example:
    >>> report = import_folder("mydata", "mydata.jsonl")
    >>> print(report.summary())
    wrote mydata.jsonl: 40 samples (train 24, val 8, test 8), 1 rejected (see mydata.rejects.jsonl)
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError, OneEncoderError
from ..fileio import write_jsonl_atomic
from ..modality import MODALITIES
from ..progress import progress_bar
from .manifest import CAPTION_FIELD, caption_group, caption_split, check_row, write_manifest
from .table_import import (DEFAULT_TEST, DEFAULT_VAL, ImportReport, check_file, fraction_split, read_table,
                           rejects_path_for)

#: Top-level folder names that are splits (as Hugging Face's data-files patterns read them).
SPLIT_FOLDERS = {"train": "train", "training": "train", "validation": "val", "val": "val", "valid": "val",
                 "dev": "val", "test": "test", "testing": "test"}
METADATA_FILES = {"metadata.csv": "csv", "metadata.jsonl": "jsonl"}
LABEL_FIELD = "label"
#: Caption of a sample that has a label but no text; also ``classify``'s default prompt.
DEFAULT_TEMPLATE = "A {}."
_FILE_COLUMN = "file_name"
_RESERVED = ("id", "split", "group", "heldout")


def label_text(label: str) -> str:
    """A class folder's name as words: ``hot_dog`` -> ``hot dog``."""
    return " ".join(label.replace("_", " ").split())


def check_template(template: str) -> str:
    """``template`` with its placeholder as ``{}`` (``{label}`` is accepted too).

    Raises:
        ConfigError: the template holds no placeholder, or more than one.
    """
    normal = template.replace("{label}", "{}")
    if normal.count("{}") != 1:
        raise ConfigError(f"--template {template!r}: put '{{}}' (or '{{label}}') exactly once where the label goes")
    return normal


def extension_owners(candidates: Sequence[str] | None = None) -> dict[str, list[str]]:
    """``{".png": ["image"], ...}``: which modalities (of ``candidates``, default all) claim each extension."""
    owners: dict[str, list[str]] = {}
    for name in candidates if candidates is not None else MODALITIES.names():
        cls = MODALITIES.get(name)
        if cls.spec.reads_files:
            for ext in getattr(cls, "file_extensions", ()):
                owners.setdefault(ext.lower(), []).append(name)
    return owners


@dataclass
class FolderSample:
    """One sample found in a folder, before its files are decoded.

    Attributes:
        files: Modality -> absolute file path.
        rel: The first file's path relative to the folder (POSIX), for ids and messages.
        split: From a split folder, or None.
        label: From a ``label`` column or the class folder, or None.
        values: Metadata columns (manifest field -> value).
        source: Where the sample was named: a metadata file and line, or its own path.
    """

    files: dict[str, str]
    rel: str
    split: str | None = None
    label: str | None = None
    values: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass
class FolderScan:
    """What :func:`scan_folder` found: samples, problems ``{"file", "line", "field", "reason"}``, notes."""

    root: Path
    samples: list[FolderSample] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    has_split_folders: bool = False

    def modalities(self) -> Counter:
        return Counter(m for s in self.samples for m in s.files)


def _visible_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _field_of_column(column: str) -> str | None:
    """The manifest field a metadata column fills: a non-file modality's name or field (``text`` -> caption)."""
    for name in MODALITIES.names():
        spec = MODALITIES.get(name).spec
        if not spec.reads_files and column in (name, spec.record_key):
            return spec.record_key
    return None


def scan_folder(root: str | Path, candidates: Sequence[str] | None = None) -> FolderScan:
    """Find the samples of an imagefolder/audiofolder-style folder (see the module docstring).

    Args:
        root: The folder.
        candidates: Modalities whose files count (default: every registered one that reads files).

    Raises:
        OneEncoderError: ``root`` is not a folder, or holds no file any candidate reads.
        ConfigError: an extension is claimed by several candidates (name one with ``--modality``).
    """
    root = Path(root)
    if not root.is_dir():
        raise OneEncoderError(f"{root}: no such folder")
    owners = extension_owners(candidates)
    scan = FolderScan(root)
    top = {p.name for p in root.iterdir() if p.is_dir()}
    scan.has_split_folders = any(name.lower() in SPLIT_FOLDERS for name in top)
    data: dict[str, Path] = {}
    metadata: list[Path] = []
    for path in _visible_files(root):
        ext = path.suffix.lower()
        if path.name.lower() in METADATA_FILES:
            metadata.append(path)
        elif ext in owners:
            if len(owners[ext]) > 1:
                raise ConfigError(f"{path}: {ext} files could be {' or '.join(owners[ext])}; "
                                  "name one with --modality")
            data[os.path.abspath(path)] = path
    if not data:
        exts = " ".join(sorted(owners)) or "none"
        raise OneEncoderError(f"{root}: no file any modality reads (extensions: {exts})")

    named: set[str] = set()
    for meta in metadata:
        for sample in _metadata_samples(scan, meta, data, owners):
            named.update(sample.files.values())
            scan.samples.append(sample)
    for path in data.values():
        if os.path.abspath(path) not in named:
            rel = path.relative_to(root).as_posix()
            scan.samples.append(FolderSample({owners[path.suffix.lower()][0]: os.path.abspath(path)}, rel,
                                             source=rel))
    for sample in scan.samples:
        _place(scan, sample)
    scan.samples = [s for s in scan.samples if s.split is not None or not scan.has_split_folders]
    return scan


def _place(scan: FolderScan, sample: FolderSample) -> None:
    """Split and label from the sample's folders; a file outside the split folders becomes a problem."""
    parts = Path(sample.rel).parts
    if scan.has_split_folders:
        split = SPLIT_FOLDERS.get(parts[0].lower()) if len(parts) > 1 else None
        if split is None:
            scan.problems.append({"file": sample.rel, "line": None, "field": None,
                                  "reason": "not under a split folder (train/, validation/ or val/, test/)"})
            return
        sample.split, parts = split, parts[1:]
    if sample.label is None and len(parts) > 1:  # the class folder is the first level (as torchvision's)
        sample.label = parts[0]


def _metadata_samples(scan: FolderScan, meta: Path, data: dict[str, Path],
                      owners: dict[str, list[str]]) -> list[FolderSample]:
    """Samples named by the rows of one metadata file; rows that name no usable file become problems."""
    rel_meta = meta.relative_to(scan.root).as_posix()
    columns, rows = read_table(meta, METADATA_FILES[meta.name.lower()])
    file_columns = [c for c in columns if c == _FILE_COLUMN or c.endswith("_" + _FILE_COLUMN)]
    if not file_columns:
        scan.notes.append(f"{rel_meta} has no {_FILE_COLUMN!r} column; it is not used")
        return []
    ignored = [c for c in columns if c in _RESERVED]
    if ignored:
        scan.notes.append(f"{rel_meta}: column(s) {', '.join(ignored)} ignored (ids come from file names, "
                          "splits from split folders)")
    out = []
    for row in rows:
        where = {"file": rel_meta, "line": row.line}
        if row.problem:
            scan.problems.append({**where, "field": row.problem[0], "reason": row.problem[1]})
            continue
        sample, problem = _metadata_row(row.values, meta.parent, file_columns, data, owners, scan.root)
        if problem:
            scan.problems.append({**where, "field": problem[0], "reason": problem[1]})
        else:
            sample.source = f"{rel_meta}:{row.line}"
            out.append(sample)
    return out


def _metadata_row(values: dict[str, Any], folder: Path, file_columns: list[str], data: dict[str, Path],
                  owners: dict[str, list[str]], root: Path) -> tuple[FolderSample | None, tuple | None]:
    files: dict[str, str] = {}
    for column in file_columns:
        name = values.get(column)
        if not isinstance(name, str) or not name.strip():
            continue
        path = os.path.normpath(os.path.join(os.path.abspath(folder), name.strip()))
        if path not in data:
            why = ("not found" if not os.path.exists(path) else "not a file" if not os.path.isfile(path)
                   else f"outside {root}" if os.path.commonpath([path, os.path.abspath(root)]) != os.path.abspath(root)
                   else "not a file any modality reads")
            return None, (column, f"{name.strip()}: {why}")
        modality = owners[data[path].suffix.lower()][0]
        if modality in files:
            return None, (column, f"two {modality} files in one row")
        files[modality] = path
    if not files:
        return None, (file_columns[0], "no file named")
    rel = Path(next(iter(files.values()))).relative_to(os.path.abspath(root)).as_posix()
    sample = FolderSample(files, rel)
    for column, value in values.items():
        if column in file_columns or column in _RESERVED or column.startswith("_"):
            continue
        value = value.strip() if isinstance(value, str) else value
        if value is None or value == "":
            continue
        if column == LABEL_FIELD:
            sample.label = str(value)
        else:
            sample.values[_field_of_column(column) or column] = value
    return sample, None


# ----- the import -----------------------------------------------------------------------------


def _record(sample: FolderSample, template: str, fractions: tuple[float, float] | None) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": None, **sample.values, **{MODALITIES.get(m).spec.record_key: p
                                                            for m, p in sample.files.items()}}
    if sample.label is not None:
        rec[LABEL_FIELD] = sample.label
    caption = rec.get(CAPTION_FIELD)
    from_label = not (isinstance(caption, str) and caption.strip()) and sample.label is not None
    if from_label:
        caption = rec[CAPTION_FIELD] = template.replace("{}", label_text(sample.label))
    has_caption = isinstance(caption, str) and bool(caption.strip())
    rec["group"] = caption_group(caption) if has_caption else None
    if sample.split is not None:
        rec["split"] = sample.split
    elif fractions is not None:
        rec["split"] = None  # by the group, once ids are known
    else:
        rec["split"] = caption_split(caption) if has_caption and not from_label else None
    rec["_by_file"] = from_label or not has_caption
    return rec


def _ids(samples: list[FolderSample]) -> list[str]:
    """Path without extension; with it where two files share that (``a.png`` and ``a.jpg``)."""
    bases = [os.path.splitext(s.rel)[0] for s in samples]
    counts = Counter(bases)
    return [b if counts[b] == 1 else s.rel for b, s in zip(bases, samples)]


def import_folder(root: str | Path, out: str | Path, *, template: str = DEFAULT_TEMPLATE,
                  modalities: Sequence[str] | None = None, val: float | None = None, test: float | None = None,
                  progress: bool = True) -> ImportReport:
    """Read a folder (see the module docstring), check every file, write the manifest and rejects atomically.

    Args:
        root: The folder.
        out: Manifest to write; rejects go to :func:`~oneencoder.data.table_import.rejects_path_for` ``(out)``.
        template: Caption of a labelled sample without text, ``{}`` standing for the label's words.
        modalities: Modalities whose files count (default: every registered one that reads files).
        val: Share in val when there are no split folders (stable hash; with ``test``).
        test: Share in test. Without either: the default split (see the module docstring).
        progress: Show a progress bar while files are checked.

    Raises:
        ConfigError: a bad template, share or modality, or split shares given with split folders.
        OneEncoderError: no file to import, or none survives the checks.
    """
    root, out = Path(root), Path(out)
    template = check_template(template)
    for name in modalities or ():
        if name not in MODALITIES:
            raise ConfigError(f"--modality {name!r}: unknown; registered: {', '.join(MODALITIES.names())}")
        if not extension_owners([name]):
            raise ConfigError(f"--modality {name!r}: its inputs are not files")
    fractions = None if val is None and test is None else (val or 0.0, test or 0.0)
    if fractions and (min(fractions) < 0 or sum(fractions) > 1):
        raise ConfigError(f"--val {fractions[0]} --test {fractions[1]}: shares must be >= 0 and sum to at most 1")
    scan = scan_folder(root, modalities)
    if fractions and scan.has_split_folders:
        raise ConfigError(f"{root} has split folders (train/, val/, test/); --val/--test apply to a folder "
                          "without them")
    report = ImportReport(out, rejects_path_for(out), notes=list(scan.notes))
    report.rejects = [{"file": p["file"], "line": p["line"], "id": None, "field": p["field"], "reason": p["reason"]}
                      for p in scan.problems]
    loaders: dict[str, Any] = {}
    pairs = list(zip(scan.samples, _ids(scan.samples)))
    for sample, sid in progress_bar(pairs, desc="check files", unit="file", enabled=progress):
        rec = _record(sample, template, fractions)
        rec["id"] = sid
        by_file = rec.pop("_by_file")
        if rec["group"] is None:
            rec["group"] = sid
        if rec["split"] is None:
            shares = fractions or (DEFAULT_VAL, DEFAULT_TEST)
            rec["split"] = fraction_split(sid if by_file else rec["group"], *shares)
        problem = check_row(rec)
        for modality, path in sample.files.items():
            if problem is None:
                why = check_file(modality, path, loaders.setdefault(modality, MODALITIES.get(modality)()))
                problem = (MODALITIES.get(modality).spec.record_key, why) if why else None
        if problem:
            report.rejects.append({"file": sample.source, "line": None, "id": sid, "field": problem[0],
                                   "reason": problem[1]})
        else:
            report.samples.append(rec)
    write_jsonl_atomic(report.rejects_path, report.rejects)
    if not report.samples:
        raise OneEncoderError(f"no file of {root} could be imported: {len(report.rejects)} rejected "
                              f"(see {report.rejects_path})")
    labels = Counter(r[LABEL_FIELD] for r in report.samples if LABEL_FIELD in r)
    if labels:
        report.notes.append(f"{len(labels)} labels: " + ", ".join(f"{k} {n}" for k, n in sorted(labels.items())))
    write_manifest(out, report.samples)
    return report
