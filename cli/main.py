"""The ``oneencoder`` typer app: thin commands over the library."""

from __future__ import annotations

import typer

from . import cache, curriculum, data
from .add_modality import add_modality
from .demo import demo
from .demo_all import demo_all
from .embed import embed
from .evaluate import evaluate
from .info import info
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
app.add_typer(data.app, name="data")
app.add_typer(cache.app, name="cache")
app.add_typer(curriculum.app, name="curriculum")
app.command("train")(train)
app.command("eval")(evaluate)
app.command("embed")(embed)
app.command("info")(info)
app.command("add-modality")(add_modality)
app.command("demo")(demo)
app.command("demo-all")(demo_all)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
