"""The model directory: ``oneencoder.json`` plus safetensors, every file checksummed.

::

    model/
      oneencoder.json              format, projection config, modalities, stage history, sha256 per file
      projection.safetensors       Universal Projection
      adapters/<modality>.safetensors   adapter + modality token

No pickle anywhere. A stage writes only the files it trained; the others stay byte-identical.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import ChecksumError, OneEncoderError
from .fileio import atomic_path, sha256_file, write_json_atomic
from .model import AdapterConfig, OneEncoderModel, ProjectionConfig, build_model
from .modality import Modality, modality_class_for, provenance

FORMAT_VERSION = 1
META = "oneencoder.json"
PROJECTION = "projection.safetensors"


def adapter_file(name: str) -> str:
    return f"adapters/{name}.safetensors"


def _save_module(module: torch.nn.Module, path: Path) -> str:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "oneencoder"})
    return sha256_file(path)


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / META
    if not path.is_file():
        raise OneEncoderError(f"{model_dir} is not a oneencoder model directory (no {META})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise OneEncoderError(f"{path}: corrupt JSON ({e.msg})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise OneEncoderError(f"{path}: format_version {meta.get('format_version')} is not supported (need {FORMAT_VERSION})")
    _register_recorded(meta)
    return meta


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
    """Write the trained parts and append a stage entry.

    Args:
        model: The model (all modalities it holds are recorded).
        model_dir: Target directory; an existing one keeps its other files untouched.
        modalities: Per-modality facts (backbone, weights sha256, options...).
        stage_entry: Stage name, data hash, config, metrics.
        write: Which parts to (re)write: ``"projection"`` and/or modality names.
    """
    model_dir = Path(model_dir)
    meta = read_meta(model_dir) if (model_dir / META).exists() else {
        "format_version": FORMAT_VERSION,
        "d_model": model.projection_config.d_model,
        "embed_dim": model.embed_dim,
        "projection": asdict(model.projection_config),
        "modalities": {},
        "stages": [],
        "files": {},
    }
    if "projection" in write:
        # A new projection invalidates every adapter trained against the old one.
        stale = [n for n in meta["modalities"] if n not in write]
        if stale:
            raise OneEncoderError(f"retraining the projection in {model_dir} would orphan adapters {stale}")
        meta.update({"d_model": model.projection_config.d_model, "embed_dim": model.embed_dim,
                     "projection": asdict(model.projection_config)})
        meta["files"][PROJECTION] = _save_module(model.projection, model_dir / PROJECTION)
    for name in write:
        if name == "projection":
            continue
        meta["files"][adapter_file(name)] = _save_module(model.adapters[name], model_dir / adapter_file(name))
        meta["modalities"][name] = {**modalities[name], "adapter": asdict(model.adapter_configs[name]),
                                    "language_source": model.prior.sources[name]}
    stages = [s for s in meta["stages"] if s.get("name") != stage_entry.get("name")]
    meta["stages"] = stages + [{**stage_entry, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
    write_json_atomic(model_dir / META, meta)
    return meta


def verify_files(model_dir: str | Path, meta: dict[str, Any]) -> None:
    """Raise ``ChecksumError`` naming the first file whose sha256 differs from the record."""
    model_dir = Path(model_dir)
    for rel, expected in meta["files"].items():
        path = model_dir / rel
        if not path.is_file():
            raise ChecksumError(f"{path} is missing from the model directory")
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumError(
                f"{path}: sha256 {actual[:12]}... does not match {expected[:12]}... recorded in {META}; "
                "the file was modified or corrupted"
            )


def load_model(model_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[OneEncoderModel, dict[str, Any]]:
    """Rebuild the model from a directory after verifying every checksum."""
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    verify_files(model_dir, meta)
    infos = meta["modalities"]
    model = build_model(ProjectionConfig(**meta["projection"]), infos,
                        {n: AdapterConfig(**info["adapter"]) for n, info in infos.items()})
    model.projection.load_state_dict(load_file(str(model_dir / PROJECTION), device=str(map_location)))
    for name in infos:
        model.adapters[name].load_state_dict(load_file(str(model_dir / adapter_file(name)), device=str(map_location)))
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
