"""The ``oneencoder`` typer app: thin commands over the library."""

from __future__ import annotations

from typing import List, Optional

import typer

from oneencoder.registry import import_plugins

from . import cache, curriculum, data, export, index
from ._common import user_errors as with_user_errors
from .add_modality import add_modality
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


@app.callback()
def _global_options(
    plugin: Optional[List[str]] = typer.Option(
        None, "--plugin", "-p", metavar="MODULE",
        help="Import MODULE first, so the modalities it registers can be used (repeatable). "
             "Installed plugins (entry point group oneencoder.modalities) need no flag."),
) -> None:
    """Options for every command."""
    with_user_errors(import_plugins)(tuple(plugin or ()))


app.add_typer(data.app, name="data")
app.add_typer(cache.app, name="cache")
app.add_typer(curriculum.app, name="curriculum")
app.add_typer(index.app, name="index")
app.add_typer(export.app, name="export")
app.command("train")(train)
app.command("eval")(evaluate)
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
