"""``oneencoder add-modality``: align a new modality to a trained model, everything else frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from oneencoder.training.add_modality import add_modality as add_modality_to_model

from ._common import echo, note, quiet_libraries, user_errors
from .train import print_results


@user_errors
def add_modality(
    modality: str = typer.Argument(..., help="Registered modality to add, e.g. audio, molecule, depth, video."),
    model: Path = typer.Option(..., "--model", "-m", help="Trained model directory to extend (required: never a "
                                                     "default, so a forgotten flag cannot change the demo model)."),
    anchor: Optional[str] = typer.Option(None, help="Modality to align to (default: the modality's own default)."),
    data: Path = typer.Option(Path("outputs/demo/manifest.jsonl"), "--data", help="Manifest with both modalities."),
    cache_dir: Optional[Path] = typer.Option(None, help="Feature cache root (default: <data folder>/cache)."),
    stage: Optional[str] = typer.Option(None, help="Stage file (default: stages/<modality>.toml if shipped)."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Override train.epochs."),
    seed: Optional[int] = typer.Option(None, help="Override train.seed."),
    replace: bool = typer.Option(False, help="Retrain a modality the model already holds."),
    workers: int = typer.Option(2, min=0, help="DataLoader workers for decoding."),
) -> None:
    """Train only the new modality's adapter and token; the projection and earlier adapters stay byte-identical.

    Example:  oneencoder add-modality audio --model outputs/demo/model --anchor text --data outputs/audio/manifest.jsonl
    """
    quiet_libraries()
    summary = add_modality_to_model(modality, model, data, anchor=anchor, cache_dir=cache_dir, stage=stage,
                                    overrides={"train": {"epochs": epochs, "seed": seed}}, replace=replace,
                                    workers=workers, log=note)
    if summary is None:  # a rank > 0 under torchrun: rank 0 reports
        return
    echo(f"added {modality} (aligned to {summary['pair'][1]}): best epoch {summary['best_epoch']} of "
         f"{summary['epochs_run']}, {summary['train_seconds']} s")
    print_results(summary["test"])
