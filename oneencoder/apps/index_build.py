"""Build an index from a manifest, a folder or a list file: in chunks, with rejects, resumable.

``oneencoder index build`` runs :func:`build_index`. The inputs are encoded in chunks of
``chunk`` samples; each finished chunk is written under ``<out>/.build/`` (vectors, items,
rejects), so an interrupted build resumes at the first unfinished chunk. A sample that
cannot be read goes to ``<out>/rejects.jsonl`` with its reason and the build goes on; so
does a manifest row whose display field holds NaN or an infinity (JSON cannot write them,
and ``search --json`` must stay valid JSON).

``--out`` must be a new or empty folder, or one this command wrote (an index, or an
interrupted build): the build removes only its own ``.build`` work folder inside it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..progress import progress_bar

from ..data.manifest import read_manifest
from ..errors import OneEncoderError
from ..features.inputs import files_of
from ..fileio import atomic_path, sha256_text, write_json_atomic, write_jsonl_atomic
from ..modality import MODALITIES
from ..names import path_inside, remove_tree_inside
from .index import IVF_MIN_VECTORS, KINDS, META, VectorIndex, make_index_dir, model_space, non_finite_field

if TYPE_CHECKING:
    from ..features.lookup import CachedFeatures
    from .api import OneEncoder

REJECTS = "rejects.jsonl"
_WORK = ".build"
_LIST_SUFFIXES = (".txt", ".smi", ".smiles", ".lst")


@dataclass
class BuildReport:
    """What an index build did."""

    path: Path
    modality: str
    count: int
    kind: str
    rejects: list[dict[str, Any]] = field(default_factory=list)
    without_input: int = 0  # manifest rows that have no value for this modality
    resumed: int = 0  # samples taken from an interrupted earlier run

    def summary(self) -> str:
        parts = [f"{self.count} {self.modality} vectors ({self.kind})", f"{len(self.rejects)} rejected"]
        if self.rejects:
            parts[-1] += f" (see {self.path / REJECTS})"
        if self.without_input:
            parts.append(f"{self.without_input} manifest rows without a {self.modality} input skipped")
        if self.resumed:
            parts.append(f"{self.resumed} resumed")
        return f"wrote {self.path}: " + ", ".join(parts)


def _scalar_fields(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if isinstance(v, (str, int, float, bool)) or v is None}


def read_sources(data: str | Path, modality: str,
                 records: list[dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], int]:
    """Items to index, each ``{"id", "input", ...}``, and how many manifest rows had no input.

    ``data`` is a manifest (``.jsonl``: the modality's field of each row, the row's other
    fields kept for display), a folder (the modality's files in it, by extension), or a
    text file with one input per line (texts, SMILES, or file paths). ``records``: the
    manifest's rows when the caller has read them already.

    Raises:
        OneEncoderError: the data is missing, unreadable, or holds no input of the modality.
    """
    data = Path(data)
    cls = MODALITIES.get(modality)
    if data.is_dir():
        root = data.resolve()
        return [{"id": str(p.relative_to(root)), "input": str(p)} for p in files_of(root, modality)], 0
    if not data.is_file():
        raise OneEncoderError(f"--data {data}: no such file or folder")
    if data.suffix.lower() == ".jsonl":
        key = cls.spec.record_key
        rows = read_manifest(data) if records is None else records
        out = [{**_scalar_fields(r), "id": str(r["id"]), "input": r[key]} for r in rows if r.get(key) is not None]
        if not out:
            raise OneEncoderError(f"--data {data}: no row has a {key!r} field ({modality} input)")
        return out, len(rows) - len(out)
    if data.suffix.lower() not in _LIST_SUFFIXES:
        raise OneEncoderError(f"--data {data}: expected a manifest (.jsonl), a folder, or a list of inputs "
                              f"({', '.join(_LIST_SUFFIXES)}), one per line")
    lines = _read_lines(data)
    if cls.spec.reads_files:  # paths relative to the list's folder, as in manifests
        lines = [str((data.parent / x).resolve()) if not Path(x).is_absolute() else x for x in lines]
    if not lines:
        raise OneEncoderError(f"--data {data}: no inputs (the file has no non-blank line)")
    return [{"id": x, "input": x} for x in lines], 0


def _data_hash(sources: list[dict[str, Any]]) -> str:
    return sha256_text(json.dumps([(s["id"], s["input"]) for s in sources], ensure_ascii=False))


def build_index(model: "OneEncoder", modality: str, sources: list[dict[str, Any]], out: str | Path, *,
                kind: str = "auto", batch_size: int = 32, chunk: int = 1024, progress: bool = True,
                resume: bool = True, overwrite: bool = False, extra: dict[str, Any] | None = None,
                cache: "CachedFeatures | None" = None) -> BuildReport:
    """Encode ``sources`` (from :func:`read_sources`) into an index at ``out``.

    Args:
        kind: ``auto``, ``exact`` or ``ivf`` (see :mod:`oneencoder.apps.index`).
        chunk: Samples per resume point.
        resume: Continue an interrupted build of the same data with the same model.
        overwrite: Replace a finished index at ``out``.
        cache: Cached backbone features: an input it holds is embedded from them, not encoded
            again (it counts both).

    Raises:
        OneEncoderError: ``out`` holds an index (without ``overwrite``), or nothing could be encoded.
    """
    out = Path(out)
    if kind not in KINDS:
        raise OneEncoderError(f"--kind {kind!r}: use one of {', '.join(KINDS)}")
    if kind == "ivf" and len(sources) < IVF_MIN_VECTORS:  # before encoding anything
        raise OneEncoderError(f"--kind ivf needs at least {IVF_MIN_VECTORS} inputs, got {len(sources)}; "
                              "use --kind exact (or auto), which is also faster at this size")
    _check_out(out)
    if (out / META).exists() and not overwrite:
        raise OneEncoderError(f"{out} already holds an index; pass --overwrite to replace it")
    space = model_space(model.meta, modality)
    work = path_inside(out, _WORK)
    state = {"modality": modality, "space": space, "data": _data_hash(sources), "chunk": chunk}
    if work.exists() and (not resume or _read_json(work / "state.json") != state):
        remove_tree_inside(out, _WORK)  # another model, other data, or --no-resume: start over
    write_json_atomic(work / "state.json", state)

    parts = range(0, len(sources), chunk)
    done = [p for p in parts if (work / f"part-{p:09d}.jsonl").exists()]
    resumed = sum(min(chunk, len(sources) - p) for p in done)
    with progress_bar(total=len(sources), initial=resumed, desc=f"index {modality}", unit=modality,
                      enabled=progress) as bar:
        for start in parts:
            if start in done:
                continue
            _encode_part(model, modality, sources[start : start + chunk], start, work, batch_size, cache)
            bar.update(min(chunk, len(sources) - start))

    vectors, items, rejects = _read_parts(work, parts)
    if kind == "ivf" and 0 < len(items) < IVF_MIN_VECTORS:
        raise OneEncoderError(f"--kind ivf needs at least {IVF_MIN_VECTORS} vectors, but only {len(items)} "
                              f"inputs could be encoded ({len(rejects)} rejected, see the reasons with --kind exact)")
    if not items:
        raise OneEncoderError(f"no {modality} input could be encoded ({len(rejects)} rejected; first: "
                              f"{rejects[0]['reason'] if rejects else 'none'})")
    info = {"model": str(Path(model.model_dir).resolve()), "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rejected": len(rejects), **(extra or {})}
    index = VectorIndex(vectors, items, modality, space, kind=kind, extra=info)
    index.save(out)
    write_jsonl_atomic(out / REJECTS, rejects)
    remove_tree_inside(out, _WORK)
    return BuildReport(out, modality, len(index), index.kind, rejects, resumed=resumed)


def _encode_part(model: "OneEncoder", modality: str, sources: list[dict[str, Any]], start: int, work: Path,
                 batch_size: int, cache: "CachedFeatures | None") -> None:
    """Encode one chunk and write it; its items file, written last, marks it finished."""
    from safetensors.numpy import save_file

    found: list[tuple[int, dict[str, Any]]] = []  # (position in the chunk, reject), sorted below

    def reject(i: int, reason: str) -> None:
        found.append((i, {"id": sources[i]["id"], "input": str(sources[i]["input"]), "reason": reason}))

    # A display field JSON cannot hold (NaN, an infinity: json.loads reads them, and 1e999
    # as inf) is the row's problem: a reject naming the field, before any encoding.
    clean = []
    for i, s in enumerate(sources):
        bad = non_finite_field(s)
        if bad is None:
            clean.append(i)
        else:
            reject(i, f"field {bad!r} is {s[bad]}, which JSON cannot hold; use a finite number or leave it out")
    emb, kept = torch.empty(0, model.model.embed_dim), []
    if clean:
        emb, kept = model._embed(modality, [sources[i]["input"] for i in clean], batch_size, False,
                                 on_error=lambda j, _x, reason: reject(clean[j], reason), cache=cache)
    kept = [clean[j] for j in kept]
    rejects = [r for _, r in sorted(found, key=lambda pair: pair[0])]
    # Positions inside the chunk are replaced by the sample's id in every reason.
    for r in rejects:
        r["reason"] = r["reason"].split(": ", 1)[-1] if r["reason"].startswith(f"{modality} input #") else r["reason"]
    name = f"part-{start:09d}"
    with atomic_path(work / f"{name}.safetensors") as tmp:
        save_file({"vectors": emb.numpy().astype(np.float32)}, str(tmp))
    write_jsonl_atomic(work / f"{name}.rejects.jsonl", rejects)
    write_jsonl_atomic(work / f"{name}.jsonl", [sources[i] for i in kept])


def _read_parts(work: Path, parts: range) -> tuple[np.ndarray, list[dict[str, Any]], list[dict[str, Any]]]:
    from safetensors.numpy import load_file

    vectors, items, rejects = [], [], []
    for start in parts:
        name = f"part-{start:09d}"
        vectors.append(load_file(str(work / f"{name}.safetensors"))["vectors"])
        items += _read_jsonl(work / f"{name}.jsonl")
        rejects += _read_jsonl(work / f"{name}.rejects.jsonl")
    dim = vectors[0].shape[1] if vectors else 0
    return (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)), items, rejects


def _check_out(out: Path) -> None:
    """``--out`` must be a folder this command may write into: new, empty, or one it wrote.

    A file is refused, and so is a folder of other files: the build writes fixed names
    (``vectors.safetensors``, ``ann.faiss``...) and removes its ``.build`` folder there.
    """
    make_index_dir(out)
    work = out / _WORK
    if work.is_symlink() or (work.exists() and not (work / "state.json").is_file()):
        raise OneEncoderError(f"{work} is not an interrupted index build (no state.json); move it away or "
                              "choose another --out")
    if not (out / META).exists() and not work.exists() and any(out.iterdir()):
        raise OneEncoderError(f"--out {out} is a folder of other files, not an index; choose a new or empty folder")


def _read_lines(path: Path) -> list[str]:
    """Non-blank lines, stripped; a line that is not UTF-8 is one error naming it."""
    lines = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
        except UnicodeDecodeError:
            raise OneEncoderError(f"--data {path}:{lineno}: not valid UTF-8; save the file as UTF-8") from None
        if line:
            lines.append(line)
    return lines


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    # "\n" only: splitlines() would also cut at U+2028 or U+0085 inside a caption.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
