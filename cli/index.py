"""``oneencoder index build``: embed a manifest, a folder or a list file into a searchable index."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from oneencoder.apps.index import KINDS
from oneencoder.apps.index_build import build_index, read_sources
from oneencoder.errors import OneEncoderError
from oneencoder.features.runtime import check_runtime
from oneencoder.training.prepare import prepare_stage

from ._common import (CACHE_DIR_HELP, NO_CACHE_HELP, PRECISION_HELP, RUNTIME_HELP, echo, input_cache, prepared_model,
                      quiet_libraries, runtime_notes, user_errors)

app = typer.Typer(help="Vector indexes for `oneencoder search` and `oneencoder serve`.", no_args_is_help=True)


@app.command("build")
@user_errors
def build(
    model: Path = typer.Option(..., "--model", "-m", help="Model directory."),
    modality: str = typer.Option(..., "--modality", help="Modality of the indexed inputs, e.g. image."),
    data: Path = typer.Option(..., "--data", "-d",
                              help="Manifest (.jsonl), folder (its files of the modality), or a list file "
                                   "(.txt/.smi, one input per line)."),
    out: Path = typer.Option(..., "--out", "-o", help="Index directory to write."),
    kind: str = typer.Option("auto", help=f"{' | '.join(KINDS)}: auto is exact up to 100,000 vectors, "
                                          "a faiss IVF index above."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Inputs per backbone forward."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an index already at --out."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue an interrupted build."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
    no_cache: bool = typer.Option(False, "--no-cache", help=NO_CACHE_HELP),
    runtime: str = typer.Option("torch", "--runtime", help=RUNTIME_HELP),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
) -> None:
    """Embed every input and write vectors, items, the model's checksums and rejects to --out.

    Inputs the feature cache holds (same backbone, same file or text) are embedded from their
    cached features instead of being encoded again; the last line says how many.

    Example:  oneencoder index build --model outputs/demo/model --modality image
    --data outputs/demo/manifest.jsonl --out outputs/demo/index-image
    """
    quiet_libraries()
    check_runtime(runtime, precision)  # before the model loads
    if kind not in KINDS:
        raise OneEncoderError(f"--kind {kind!r}: use one of {', '.join(KINDS)}")
    manifest = data if data.suffix.lower() == ".jsonl" and data.is_file() else None
    prepared = prepare_stage(model_dir=model, manifest=manifest, cache_dir=cache_dir, modalities=[modality],
                             build_caches=False)
    m = prepared_model(prepared, device, runtime, precision)
    sources, without = read_sources(data, modality, prepared.records if manifest else None)
    with input_cache(prepared, modality, no_cache) as cache:
        report = build_index(m, modality, sources, out, kind=kind, batch_size=batch_size, progress=progress,
                             resume=resume, overwrite=overwrite, extra={"data": str(data.resolve())}, cache=cache)
    report.without_input = without
    runtime_notes(m)
    echo(report.summary())
    if cache is not None:
        echo(cache.summary())
