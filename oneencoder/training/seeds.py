"""One stage, several seeds: the model of the first seed, and mean ± std over all of them.

With a few hundred validation and test queries, two runs of one recipe differ by a few
R@1 points, so one number cannot tell two recipes apart. :func:`run_seeds` trains the
stage once per seed. The first seed writes the model directory as a plain run would; the
others train in temporary copies, which are removed, and leave only their results in
``runs/<stage>/seeds/seed-<k>.json``. A rerun reuses the results whose run settings are
unchanged, so an interrupted job resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from ..fileio import load_json_text, write_json_atomic
from ..model.checkpoint import read_meta
from .config import StageConfig
from .runs import RUN_SETTINGS
from .stage import run_stage

SEEDS_DIR = "seeds"
SUMMARY = "seeds.json"


def with_seed(config: StageConfig, seed: int) -> StageConfig:
    """``config`` with ``[train] seed`` replaced."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))


def seed_result(model_dir: Path, summary: dict[str, Any], seed: int) -> dict[str, Any]:
    """The numbers of one seed's run: validation of the kept epoch, and every test metric."""
    entry = next(e for e in read_meta(model_dir)["stages"] if e["name"] == summary["stage"])
    test = {d: dict(r["metrics"]) for d, r in summary["test"]["directions"].items()}
    for subset, directions in summary["test"].get("subsets", {}).items():
        test.update({f"{subset}:{d}": dict(r["metrics"]) for d, r in directions.items()})
    return {"seed": seed, "best_epoch": summary["best_epoch"], "val": dict(entry.get("val", {})), "test": test}


def _read(path: Path) -> Any:
    return load_json_text(path.read_text(encoding="utf-8"), str(path))


def _flatten(row: dict[str, Any]) -> dict[str, float]:
    flat = {f"val {k}": v for k, v in row["val"].items()}
    for direction, metrics in row["test"].items():
        flat.update({f"test {direction} {k}": v for k, v in metrics.items()})
    return flat


def mean_std(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{metric: {"mean", "std"}}`` over the seeds (sample std; 0 for one seed)."""
    flats = [_flatten(r) for r in rows]
    keys = [k for k in flats[0] if all(k in f for f in flats)]
    return {k: {"mean": statistics.mean(f[k] for f in flats),
                "std": statistics.stdev(f[k] for f in flats) if len(flats) > 1 else 0.0} for k in keys}


def train_in_copy(config: StageConfig, model_dir: Path | None, init_from: Path | None = None) -> dict[str, Any]:
    """One seed in a temporary folder, removed after: a fresh Stage 1, or the stage trained on a copy of
    ``model_dir`` (its adapter retrained if the model already holds one). Returns :func:`seed_result`."""
    work = Path(tempfile.mkdtemp(prefix=f"oneencoder-seed{config.train.seed}-"))
    try:
        stage1 = "projection" in config.trainable
        if not stage1:  # the earlier stages; --replace retrains this one if the model has it
            if model_dir is None:
                raise ConfigError(f"stage {config.name!r} builds on a trained model: name the model to copy")
            shutil.copytree(model_dir, work, dirs_exist_ok=True, ignore=shutil.ignore_patterns("runs"))
        summary = run_stage(config, work, resume=False, replace=not stage1, progress=False, init_from=init_from)
        return seed_result(work, summary, config.train.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        work.with_name(work.name + ".lock").unlink(missing_ok=True)  # the model writer's lock, beside the folder


def run_seeds(config: StageConfig, model_dir: str | Path, seeds: int, *, resume: bool = True,
              overwrite: bool = False, init_from: str | Path | None = None,
              on_seed: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """Train ``seeds`` seeds (``[train] seed``, +1, +2, …) and write ``runs/<stage>/seeds.json``.

    Returns ``{"first": <the first seed's run_stage summary>, "seeds": [per-seed results],
    "mean_std": {metric: {"mean", "std"}}}``, or None on a ``torchrun`` rank other than 0.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if seeds > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # extra seeds would train on rank 0 alone
        raise ConfigError("--seeds trains in one process; under torchrun, run one seed per call (--seed N)")
    model_dir = Path(model_dir)
    init_from = Path(init_from) if init_from else None
    first = run_stage(config, model_dir, resume=resume, overwrite=overwrite, init_from=init_from)
    if first is None:
        return None
    run_dir = model_dir / "runs" / config.name
    settings = _read(run_dir / RUN_SETTINGS)
    rows = [seed_result(model_dir, first, config.train.seed)]
    if on_seed:
        on_seed(rows[0])
    for k in range(1, seeds):
        seed = config.train.seed + k
        done = run_dir / SEEDS_DIR / f"seed-{seed}.json"
        stored = _read(done) if resume and done.exists() else None
        # A stored seed counts only if it ran with these settings (the seed aside).
        if stored is None or stored.get("settings") != {**settings, "seed": seed}:
            result = train_in_copy(with_seed(config, seed), model_dir, init_from)
            stored = {"settings": {**settings, "seed": seed}, "result": result}
            write_json_atomic(done, stored)
        rows.append(stored["result"])
        if on_seed:
            on_seed(rows[-1])
    spread = mean_std(rows)
    write_json_atomic(run_dir / SUMMARY, {"stage": config.name, "seeds": rows, "mean_std": spread})
    return {"first": first, "seeds": rows, "mean_std": spread}


def format_spread(spread: dict[str, dict[str, float]], n: int, columns: tuple[str, ...]) -> str:
    """Test metrics as ``direction: R@1 0.425 ± 0.007 …`` lines, then the validation score."""
    lines = [f"mean ± std over {n} seeds:"]
    directions = dict.fromkeys(k.split(" ")[1] for k in spread if k.startswith("test "))
    for direction in directions:
        cells = [f"{c} {spread[key]['mean']:.3f} ± {spread[key]['std']:.3f}" for c in columns
                 if (key := f"test {direction} {c}") in spread and not math.isnan(spread[key]["mean"])]
        lines.append(f"  test {direction}: " + "  ".join(cells))
    if "val score" in spread:
        lines.append(f"  validation score: {spread['val score']['mean']:.4f} ± {spread['val score']['std']:.4f}")
    return "\n".join(lines)
