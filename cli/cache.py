"""``oneencoder cache ...``: run frozen backbones once per sample into the LMDB cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from oneencoder.features.cache import rejects_path
from oneencoder.features.runtime import check_runtime
from oneencoder.features.shards import Shard, merge_shards
from oneencoder.features.workers import default_workers
from oneencoder.runtime import pick_device
from oneencoder.training.prepare import prepare_stage

from ._common import echo, quiet_libraries, user_errors

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
    runtime: str = typer.Option(
        "torch", help="Where the backbones run: torch, onnx (onnxruntime, the graph exported once per backbone "
                      "beside the cache) or auto (the fastest path on this machine that matches fp32 PyTorch to "
                      "cosine 0.9999, measured once and remembered). Modalities whose backbone is no exportable "
                      "graph stay on torch."),
    precision: str = typer.Option(
        "fp32", help="fp32 or bf16 (torch autocast; its features get their own cache fingerprint)."),
    views: Optional[int] = typer.Option(
        None, min=1, max=64, help="Augmented views per sample of the stage's trainable modalities, view 0 the "
                                  "plain one (default: the stage's [data] views). Views 1..K-1 go to "
                                  "<cache>/<modality>.views/<k>; train with [data] views = K."),
) -> None:
    """Encode every sample of the stage's modalities once; resumes where it stopped.

    Samples whose caption or file changed since they were cached are re-encoded. Bad samples
    (missing/corrupt file, empty caption) go to <cache>/<modality>.rejects.jsonl.

    Example:  oneencoder cache build --stage image_text --views 4
    Example:  oneencoder cache build --stage image_text --runtime auto
    """
    quiet_libraries()
    check_runtime(runtime, precision)
    part = Shard.parse(shard) if shard is not None else Shard.from_env()
    overrides = {"data": {"views": views}} if views is not None else None
    prepared = prepare_stage(stage, manifest=manifest, cache_dir=cache_dir, overrides=overrides, build_caches=False)
    where = pick_device(device)
    n_workers = default_workers(where) if workers is None else workers
    prepared.build_caches(batch_size=batch_size, workers=n_workers, device=where, shard=part, log=echo,
                           runtime=runtime, precision=precision)
    config = prepared.config
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
    prepared = prepare_stage(stage, cache_dir=cache_dir, build_caches=False, need_records=False)
    for name, modality in prepared.modalities.items():
        report = merge_shards(name, modality.fingerprint(), prepared.cache_dir, count=shards, remove=remove_shards)
        echo(report.summary())
        if report.rejects:
            echo(f"  rejects: {rejects_path(prepared.cache_dir, name)}")
