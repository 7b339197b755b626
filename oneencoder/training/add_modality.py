"""Progressive alignment as a library call: add one modality to a trained model.

Only the new modality's adapter and token train; the Universal Projection and
every earlier adapter stay byte-identical (their checksums are verified at load).

Example:
    >>> from oneencoder.training.add_modality import add_modality
    >>> summary = add_modality("audio", "outputs/demo/model", "outputs/audio/manifest.jsonl")
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from ..modality import get_modality_class
from ..model.checkpoint import read_meta
from ..names import safe_name
from ..progress import status
from ..registry import import_plugins
from .config import StageConfig, parse_stage, resolve_stage_path
from .prepare import prepare_stage
from .runs import model_writer
from .stage import run_stage


def _stage_raw(modality: str, stage: str | Path | None) -> tuple[dict, str]:
    """The shipped (or given) stage file for this modality, or a minimal default."""
    try:
        path = resolve_stage_path(stage or modality)
    except ConfigError:
        if stage:
            raise
        return {"stage": {"name": f"add_{modality}"}}, "<default>"
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")), str(path)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None


def _default_anchor(modality: str) -> str:
    anchor = get_modality_class(modality).spec.default_anchor
    if not anchor:
        raise ConfigError(f"modality {modality!r} names no default_anchor in its spec; pass --anchor")
    return anchor


def add_modality_config(modality: str, manifest: str | Path, *, anchor: str | None = None,
                        cache_dir: str | Path | None = None, stage: str | Path | None = None,
                        overrides: dict[str, dict[str, Any]] | None = None) -> StageConfig:
    """The stage config of an add-modality run: ``stages/<modality>.toml`` (if shipped) with the
    pair set to ``(modality, anchor)``, only ``modality`` trainable, and the given data."""
    # The name picks a stage file and becomes a cache folder and an adapter file: check it first.
    safe_name(modality, "modality")
    if anchor is not None:
        safe_name(anchor, "--anchor")
    raw, source = _stage_raw(modality, stage)
    plugins = raw.get("stage", {}).get("plugins", [])
    if isinstance(plugins, list):  # they may define the modality itself (parse_stage checks the type)
        import_plugins([p for p in plugins if isinstance(p, str)], f"{source}: [stage] plugins")
    anchor = anchor or _default_anchor(modality)
    raw.setdefault("stage", {}).update({"modalities": [modality, anchor], "trainable": [modality]})
    manifest = Path(manifest)
    raw["data"] = {"manifest": str(manifest), "cache_dir": str(cache_dir or manifest.parent / "cache")}
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    raw["modalities"] = {k: v for k, v in raw.get("modalities", {}).items() if k in (modality, anchor)}
    return parse_stage(raw, source)


def add_modality(modality: str, model_dir: str | Path, manifest: str | Path, *, anchor: str | None = None,
                 cache_dir: str | Path | None = None, stage: str | Path | None = None,
                 overrides: dict[str, dict[str, Any]] | None = None, replace: bool = False,
                 restart_if_changed: bool = False, workers: int = 2, log: Callable[[str], None] = status,
                 progress: bool = True) -> dict[str, Any] | None:
    """Cache features, then train ``modality`` against the frozen ``anchor`` of ``model_dir``.

    Features are cached for the new modality, the anchor and every other modality the
    model holds whose inputs the manifest has (their test pairs are the emergent ones).

    A rerun resumes the stage's run; if its settings or data changed since, that is an
    error (``replace`` starts over), or with ``restart_if_changed`` it starts over.

    A second writer of ``model_dir`` (``train``, ``add-modality``) stops at once with one
    line; the lock is held from before caching until the model directory is final.

    Returns:
        The stage summary: best epoch, timings and held-out test results in every direction
        (None on ranks > 0 under ``torchrun``).
    """
    config = add_modality_config(modality, manifest, anchor=anchor, cache_dir=cache_dir, stage=stage,
                                 overrides=overrides)
    read_meta(model_dir)  # not a model directory: say so before making a lock beside it
    with model_writer(model_dir):
        return _add_modality(config, modality, model_dir, replace, restart_if_changed, workers, log, progress)


def _add_modality(config: StageConfig, modality: str, model_dir: str | Path, replace: bool, restart_if_changed: bool,
                  workers: int, log: Callable[[str], None], progress: bool) -> dict[str, Any] | None:
    """:func:`add_modality` with the model directory's writer lock held."""
    anchor = config.modalities[1]
    meta = read_meta(model_dir)
    for name in meta["modalities"]:  # names read from the model become cache folders
        safe_name(name, f"{model_dir}/oneencoder.json: modality")
    if anchor not in meta["modalities"]:
        raise ConfigError(f"--anchor {anchor}: the model holds {', '.join(meta['modalities'])}")
    # The new modality, the anchor as the model holds it, and the model's other modalities the
    # manifest has inputs for (their test pairs are the emergent ones): each cached once.
    prepare_stage(config, model_dir=model_dir, workers=workers, progress=progress, log=log)
    return run_stage(config, model_dir, replace=replace, restart_if_changed=restart_if_changed, progress=progress)
