"""``oneencoder cache ...``: run frozen backbones once per sample into the LMDB cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from oneencoder.data.manifest import read_manifest
from oneencoder.features.cache import build_cache, rejects_path
from oneencoder.features.shards import Shard, merge_shards
from oneencoder.features.workers import default_workers
from oneencoder.runtime import pick_device
from oneencoder.training.config import load_stage
from oneencoder.training.pairs import stage_modalities

from ._common import data_overrides, echo, quiet_libraries, user_errors

app = typer.Typer(help="Build and inspect feature caches.", no_args_is_help=True)


@app.command("build")
@user_errors
def build(
    stage: str = typer.Option("image_text", "--stage", "-s", help="Stage file (or shipped stage name)."),
    manifest: Optional[Path] = typer.Option(None, help="Manifest (default: the stage file's data.manifest)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache root (default: the stage file's data.cache_dir)."),
    batch_size: int = typer.Option(32, min=1, help="Samples per backbone batch."),
    workers: Optional[int] = typer.Option(
        None, min=0, help="DataLoader workers for decoding (default: on a GPU every core but one; on the CPU "
                          "the cores the backbone's threads leave free, 0 on 2 cores: decode between forwards)."),
    device: str = typer.Option("auto", help="cpu, cuda, mps or auto."),
    shard: Optional[str] = typer.Option(
        None, metavar="I/N", help="Build only shard I of N (a job array), into <cache>/shards/I-of-N; then run "
                                  "`oneencoder cache merge`. Under torchrun: shard RANK/WORLD_SIZE by default."),
) -> None:
    """Encode every sample of the stage's modalities once; resumes where it stopped.

    Samples whose caption or file changed since they were cached are re-encoded. Bad samples
    (missing/corrupt file, empty caption) go to <cache>/<modality>.rejects.jsonl.

    Example:  oneencoder cache build --stage image_text
    """
    quiet_libraries()
    part = Shard.parse(shard) if shard is not None else Shard.from_env()
    config = load_stage(stage, {"data": data_overrides(manifest, cache_dir)})
    records = read_manifest(config.data.manifest)
    where = pick_device(device)
    n_workers = default_workers(where) if workers is None else workers
    for name, modality in stage_modalities(config).items():
        report = build_cache(modality, records, config.data.cache_dir, batch_size=batch_size,
                             num_workers=n_workers, device=where, shard=part)
        echo((f"shard {part}: " if part else "") + report.summary())
        if report.rejects:
            root = part.root(config.data.cache_dir) if part else config.data.cache_dir
            echo(f"  rejects: {rejects_path(root, name)}")
    if part is not None:
        echo(f"when all {part.count} shards are built: oneencoder cache merge --stage {stage} "
             f"--cache-dir {config.data.cache_dir}")


@app.command("merge")
@user_errors
def merge(
    stage: str = typer.Option("image_text", "--stage", "-s", help="Stage file (or shipped stage name)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache root (default: the stage file's data.cache_dir)."),
    shards: Optional[int] = typer.Option(None, min=1, help="Merge the shards *-of-N (only needed when shards "
                                                            "of several counts exist)."),
    remove_shards: bool = typer.Option(False, "--remove-shards", help="Delete the shards once merged."),
) -> None:
    """Merge the shards of `cache build --shard i/n` into one cache; safe to rerun.

    Every shard must be finished and built with the stage's backbones (same fingerprint).

    Example:  oneencoder cache merge --stage image_text
    """
    quiet_libraries()
    config = load_stage(stage, {"data": data_overrides(None, cache_dir)})
    for name, modality in stage_modalities(config).items():
        report = merge_shards(name, modality.fingerprint(), config.data.cache_dir, count=shards,
                              remove=remove_shards)
        echo(report.summary())
        if report.rejects:
            echo(f"  rejects: {rejects_path(config.data.cache_dir, name)}")
