"""Run folders: the settings a run resumes only with, and reading finished runs back.

A run folder (``<model>/runs/<stage>``) holds ``settings.json`` (what the result depends
on), ``metrics.jsonl`` (:mod:`oneencoder.training.report`), ``curves.png``, ``test.json``
and the resumable ``last.*`` state. :func:`list_runs` and :func:`compare_runs` read them
back for ``oneencoder runs list|compare``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError
from ..features.cache import cache_lock
from ..model.checkpoint import META
from ..model.transaction import JOURNAL, PENDING
from ..names import remove_tree_inside
from .config import StageConfig
from .curves import best_epoch
from .distributed import launched_by_torchrun
from .report import METRICS, read_metrics

RUN_SETTINGS = "settings.json"
# Train settings that do not change what is learned.
_UNLEARNED = ("device", "log_every", "eval_batch_size", "bank", "compile", "report_to")


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


def _differences(old: Any, new: Any, prefix: str = "", defaults: Any = None) -> list[tuple[str, Any, Any]]:
    """``(dotted path, old value, new value)`` where ``old`` and ``new`` differ (``_MISSING``
    where one lacks it). A setting one run did not record (an option added since) counts as
    unchanged while the other keeps its default value."""
    if isinstance(old, dict) and isinstance(new, dict):
        defaults = defaults if isinstance(defaults, dict) else {}
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k, _MISSING), new.get(k, _MISSING), f"{prefix}{k}.",
                                      defaults.get(k, _MISSING))]
    if defaults is not _MISSING and _MISSING in (old, new) and (new if old is _MISSING else old) == defaults:
        return []
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _setting_differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    return _differences(old, new, defaults={"stage": _section_defaults()})


def changed_settings(run_dir: Path, settings: dict[str, Any]) -> str | None:
    """None when the run in ``run_dir`` was made with ``settings``; else what differs."""
    path = run_dir / RUN_SETTINGS
    if not path.exists():
        return "made by an older oneencoder, without its settings"
    changed = [p for p, _, _ in _setting_differences(json.loads(path.read_text()), settings)]
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


# ----- finished runs, read back ---------------------------------------------------------


@dataclass
class RunSummary:
    """What a run folder says about its run (None / empty where it does not say)."""

    name: str  # the folder under <model>/runs (a stage name; decoder runs are nested)
    path: Path
    epochs: int  # validated epochs, from 1
    steps: int
    best_epoch: int | None
    best_score: float | None
    final_loss: float | None
    train_seconds: float | None
    val_at_best: dict[str, float] = field(default_factory=dict)  # val/* metrics of the kept epoch
    test: dict[str, dict[str, float]] = field(default_factory=dict)  # direction -> held-out metrics


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent, or cut by a kill: the run says nothing there
    return data if isinstance(data, dict) else None


def _run_name(run_dir: Path) -> str:
    """The run's path under the nearest ``runs`` folder above it (else the folder's name)."""
    for depth, parent in enumerate(run_dir.parents):
        if parent.name == "runs":
            return "/".join(run_dir.parts[-depth - 1:])
    return run_dir.name


def summarize_run(run_dir: str | Path) -> RunSummary:
    """Read one run folder: ``metrics.jsonl``, and ``test.json`` when the stage was tested."""
    run_dir = Path(run_dir)
    name = _run_name(run_dir.absolute())
    steps, vals = read_metrics(run_dir / METRICS)
    kept = best_epoch(vals)
    at_best = next((r for r in vals if kept and r["epoch"] == kept[0]), {})
    test = _read_json(run_dir / "test.json") or {}
    directions = (test.get("test") or {}).get("directions") or {}
    last_step = max([r["step"] for r in steps + vals], default=0)
    return RunSummary(
        name=name, path=run_dir, epochs=int(test.get("epochs_run", max([r["epoch"] for r in vals], default=0))),
        steps=int(test.get("steps", last_step)), best_epoch=kept[0] if kept else None,
        best_score=kept[1] if kept else None, final_loss=steps[-1]["loss"] if steps else None,
        train_seconds=test.get("train_seconds"),
        val_at_best={k: v for k, v in at_best.items() if k.startswith("val/")},
        test={d: dict(r.get("metrics", {})) for d, r in directions.items()})


def _is_run(path: Path) -> bool:
    return (path / METRICS).is_file() or (path / RUN_SETTINGS).is_file()


def run_dirs(model_dir: str | Path) -> list[Path]:
    """Every run folder of a model, in name order (decoder runs sit one level deeper)."""
    runs = Path(model_dir) / "runs"
    found = {p.parent for pattern in (METRICS, RUN_SETTINGS) for p in runs.rglob(pattern)}
    return sorted(found, key=lambda p: p.relative_to(runs).parts)


def list_runs(model_dir: str | Path) -> list[RunSummary]:
    """A summary of every run folder of the model in ``model_dir``.

    Raises:
        ConfigError: ``model_dir`` is not a folder, or holds no ``runs/`` folder.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "runs").is_dir():
        what = "has no runs/ folder (is it a model directory?)" if model_dir.is_dir() else "is not a folder"
        raise ConfigError(f"{model_dir} {what}")
    return [summarize_run(p) for p in run_dirs(model_dir)]


def resolve_run(path: str | Path, stage: str | None = None) -> Path:
    """A run folder as it is, or the run of ``stage`` in a model directory (its only run when it has one).

    Raises:
        ConfigError: naming ``path`` and what it holds instead.
    """
    path = Path(path)
    if _is_run(path):
        return path
    if not (path / "runs").is_dir():
        what = "is not a folder" if not path.is_dir() else ("is neither a run folder (with metrics.jsonl) "
                                                            "nor a model directory (with runs/)")
        raise ConfigError(f"{path} {what}")
    runs = path / "runs"
    names = ["/".join(p.relative_to(runs).parts) for p in run_dirs(path)]
    if stage is not None:
        if stage in names:
            return runs / stage
        raise ConfigError(f"{path} has no run of stage {stage!r} (its runs: {', '.join(names) or 'none'})")
    if len(names) == 1:
        return runs / names[0]
    raise ConfigError(f"{path} holds {len(names)} runs ({', '.join(names) or 'none'}); name one with --stage")


def distinct_labels(paths: list[Path]) -> list[str]:
    """The shortest tails of the run folders' paths (``runs/`` left out) that tell them apart."""
    parts = [[x for x in Path(p).absolute().parts if x != "runs"] for p in paths]
    for k in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(x[-k:]) for x in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]  # the same folder twice


@dataclass
class RunComparison:
    """Two runs side by side: the settings that differ, then their metrics (``a``, ``b`` values)."""

    a: RunSummary
    b: RunSummary
    settings: list[tuple[str, Any, Any]]  # dotted setting, value in a, value in b (None: not recorded)
    metrics: list[tuple[str, Any, Any]]
    notes: list[str] = field(default_factory=list)


def _metric_rows(a: RunSummary, b: RunSummary) -> list[tuple[str, Any, Any]]:
    rows: list[tuple[str, Any, Any]] = [(name, getattr(a, attr), getattr(b, attr)) for name, attr in (
        ("epochs", "epochs"), ("steps", "steps"), ("best epoch", "best_epoch"), ("best val/score", "best_score"),
        ("final loss", "final_loss"), ("train seconds", "train_seconds"))]
    for key in dict.fromkeys([*a.val_at_best, *b.val_at_best]):  # in logged order: R@1, R@5, R@10
        if key == "val/score":
            continue
        rows.append((f"{key} (kept epoch)", a.val_at_best.get(key), b.val_at_best.get(key)))
    for direction in sorted(set(a.test) | set(b.test)):
        for k in ("R@1", "R@5", "R@10", "MRR"):
            rows.append((f"test {direction} {k}", a.test.get(direction, {}).get(k), b.test.get(direction, {}).get(k)))
    return rows


def compare_runs(a: str | Path, b: str | Path) -> RunComparison:
    """Compare two run folders: settings that differ (from ``settings.json``), then metrics."""
    sa, sb = (summarize_run(p) for p in (a, b))
    settings_a, settings_b = (_read_json(Path(p) / RUN_SETTINGS) for p in (a, b))
    notes = [f"{p}: no readable {RUN_SETTINGS} (made by an older oneencoder): its settings are unknown"
             for p, s in ((a, settings_a), (b, settings_b)) if s is None]
    differ = _setting_differences(settings_a or {}, settings_b or {}) if not notes else []
    shown = [(path, None if x is _MISSING else x, None if y is _MISSING else y) for path, x, y in differ]
    return RunComparison(sa, sb, shown, _metric_rows(sa, sb), notes)
