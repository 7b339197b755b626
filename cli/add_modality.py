"""``oneencoder add-modality``: align a new modality to a trained model, everything else frozen."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Optional

import typer

from oneencoder.cache import build_cache
from oneencoder.checkpoint import modality_from_meta, read_meta
from oneencoder.config import parse_stage, resolve_stage_path
from oneencoder.errors import ConfigError
from oneencoder.manifest import read_manifest
from oneencoder.registry import create_modality, get_modality_class
from oneencoder.stage import run_stage

from ._common import echo, quiet_libraries, user_errors
from .train import print_results


def _stage_raw(modality: str, stage: Optional[str]) -> tuple[dict, str]:
    """The shipped (or given) stage file for this modality, or a minimal default."""
    try:
        path = resolve_stage_path(stage or modality)
    except ConfigError:
        if stage:
            raise
        return {"stage": {"name": f"add_{modality}", "modalities": [modality, "text"], "trainable": [modality]}}, "<default>"
    return tomllib.loads(path.read_text(encoding="utf-8")), str(path)


@user_errors
def add_modality(
    modality: str = typer.Argument(..., help="Registered modality to add, e.g. audio or molecule."),
    model: Path = typer.Option(Path("outputs/demo/model"), "--model", "-m", help="Trained model directory."),
    anchor: Optional[str] = typer.Option(None, help="Modality to align to (default: the modality's own default)."),
    data: Path = typer.Option(Path("outputs/demo/manifest.jsonl"), "--data", help="Manifest with both modalities."),
    cache_dir: Optional[Path] = typer.Option(None, help="Feature cache root (default: <data folder>/cache)."),
    stage: Optional[str] = typer.Option(None, help="Stage file (default: stages/<modality>.toml if shipped)."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Override train.epochs."),
    replace: bool = typer.Option(False, help="Retrain a modality the model already holds."),
    workers: int = typer.Option(2, min=0, help="DataLoader workers for decoding."),
) -> None:
    """Train only the new modality's adapter and token; the projection and earlier adapters stay byte-identical.

    Example:  oneencoder add-modality audio --model outputs/demo/model --anchor text --data outputs/demo/manifest.jsonl
    """
    quiet_libraries()
    raw, source = _stage_raw(modality, stage)
    anchor = anchor or get_modality_class(modality).spec.default_anchor or "text"
    raw.setdefault("stage", {}).update({"modalities": [modality, anchor], "trainable": [modality]})
    raw["data"] = {"manifest": str(data), "cache_dir": str(cache_dir or data.parent / "cache")}
    if epochs:
        raw.setdefault("train", {})["epochs"] = epochs
    raw["modalities"] = {k: v for k, v in raw.get("modalities", {}).items() if k in (modality, anchor)}
    config = parse_stage(raw, source)
    meta = read_meta(model)
    if anchor not in meta["modalities"]:
        raise ConfigError(f"--anchor {anchor}: the model holds {', '.join(meta['modalities'])}")
    records = read_manifest(config.data.manifest)
    to_cache = [create_modality(modality, **config.modality_options.get(modality, {}))]
    to_cache += [modality_from_meta(n, info) for n, info in meta["modalities"].items()
                 if n != modality and any(r.get(info["record_key"]) for r in records)]
    for m in to_cache:  # the new modality, the anchor, and the model's others for emergent pairs
        echo(build_cache(m, records, config.data.cache_dir, num_workers=workers).summary())
    summary = run_stage(config, model, replace=replace)
    echo(f"added {modality} (aligned to {anchor}): best epoch {summary['best_epoch']} of {summary['epochs_run']}, "
         f"{summary['train_seconds']} s")
    print_results(summary["test"])
