"""``oneencoder data ...``: write JSONL manifests from real, locally installed data."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import typer

from oneencoder.datasets.tuxpaint import DEFAULT_ROOT, summarize, tuxpaint_records
from oneencoder.fileio import write_jsonl_atomic

from ._common import echo, user_errors

app = typer.Typer(help="Build dataset manifests (JSONL) from installed data.", no_args_is_help=True)


def _write(out: Path, records: list[dict], summarize_fn: Callable[[list[dict]], dict]) -> None:
    write_jsonl_atomic(out, records)
    echo(f"wrote {out}: " + ", ".join(f"{k}={v}" for k, v in summarize_fn(records).items()))


@app.command("tuxpaint")
@user_errors
def tuxpaint(
    out: Path = typer.Option(Path("outputs/demo/manifest.jsonl"), "--out", "-o", help="Manifest to write."),
    root: Path = typer.Option(DEFAULT_ROOT, help="Tux Paint stamps folder."),
) -> None:
    """Image-caption(-sound) pairs from the Debian package tuxpaint-stamps-default.

    Splits by caption hash (test 20%, val 10%): no test caption is ever trained on.

    Example:  oneencoder data tuxpaint --out outputs/demo/manifest.jsonl
    """
    _write(out, tuxpaint_records(root), summarize)


@app.command("tuxpaint-audio")
@user_errors
def tuxpaint_audio(
    out: Path = typer.Option(Path("outputs/audio/manifest.jsonl"), "--out", "-o", help="Manifest to write."),
    root: Path = typer.Option(DEFAULT_ROOT, help="Tux Paint stamps folder."),
) -> None:
    """Stamps that have a sound effect: sound + caption + image, same caption-hash split.

    Example:  oneencoder data tuxpaint-audio --out outputs/audio/manifest.jsonl
    """
    _write(out, [r for r in tuxpaint_records(root) if r["sound"]], summarize)


@app.command("chemicals")
@user_errors
def chemicals(
    out: Path = typer.Option(Path("outputs/chemicals/manifest.jsonl"), "--out", "-o", help="Manifest to write."),
    limit: int = typer.Option(20000, min=10, help="Rows of the PubChem table to read."),
) -> None:
    """Molecule-name pairs from the PubChem table in the PyPI package `chemicals`; scaffold-disjoint split.

    Example:  oneencoder data chemicals --out outputs/chemicals/manifest.jsonl --limit 20000
    """
    from oneencoder.datasets.chemicals import chemicals_records, summarize as summarize_chemicals

    _write(out, chemicals_records(limit=limit), summarize_chemicals)
