"""Run settings and resume: a run resumes only with the settings, data and backbones it was made with."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError
from ..features.cache import cache_lock
from ..model.checkpoint import META
from ..model.transaction import JOURNAL, PENDING
from ..names import remove_tree_inside
from .config import StageConfig
from .distributed import launched_by_torchrun

RUN_SETTINGS = "settings.json"
# Train settings that do not change what is learned.
_UNLEARNED = ("device", "log_every", "eval_batch_size", "bank", "compile")


def _section_defaults() -> dict[str, Any]:
    """Each section's default values, as ``run_settings`` stores them."""
    out = {}
    for f in dataclasses.fields(StageConfig):
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(default := factory()):
            out[f.name] = json.loads(json.dumps(dataclasses.asdict(default)))
    return out


def run_settings(config: StageConfig, data_hash: str, metas: dict[str, dict]) -> dict[str, Any]:
    """What a run's result depends on: the stage settings, the data's content and the backbones."""
    settings = config.to_dict()
    settings.pop("source", None)
    settings["data"] = {"records_sha256": data_hash}  # the data, not where it lies
    settings["train"] = {k: v for k, v in settings["train"].items() if k not in _UNLEARNED}
    return json.loads(json.dumps({"stage": settings, "modalities": metas}))  # as stored: tuples become lists


_MISSING = object()


def _differences(old: Any, new: Any, prefix: str = "", defaults: Any = None) -> list[str]:
    """Dotted paths where ``old`` and ``new`` differ. A setting the old run did not record
    (an option added since) counts as unchanged while it keeps its default value."""
    if isinstance(old, dict) and isinstance(new, dict):
        defaults = defaults if isinstance(defaults, dict) else {}
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k, _MISSING), new.get(k, _MISSING), f"{prefix}{k}.",
                                      defaults.get(k, _MISSING))]
    if old is _MISSING and defaults is not _MISSING and new == defaults:
        return []
    return [] if old == new else [prefix.rstrip(".")]


def changed_settings(run_dir: Path, settings: dict[str, Any]) -> str | None:
    """None when the run in ``run_dir`` was made with ``settings``; else what differs."""
    path = run_dir / RUN_SETTINGS
    if not path.exists():
        return "made by an older oneencoder, without its settings"
    changed = _differences(json.loads(path.read_text()), settings, defaults={"stage": _section_defaults()})
    if not changed:
        return None
    return f"made with other settings (changed: {', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''})"


def remove_model_files(model_dir: Path) -> None:
    """Everything of an old model, including the runs of stages that built on its projection."""
    (model_dir / JOURNAL).unlink(missing_ok=True)  # an interrupted update of the old model
    for pending in [*model_dir.glob(f"*{PENDING}"), *model_dir.glob(f"adapters/*{PENDING}")]:
        pending.unlink()
    (model_dir / META).unlink(missing_ok=True)
    (model_dir / "projection.safetensors").unlink(missing_ok=True)
    remove_tree_inside(model_dir, "adapters")
    remove_tree_inside(model_dir, "runs")


_HELD: set[Path] = set()  # model directories this process holds the writer lock of


@contextlib.contextmanager
def model_writer(model_dir: str | Path) -> Iterator[None]:
    """Be the one process that writes ``model_dir``, or stop at once with one line.

    Two runs on one directory would interleave ``metrics.jsonl``, and each would record
    weights and settings the other overwrote. The lock is the feature cache's
    (:func:`oneencoder.features.cache.cache_lock`): ``<model>.lock`` beside the directory, not
    inside it (the directory's files are exactly the model's), released by the kernel
    when the process dies. Re-entrant within a process (``add_modality`` holds it around
    ``run_stage``). Under ``torchrun`` only rank 0 writes, so only rank 0 takes it, and
    before any collective: its refusal ends the job instead of leaving the others waiting.
    """
    if launched_by_torchrun() and os.environ.get("RANK", "0") != "0":
        yield
        return
    path = Path(model_dir).resolve()
    if path in _HELD:
        yield
        return
    if not path.name:
        raise ConfigError(f"--model {model_dir}: name a folder for the model, not the file system root")

    def busy(holder: str) -> str:
        who = f" (pid {holder})" if holder else ""
        return (f"{model_dir} is being written by another oneencoder process{who}; "
                "wait for it to finish or use another --model")

    def unwritable(e: OSError) -> str:
        return f"cannot write {model_dir}: {e.strerror} ({e.filename}); pick a writable --model"

    with cache_lock(path, busy=busy, unwritable=unwritable):
        _HELD.add(path)
        try:
            yield
        finally:
            _HELD.discard(path)
