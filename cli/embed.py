"""``oneencoder embed``: embed inputs into the shared space and save them as .npy."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

import oneencoder
from oneencoder.errors import OneEncoderError
from oneencoder.fileio import atomic_path, write_json_atomic

from ._common import echo, quiet_libraries, user_errors


@user_errors
def embed(
    modality: str = typer.Argument(..., help="Modality of the inputs, e.g. text or image."),
    inputs: List[str] = typer.Argument(None, help="Texts, or file paths for file modalities."),
    model: Path = typer.Option(Path("outputs/demo/model"), "--model", "-m", help="Model directory."),
    from_file: Optional[Path] = typer.Option(None, "--from-file", "-f", help="Read inputs one per line."),
    out: Path = typer.Option(Path("embeddings.npy"), "--out", "-o", help="Output .npy (N x d, float32)."),
    query: Optional[str] = typer.Option(None, help="Also rank the inputs against this text query."),
) -> None:
    """Embed inputs; writes <out> and <out>.json listing the inputs in row order.

    Example:  oneencoder embed image /usr/share/tuxpaint/stamps/animals/*.png --query "A cat."
    """
    quiet_libraries()
    items = list(inputs or [])
    if from_file:
        if not from_file.is_file():
            raise OneEncoderError(f"--from-file {from_file} not found")
        items += [line.strip() for line in from_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not items:
        raise OneEncoderError("no inputs: pass them as arguments or with --from-file")
    m = oneencoder.load(model)
    emb = m.encode(modality, items)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, emb.numpy().astype(np.float32))
    write_json_atomic(out.with_suffix(out.suffix + ".json"), {"modality": modality, "inputs": items})
    echo(f"wrote {out}: {tuple(emb.shape)}")
    if query:
        scores = m.similarity(m.encode("text", [query]), emb)[0]
        for rank, i in enumerate(scores.argsort(descending=True)[:10].tolist(), 1):
            echo(f"{rank:2d}. {scores[i]:+.3f}  {items[i]}")
