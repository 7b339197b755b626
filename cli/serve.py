"""``oneencoder serve``: a retrieval explorer in the browser over one model and its indexes."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from oneencoder.errors import OneEncoderError

from ._common import quiet_libraries, user_errors


@user_errors
def serve(
    model: Path = typer.Option(..., "--model", "-m", help="Model directory."),
    index: List[Path] = typer.Option(..., "--index", "-i", help="Index directory (repeatable)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port (0: any free port)."),
    k: int = typer.Option(8, "--k", "-k", min=1, max=100, help="Results shown per index."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps"),
    workers: int = typer.Option(2, "--workers", min=1, max=64,
                                help="Processes that decode queries and draw molecules (queries read at once)."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1,
                                  help="Seconds one query may take to decode before it is stopped (a 400)."),
) -> None:
    """Serve one page: type text, upload an image or a sound, or paste SMILES; see every index's top k.

    Example:  oneencoder serve --model outputs/demo/model --index outputs/demo/index-image
    """
    quiet_libraries()
    from oneencoder.apps.serve import create_app, run

    app = create_app(model, index, k=k, device=device, workers=workers, timeout=timeout)
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"warning: serving on {host}: anyone who can reach this address can query the model", err=True)
    try:
        run(app, host=host, port=port)
    except OSError as e:
        raise OneEncoderError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
