"""``oneencoder data ...``: write JSONL manifests from real, locally installed data."""

from __future__ import annotations

from pathlib import Path

import typer

from oneencoder.datasets.tuxpaint import DEFAULT_ROOT, summarize, tuxpaint_records
from oneencoder.fileio import write_jsonl_atomic

from ._common import echo, user_errors

app = typer.Typer(help="Build dataset manifests (JSONL) from installed data.", no_args_is_help=True)


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
    records = tuxpaint_records(root)
    write_jsonl_atomic(out, records)
    stats = ", ".join(f"{k}={v}" for k, v in summarize(records).items())
    echo(f"wrote {out}: {stats}")
