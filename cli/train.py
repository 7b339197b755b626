"""``oneencoder train``: run one stage file with the generic trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from oneencoder.evaluation.calibration import format_gap_table
from oneencoder.evaluation.metrics import format_table
from oneencoder.features.workers import default_workers
from oneencoder.runtime import pick_device
from oneencoder.training.prepare import prepare_stage
from oneencoder.training.runs import model_writer
from oneencoder.training.seeds import format_spread, run_seeds
from oneencoder.training.stage import run_stage

from ._common import echo, note, quiet_libraries, user_errors


_COLUMNS = ("R@1", "R@5", "R@10", "MRR")  # R@K is Hits@K in Text2Mol's terms


def _table(directions: dict) -> str:
    """Value (chance) per cell; under each row its bootstrap 95 % intervals, when the results hold them."""
    rows = [(d, r["metrics"], r["chance"]) for d, r in directions.items()]
    return format_table(rows, _COLUMNS, [r.get("intervals") for r in directions.values()])


def print_results(test: dict) -> None:
    shown = "chance level in brackets"
    if any("intervals" in r for r in test["directions"].values()):
        shown += "; under each row, the 95 % bootstrap interval over queries"
    echo(f"held-out {test['split']} split ({shown}):")
    echo(_table(test["directions"]))
    if any("gap" in r for r in test["directions"].values()):
        echo(f"\nmodality gap (cosines) and match threshold (fitted on validation; precision on {test['split']}, "
             "validation's prediction in brackets):")
        echo(format_gap_table(test["directions"]))
    for subset, directions in test.get("subsets", {}).items():
        echo(f"\n{test['split']} subset held out by {subset}:")
        echo(_table(directions))


@user_errors
def train(
    stage: str = typer.Option(..., "--stage", "-s", help="Stage file (or shipped stage name, e.g. image_text)."),
    model: Path = typer.Option(..., "--model", "-m", help="Model directory to write (required: never a default, so "
                                                     "a forgotten flag cannot change the demo model)."),
    manifest: Optional[Path] = typer.Option(None, help="Override the stage file's data.manifest."),
    cache_dir: Optional[Path] = typer.Option(None, help="Override the stage file's data.cache_dir."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Override train.epochs."),
    seed: Optional[int] = typer.Option(None, help="Override train.seed."),
    device: Optional[str] = typer.Option(None, help="Override train.device (cpu, cuda, mps, auto)."),
    overwrite: bool = typer.Option(False, help="Retrain Stage 1 into a directory that already holds a model."),
    resume: bool = typer.Option(True, help="Continue an interrupted run of the same stage."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", metavar="MODEL_DIR",
                                             help="Fine-tune Stage 1 from this model's projection and adapters "
                                                  "(same backbones and shapes) instead of from scratch."),
    workers: Optional[int] = typer.Option(None, min=0, help="DataLoader workers for decoding samples the feature "
                                                            "cache lacks (default: as `cache build`)."),
    seeds: int = typer.Option(1, min=1, help="Train this many seeds (train.seed, +1, …) and report mean ± std; "
                                             "the model directory keeps the first seed's model."),
) -> None:
    """Cache missing features, train a stage from them, keep the best checkpoint, report test metrics.

    Samples the feature cache lacks are encoded first, as `oneencoder cache build` does.

    Example:  oneencoder train --stage image_text --model outputs/demo/model

    Fine-tune:  oneencoder train --stage my_stage.toml --model outputs/mine --init-from outputs/demo/model

    Error bars:  oneencoder train --stage image_text --model outputs/mine --seeds 3

    Several processes:  torchrun --nproc-per-node 2 -m oneencoder.cli.main train --stage image_text
    (batch_size is per process; see docs/scale.md)
    """
    quiet_libraries()
    prepared = prepare_stage(stage, model_dir=model, manifest=manifest, cache_dir=cache_dir,
                             overrides={"train": {"epochs": epochs, "seed": seed, "device": device}},
                             build_caches=False)
    config = prepared.config
    with model_writer(model):  # a second writer stops before it caches anything
        where = pick_device(config.train.device)  # the backbones run where the stage trains
        prepared.build_caches(workers=default_workers(where) if workers is None else workers, device=where,
                              log=note, quiet_when_cached=True)
        if seeds == 1:
            summary = run_stage(config, model, resume=resume, overwrite=overwrite, init_from=init_from)
        else:
            result = run_seeds(config, model, seeds, resume=resume, overwrite=overwrite, init_from=init_from,
                               on_seed=lambda r: note(f"seed {r['seed']}: validation score {r['val']['score']:.4f}"))
            summary = result and result["first"]
    if summary is None:  # a rank > 0 under torchrun: rank 0 reports
        return
    echo(f"stage {config.name}: best epoch {summary['best_epoch']} of {summary['epochs_run']}, "
         f"{summary['steps']} steps, {summary['train_seconds']} s; model in {model}")
    print_results(summary["test"])
    if seeds > 1:
        echo("\n" + format_spread(result["mean_std"], seeds, _COLUMNS))
        echo(f"(the model is seed {config.train.seed}'s; every seed's numbers: {model}/runs/{config.name}/seeds.json)")
