"""The model directory: ``oneencoder.json`` plus safetensors, every file checksummed.

::

    model/
      oneencoder.json              format, projection config, modalities, stage history, sha256 per file
      projection.safetensors       Universal Projection
      adapters/<modality>.safetensors   adapter + modality token
      means.safetensors            per-modality mean embedding on validation (written after each stage)

No pickle anywhere. A stage writes only the files it trained; the others stay byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Collection

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save as save_bytes

from ..errors import ChecksumError, OneEncoderError
from ..fileio import load_json_text, not_utf8, sha256_file
from ..modality import Modality, modality_class_for, provenance
from .parts import OneEncoderModel, adapter_from_dict, build_model, projection_from_dict
from .transaction import commit, recover, visible_path

FORMAT_VERSION = 1
META = "oneencoder.json"
PROJECTION = "projection.safetensors"
MEANS = "means.safetensors"
#: Keys of ``oneencoder.json``: per direction (``"audio→image"``), the match calibration fitted on
#: validation (:mod:`oneencoder.evaluation.calibration`); per modality, what its stored mean is.
MATCH_CALIBRATION = "match_calibration"
MEANS_KEY = "means"


def adapter_file(name: str) -> str:
    return f"adapters/{name}.safetensors"


def _module_bytes(module: torch.nn.Module) -> bytes:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return save_bytes(state, metadata={"format": "oneencoder"})


def _bytes_writer(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _meta_writer(meta: dict[str, Any]) -> Callable[[Path], None]:
    return _bytes_writer((json.dumps(meta, indent=2) + "\n").encode("utf-8"))


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """``oneencoder.json``, checked against what every reader of it relies on (:func:`check_meta`).

    Raises:
        OneEncoderError: The file is missing, not UTF-8 JSON, or misses or mistypes a key.
    """
    path = visible_path(model_dir, META)  # through an update a kill left half applied
    if not path.is_file():
        raise OneEncoderError(f"{model_dir} is not a oneencoder model directory (no {META})")
    try:
        meta = load_json_text(path.read_text(encoding="utf-8"), str(path))  # nesting checked first
    except UnicodeDecodeError as e:
        raise OneEncoderError(not_utf8(str(path), e)) from None
    except json.JSONDecodeError as e:
        raise OneEncoderError(f"{path}: corrupt JSON ({e.msg})") from None
    check_meta(meta, path)
    _register_recorded(meta)
    return meta


def _is(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is int)


_JSON_WORDS = {dict: "an object", list: "a list", str: "a string", int: "an integer"}


def _require(table: Any, keys: dict[str, type], where: str) -> None:
    """Each of ``keys`` is in ``table`` with its JSON type (lists of names hold strings)."""
    if not isinstance(table, dict):
        raise OneEncoderError(f"{where} must be an object, got {json.dumps(table)[:80]}")
    for key, kind in keys.items():
        if key not in table:
            raise OneEncoderError(f"{where} misses the key {key!r}")
        value = table[key]
        if not _is(value, kind) or (kind is list and key in _NAME_LISTS and not all(_is(v, str) for v in value)):
            words = "a list of strings" if kind is list and key in _NAME_LISTS else _JSON_WORDS[kind]
            raise OneEncoderError(f"{where}: {key} must be {words}, got {json.dumps(value)[:80]}")


# What the readers of oneencoder.json rely on (keys added later are optional, for older models).
_META_KEYS = {"format_version": int, "d_model": int, "embed_dim": int, "projection": dict, "modalities": dict,
              "stages": list, "files": dict}
_MODALITY_KEYS = {"backbone": str, "weights_sha256": str, "feature_dim": int, "max_tokens": int,
                  "preprocess_version": str, "record_key": str, "options": dict, "adapter": dict}
_STAGE_KEYS = {"name": str, "pair": list, "trainable": list}
_NAME_LISTS = {"pair", "trainable"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_meta(meta: Any, path: str | Path = META) -> None:
    """Raise ``OneEncoderError`` naming the first key of ``oneencoder.json`` that is missing or
    mistyped, a non-positive width, or a ``files`` entry that is not a checksum of a file
    inside the directory. Shapes are checked as a stage file's ``[model]``/``[adapter]``."""
    where = str(path)
    _require(meta, {"format_version": int}, where)
    if meta["format_version"] != FORMAT_VERSION:
        raise OneEncoderError(f"{path}: format_version {meta['format_version']} is not supported "
                              f"(need {FORMAT_VERSION})")
    _require(meta, _META_KEYS, where)
    for key in ("d_model", "embed_dim"):
        if meta[key] < 1:
            raise OneEncoderError(f"{where}: {key} must be positive, got {meta[key]}")
    projection_from_dict(meta["projection"], f"{where}: projection")
    for name, info in meta["modalities"].items():
        at = f"{where}: modalities.{name}"
        _require(info, _MODALITY_KEYS, at)
        if info["feature_dim"] < 1 or info["max_tokens"] < 1:
            raise OneEncoderError(f"{at}: feature_dim and max_tokens must be positive, "
                                  f"got {info['feature_dim']} and {info['max_tokens']}")
        if not _is(info.get("class") or "", str):
            raise OneEncoderError(f"{at}: class must be a 'module:Class' string, got {json.dumps(info['class'])}")
        span = info.get("language_slice")  # dims of the first token in the text space, or null
        if span is not None and not (isinstance(span, list) and len(span) == 2 and all(_is(v, int) for v in span)
                                     and 0 <= span[0] < span[1] <= info["feature_dim"]):
            raise OneEncoderError(f"{at}: language_slice must be null or [start, end] within the "
                                  f"{info['feature_dim']} feature dims, got {json.dumps(span)[:80]}")
        adapter_from_dict(info["adapter"], f"{at}.adapter")
    for i, stage in enumerate(meta["stages"]):
        _require(stage, _STAGE_KEYS, f"{where}: stages[{i}]")
    for rel, digest in meta["files"].items():
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            raise OneEncoderError(f"{where}: files lists {rel!r}, which is not a path inside the model directory")
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise OneEncoderError(f"{where}: files[{rel!r}] must be a sha256 hex digest, got {json.dumps(digest)[:80]}")


def _register_recorded(meta: dict[str, Any]) -> None:
    """Import the classes the model recorded, where importable, so that their manifest fields
    are known (e.g. a plugin's file paths resolve against the manifest's folder). One that is
    not importable fails later, with one line, only if it is used."""
    for name, info in meta.get("modalities", {}).items():
        if isinstance(info, dict):
            try:
                modality_class_for(name, info)
            except OneEncoderError:
                pass


def save_model(
    model: OneEncoderModel,
    model_dir: str | Path,
    modalities: dict[str, dict[str, Any]],
    stage_entry: dict[str, Any],
    write: list[str],
) -> dict[str, Any]:
    """Write the trained parts and append a stage entry, all visible at once (:mod:`oneencoder.model.parts.transaction`).

    Args:
        model: The model (all modalities it holds are recorded).
        model_dir: Target directory; an existing one keeps its other files untouched.
        modalities: Per-modality facts (backbone, weights sha256, options...).
        stage_entry: Stage name, data hash, config, metrics.
        write: Which parts to (re)write: ``"projection"`` and/or modality names.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    recover(model_dir)  # finish (or undo) an update a kill interrupted, before reading what it left
    writers: dict[str, Callable[[Path], None]] = {}

    def add(rel: str, module: torch.nn.Module) -> None:
        data = _module_bytes(module)
        writers[rel] = _bytes_writer(data)
        meta["files"][rel] = hashlib.sha256(data).hexdigest()

    meta = read_meta(model_dir) if (model_dir / META).exists() else {
        "format_version": FORMAT_VERSION,
        "d_model": model.projection_config.d_model,
        "embed_dim": model.embed_dim,
        "projection": asdict(model.projection_config),
        "modalities": {},
        "stages": [],
        "files": {},
    }
    _drop_stale_fits(meta, write)
    if "projection" in write:
        # A new projection invalidates every adapter trained against the old one.
        stale = [n for n in meta["modalities"] if n not in write]
        if stale:
            raise OneEncoderError(f"retraining the projection in {model_dir} would orphan adapters {stale}")
        for key in PARTS:  # optional parts read the old space: they are dropped, not kept stale
            if meta.pop(key, None) is not None:
                meta["files"] = {rel: d for rel, d in meta["files"].items() if not rel.startswith(f"{key}/")}
        meta.update({"d_model": model.projection_config.d_model, "embed_dim": model.embed_dim,
                     "projection": asdict(model.projection_config)})
        add(PROJECTION, model.projection)
    for name in write:
        if name == "projection":
            continue
        add(adapter_file(name), model.adapters[name])
        meta["modalities"][name] = {**modalities[name], "adapter": asdict(model.adapter_configs[name]),
                                    "language_source": model.prior.sources[name]}
    stages = [s for s in meta["stages"] if s.get("name") != stage_entry.get("name")]
    meta["stages"] = stages + [{**stage_entry, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
    writers[META] = _meta_writer(meta)
    commit(model_dir, writers)
    return meta


def _drop_stale_fits(meta: dict[str, Any], write: list[str]) -> None:
    """Forget the calibrations and means that read a part being rewritten (all of them for a new
    projection): the stage that rewrites it fits them again when it ends."""
    every = "projection" in write
    stale = lambda names: every or any(n in write for n in names)  # noqa: E731
    if isinstance(meta.get(MATCH_CALIBRATION), dict):
        meta[MATCH_CALIBRATION] = {d: c for d, c in meta[MATCH_CALIBRATION].items() if not stale(d.split("→"))}
    if isinstance(meta.get(MEANS_KEY), dict):
        meta[MEANS_KEY] = {n: info for n, info in meta[MEANS_KEY].items() if not stale([n])}
        if not meta[MEANS_KEY]:
            del meta[MEANS_KEY]
            meta["files"].pop(MEANS, None)


def _table_of(meta: dict[str, Any], key: str) -> dict[str, Any]:
    """``meta[key]`` when it is an object; anything else (absent, or edited by hand) counts as empty."""
    value = meta.get(key)
    return value if isinstance(value, dict) else {}


def read_means(model_dir: str | Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The mean embedding of each modality the model records one for (float32 ``[d]``), read from
    ``means.safetensors`` after checking its sha256; ``{}`` for a model that stores none."""
    names = meta.get(MEANS_KEY)
    if not isinstance(names, dict) or MEANS not in meta["files"]:
        return {}
    path = visible_path(model_dir, MEANS)
    if not path.is_file() or sha256_file(path) != meta["files"][MEANS]:
        raise ChecksumError(f"{path} is missing or does not match its sha256 in {META}; restore the model directory")
    try:
        stored = load_file(str(path))
    except SafetensorError as e:
        raise ChecksumError(f"{path} is not a valid safetensors file ({e})") from None
    return {n: stored[n].float() for n in names if n in stored}


def save_fits(model_dir: str | Path, calibration: dict[str, dict[str, Any]], means: dict[str, torch.Tensor],
              means_info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Record match calibrations (by direction) and per-modality means, all visible at once.

    Entries of the same direction or modality are replaced; the others are kept.

    Args:
        calibration: Direction -> its stored calibration (a JSON object).
        means: Modality -> mean embedding ``[d]``, written to ``means.safetensors`` (checksummed).
        means_info: Modality -> what ``meta["means"]`` records about its mean (split, count, stage).
    """
    model_dir = Path(model_dir)
    recover(model_dir)
    meta = read_meta(model_dir)
    stored = read_means(model_dir, meta)
    writers: dict[str, Callable[[Path], None]] = {}
    if calibration:
        meta[MATCH_CALIBRATION] = {**_table_of(meta, MATCH_CALIBRATION), **calibration}
    if means:
        stored.update({n: v.detach().float().cpu().contiguous() for n, v in means.items()})
        meta[MEANS_KEY] = {**{n: i for n, i in _table_of(meta, MEANS_KEY).items() if n in stored}, **means_info}
        data = save_bytes({n: stored[n] for n in meta[MEANS_KEY]}, metadata={"format": "oneencoder-means"})
        writers[MEANS] = _bytes_writer(data)
        meta["files"][MEANS] = hashlib.sha256(data).hexdigest()
    writers[META] = _meta_writer(meta)
    commit(model_dir, writers)
    return meta


#: Optional parts a model directory may hold beside its stages, each in its own folder
#: ``<key>/`` and recorded under ``meta[key]``: trained on the finished space, dropped when
#: the projection is retrained.
PARTS = ("decoder",)


def save_part(model_dir: str | Path, key: str, files: dict[str, bytes], info: dict[str, Any]) -> dict[str, Any]:
    """Write an optional part (e.g. the caption decoder) and record it, all visible at once.

    Args:
        key: One of :data:`PARTS`; its files go to ``<model>/<key>/<name>``.
        files: File name (inside ``<key>/``) to bytes; each is checksummed in ``files``.
        info: What ``meta[key]`` records (its configuration, data and scores).
    """
    if key not in PARTS:
        raise ValueError(f"unknown model part {key!r} (known: {', '.join(PARTS)})")
    model_dir = Path(model_dir)
    recover(model_dir)
    meta = read_meta(model_dir)
    meta["files"] = {rel: d for rel, d in meta["files"].items() if not rel.startswith(f"{key}/")}
    writers: dict[str, Callable[[Path], None]] = {}
    for name, data in files.items():
        rel = f"{key}/{name}"
        writers[rel] = _bytes_writer(data)
        meta["files"][rel] = hashlib.sha256(data).hexdigest()
    meta[key] = {**info, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    writers[META] = _meta_writer(meta)
    commit(model_dir, writers)
    return meta


def _check_safetensors(path: Path) -> None:
    """Read only the header: a file that is not safetensors (a pickle, a garbled header) is refused
    without running or loading anything."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except SafetensorError as e:
        raise ChecksumError(f"{path} is not a valid safetensors file ({e}); restore it from the "
                            "original model directory") from None


def verify_files(model_dir: str | Path, meta: dict[str, Any]) -> None:
    """Raise ``ChecksumError`` naming the first file whose sha256 differs from the record, is
    missing, or (for ``.safetensors``) is not a safetensors file."""
    model_dir = Path(model_dir)
    for rel, expected in meta["files"].items():
        path = visible_path(model_dir, rel)
        if not path.is_file():
            raise ChecksumError(f"{path} is missing from the model directory")
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumError(
                f"{path}: sha256 {actual[:12]}... does not match {expected[:12]}... recorded in {META}; "
                "the file was modified or corrupted"
            )
        if path.suffix == ".safetensors":
            _check_safetensors(path)


def _load_state(module: torch.nn.Module, path: Path, map_location: str | torch.device) -> None:
    """Load ``path`` into ``module``; tensors that do not fit the recorded shapes are one error."""
    try:
        state = load_file(str(path), device=str(map_location))
    except SafetensorError as e:
        raise ChecksumError(f"{path} is not a valid safetensors file ({e})") from None
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ChecksumError(f"{path} does not hold the tensors {META} describes "
                            f"({' '.join(line.strip() for line in first[:2])[:300]})") from None


def load_model(model_dir: str | Path, map_location: str | torch.device = "cpu",
               without: Collection[str] = ()) -> tuple[OneEncoderModel, dict[str, Any]]:
    """Rebuild the model from a directory after verifying every checksum.

    ``without``: modalities left out of the model (not built, not loaded), e.g. one a stage
    retrains: it must then start as it would in a model that never held it.
    """
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    infos = {n: info for n, info in meta["modalities"].items() if n not in without}
    for rel in [PROJECTION, *(adapter_file(n) for n in infos)]:
        if rel not in meta["files"]:
            raise ChecksumError(f"{model_dir / META} records no checksum for {rel}")
    verify_files(model_dir, meta)
    where = model_dir / META
    model = build_model(projection_from_dict(meta["projection"], f"{where}: projection"), infos,
                        {n: adapter_from_dict(info["adapter"], f"{where}: modalities.{n}.adapter")
                         for n, info in infos.items()})
    _load_state(model.projection, visible_path(model_dir, PROJECTION), map_location)
    for name in infos:
        _load_state(model.adapters[name], visible_path(model_dir, adapter_file(name)), map_location)
    return model.eval(), meta


def modality_meta(modality: Modality) -> dict[str, Any]:
    """What ``oneencoder.json`` records about a modality: enough to rebuild it in a fresh process,
    including the class that defines it and the distribution that installed that class."""
    fp = modality.fingerprint()
    return {"backbone": fp["backbone"], "weights_sha256": fp["weights_sha256"], "feature_dim": fp["feature_dim"],
            "max_tokens": fp["max_tokens"], "preprocess_version": fp["preprocess_version"],
            "record_key": modality.spec.record_key, "metric_style": modality.spec.metric_style,
            "options": fp["options"], "language_slice": modality.language_slice(), **provenance(modality)}


# Options older models recorded for widths that are now read from the backbone.
_WIDTH_OPTIONS = ("feature_dim",)


def modality_from_meta(name: str, info: dict[str, Any], check_weights: bool = True) -> Modality:
    """Recreate a model's modality (importing the module recorded for it if need be) and check
    that its installed backbone is the one it was trained on."""
    cls = modality_class_for(name, info)
    options = dict(info["options"])
    for key in _WIDTH_OPTIONS:  # once hand-set widths, now read from the backbone (older models)
        if key in options and key not in cls.default_options:
            del options[key]
    modality = cls(**options)
    if modality.feature_dim != info["feature_dim"]:
        raise ChecksumError(f"the installed {name} backbone ({modality.backbone_id}) gives {modality.feature_dim}-wide "
                            f"features; this model was trained on {info['feature_dim']}-wide ones")
    if check_weights and modality.weights_sha256() != info["weights_sha256"]:
        raise ChecksumError(f"the installed {name} backbone ({modality.backbone_id}) has other weights than the "
                            "ones this model was trained with; reinstall the version recorded in oneencoder.json")
    return modality
