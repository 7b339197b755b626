"""``oneencoder demo``: the whole Stage-1 pipeline on the installed Tux Paint stamps."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from oneencoder.data.sources.tuxpaint import DEFAULT_ROOT, summarize, tuxpaint_records
from oneencoder.fileio import write_jsonl_atomic
from oneencoder.runtime import pick_device
from oneencoder.training.prepare import prepare_stage
from oneencoder.training.stage import run_stage

from ._common import echo, note, quiet_libraries, user_errors
from .train import print_results


#: Stage 1 of the demos: the best recipe measured (docs/results.md); ``image_text`` is the small,
#: fast one (MiniLM + Lite0) that tests and examples use.
DEMO_STAGE = "image_text_lit"


@user_errors
def demo(
    out: Path = typer.Option(Path("outputs/demo"), "--out", "-o", help="Folder for manifest, cache and model."),
    root: Path = typer.Option(DEFAULT_ROOT, help="Tux Paint stamps folder."),
    stage: str = typer.Option(DEMO_STAGE, help="Stage file to train."),
    workers: int = typer.Option(2, min=0, help="DataLoader workers for decoding images."),
) -> None:
    """Manifest -> feature cache -> Stage 1 training -> held-out evaluation -> model directory.

    Every step resumes: rerunning skips cached features and continues training.

    Example:  oneencoder demo --out outputs/demo
    """
    quiet_libraries()
    start = time.time()
    summary = run_stage1(out, root, stage, workers)
    note("[4/4] evaluation")
    print_results(summary["test"])
    model_dir = out / "model"
    echo(f"done in {time.time() - start:.0f} s. Try:\n"
         f"  .venv/bin/oneencoder info {model_dir}\n"
         f"  .venv/bin/python -c \"import oneencoder; m = oneencoder.load('{model_dir}'); "
         f"print(m.encode('text', ['a badger']).shape)\"")


def run_stage1(out: Path, root: Path = DEFAULT_ROOT, stage: str = DEMO_STAGE, workers: int = 2,
               step: str = "[{i}/4]", model_dir: Path | None = None) -> dict:
    """Tux Paint manifest, feature cache and Stage-1 training into ``out`` (the model into
    ``model_dir``, default ``out/model``); returns the stage summary."""
    manifest, cache_dir, model_dir = out / "manifest.jsonl", out / "cache", model_dir or out / "model"
    note(f"{step.format(i=1)} dataset manifest")
    records = tuxpaint_records(root)
    write_jsonl_atomic(manifest, records)
    note("  " + ", ".join(f"{k}={v}" for k, v in summarize(records).items()))
    note(f"{step.format(i=2)} feature cache (each frozen backbone runs once per sample)")
    prepared = prepare_stage(stage, model_dir=model_dir, manifest=manifest, cache_dir=cache_dir, workers=workers,
                             device=pick_device("auto"), log=lambda line: note(f"  {line}"))
    config = prepared.config
    note(f"{step.format(i=3)} train stage {config.name} -> {model_dir}")
    summary = run_stage(config, model_dir, resume=True, overwrite=True, restart_if_changed=True)
    note(f"  best epoch {summary['best_epoch']} of {summary['epochs_run']} ({summary['train_seconds']} s)")
    return summary
