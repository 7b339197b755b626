"""``oneencoder cache ...``: run frozen backbones once per sample into the LMDB cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from oneencoder.cache import build_cache, rejects_path
from oneencoder.config import load_stage
from oneencoder.manifest import read_manifest
from oneencoder.pairs import stage_modalities
from oneencoder.runtime import pick_device

from ._common import data_overrides, echo, quiet_libraries, user_errors

app = typer.Typer(help="Build and inspect feature caches.", no_args_is_help=True)


@app.command("build")
@user_errors
def build(
    stage: str = typer.Option("image_text", "--stage", "-s", help="Stage file (or shipped stage name)."),
    manifest: Optional[Path] = typer.Option(None, help="Manifest (default: the stage file's data.manifest)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache root (default: the stage file's data.cache_dir)."),
    batch_size: int = typer.Option(32, min=1, help="Samples per backbone batch."),
    workers: int = typer.Option(2, min=0, help="DataLoader workers for decoding."),
    device: str = typer.Option("auto", help="cpu, cuda, mps or auto."),
) -> None:
    """Encode every sample of the stage's modalities once; resumes where it stopped.

    Bad samples (missing/corrupt file, empty caption) go to <cache>/<modality>.rejects.jsonl.

    Example:  oneencoder cache build --stage image_text
    """
    quiet_libraries()
    config = load_stage(stage, {"data": data_overrides(manifest, cache_dir)})
    records = read_manifest(config.data.manifest)
    for name, modality in stage_modalities(config).items():
        report = build_cache(modality, records, config.data.cache_dir, batch_size=batch_size,
                             num_workers=workers, device=pick_device(device))
        echo(report.summary())
        if report.rejects:
            echo(f"  rejects: {rejects_path(config.data.cache_dir, name)}")
