"""The ``oneencoder`` typer app: thin commands over the library."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import List, Optional

import typer

from oneencoder import __version__
from oneencoder.progress import configure
from oneencoder.registry import import_plugins

from . import cache, curriculum, data, export, index, runs
from ._common import set_debug, user_errors as with_user_errors
from .add_modality import add_modality
from .caption import caption, train_decoder
from .calibrate import calibrate
from .classify import classify
from .demo import demo
from .demo_all import demo_all
from .embed import embed
from .evaluate import evaluate
from .info import info
from .search import search
from .serve import serve
from .train import train

app = typer.Typer(
    name="oneencoder",
    help="Progressive multi-modal alignment on frozen backbones.\n\n"
    "Quick start:  oneencoder demo   (Tux Paint image-text Stage 1, then eval)\n\n"
    "Six modalities:  oneencoder demo-all   (then audio, molecules, depth, video)",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"oneencoder {__version__} (torch {_installed('torch')}, Python {platform.python_version()})")
        raise typer.Exit()


def _installed(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


@app.callback()
def _global_options(
    plugin: Optional[List[str]] = typer.Option(
        None, "--plugin", "-p", metavar="MODULE",
        help="Import MODULE first, so the modalities it registers can be used (repeatable). "
             "Installed plugins (entry point group oneencoder.modalities) need no flag."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="Print only results and errors: no progress bars, no status lines."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (status lines stay)."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug",
                               help="Print the traceback behind a one-line error (as ONEENCODER_DEBUG=1 does)."),
) -> None:
    """Options for every command; they go before it: oneencoder --quiet train --stage image_text."""
    set_debug(debug)  # first: a --plugin that fails to import below is shown with its traceback
    configure(progress=False if no_progress else None, quiet=True if quiet else None)
    with_user_errors(import_plugins)(tuple(plugin or ()))


app.add_typer(data.app, name="data")
app.add_typer(cache.app, name="cache")
app.add_typer(curriculum.app, name="curriculum")
app.add_typer(index.app, name="index")
app.add_typer(export.app, name="export")
app.add_typer(runs.app, name="runs")
app.command("train")(train)
app.command("train-decoder")(train_decoder)
app.command("caption")(caption)
app.command("eval")(evaluate)
app.command("calibrate")(calibrate)
app.command("embed")(embed)
app.command("info")(info)
app.command("search")(search)
app.command("classify")(classify)
app.command("serve")(serve)
app.command("add-modality")(add_modality)
app.command("demo")(demo)
app.command("demo-all")(demo_all)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
