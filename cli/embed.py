"""``oneencoder embed``: embed inputs into the shared space and save them as .npy."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

from oneencoder.errors import OneEncoderError
from oneencoder.features.runtime import check_runtime
from oneencoder.evaluation.metrics import format_number
from oneencoder.fileio import atomic_path, ensure_writable, not_utf8, write_json_atomic
from oneencoder.training.prepare import prepare_stage

from ._common import (CACHE_DIR_HELP, NO_CACHE_HELP, PRECISION_HELP, RUNTIME_HELP, echo, input_cache, note,
                      prepared_model, quiet_libraries, runtime_notes, user_errors)


def read_lines(path: Path, option: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped; a bad file is one error naming the line."""
    if not path.is_file():
        raise OneEncoderError(f"{option} {path} not found")
    lines = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
        except UnicodeDecodeError as e:
            raise OneEncoderError(not_utf8(f"{option} {path}:{lineno}", e)) from None
        if line:
            lines.append(line)
    return lines


@user_errors
def embed(
    modality: str = typer.Argument(..., help="Modality of the inputs, e.g. text or image."),
    inputs: List[str] = typer.Argument(None, help="Texts, or file paths for file modalities."),
    model: Path = typer.Option(Path("outputs/demo/model"), "--model", "-m", help="Model directory."),
    from_file: Optional[Path] = typer.Option(None, "--from-file", "-f", help="Read inputs one per line."),
    out: Path = typer.Option(Path("embeddings.npy"), "--out", "-o", help="Output .npy (N x d, float32)."),
    query: Optional[str] = typer.Option(None, help="Also rank the inputs against this text query."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
    no_cache: bool = typer.Option(False, "--no-cache", help=NO_CACHE_HELP),
    runtime: str = typer.Option("torch", "--runtime", help=RUNTIME_HELP),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
) -> None:
    """Embed inputs; writes <out> and <out>.json listing the inputs in row order.

    Example:  oneencoder embed image /usr/share/tuxpaint/stamps/animals/*.png --query "A cat."
    """
    quiet_libraries()
    check_runtime(runtime, precision)  # before the model loads
    items = list(inputs or [])
    if from_file:
        items += read_lines(from_file, "--from-file")
    if not items:
        raise OneEncoderError("no inputs: pass them as arguments or with --from-file")
    ensure_writable(out)  # before loading backbones and embedding
    ensure_writable(out.with_suffix(out.suffix + ".json"))
    prepared = prepare_stage(model_dir=model, cache_dir=cache_dir, modalities=[modality], build_caches=False)
    m = prepared_model(prepared, runtime=runtime, precision=precision)
    with input_cache(prepared, modality, no_cache) as cache:
        emb = m.encode(modality, items, cache=cache)
    runtime_notes(m)
    if cache is not None:
        note(cache.summary())
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, emb.numpy().astype(np.float32))
    write_json_atomic(out.with_suffix(out.suffix + ".json"), {"modality": modality, "inputs": items})
    echo(f"wrote {out}: {tuple(emb.shape)}")
    if query:
        scores = m.similarity(m.encode("text", [query]), emb)[0]
        for rank, i in enumerate(scores.argsort(descending=True)[:10].tolist(), 1):
            echo(f"{rank:2d}. {format_number(scores[i], signed=True)}  {items[i]}")
