"""``oneencoder curriculum ...``: difficulty scores and an explainable report."""

from __future__ import annotations

import webbrowser
from pathlib import Path
from typing import Optional

import typer

from oneencoder.data.manifest import read_manifest
from oneencoder.training.config import load_stage
from oneencoder.training.curriculum.report import write_report
from oneencoder.training.curriculum.scorers import trust_source
from oneencoder.training.pairs import stage_difficulty

from ._common import data_overrides, echo, quiet_libraries, user_errors

app = typer.Typer(help="Curriculum: difficulty scores, pacing, report.", no_args_is_help=True)


def _config(stage: str, manifest: Optional[Path], cache_dir: Optional[Path]):  # noqa: ANN202
    return load_stage(stage, {"data": data_overrides(manifest, cache_dir)})


@app.command("score")
@user_errors
def score(
    stage: str = typer.Option("image_text", "--stage", "-s", help="Stage file (or shipped stage name)."),
    manifest: Optional[Path] = typer.Option(None, help="Override the stage file's data.manifest."),
    cache_dir: Optional[Path] = typer.Option(None, help="Override the stage file's data.cache_dir."),
    scorers: Optional[str] = typer.Option(None, help="Comma-separated scorers (default: every registered one)."),
) -> None:
    """Compute every difficulty scorer on the stage's training pairs; stored next to the cache.

    Example:  oneencoder curriculum score --stage image_text
    """
    quiet_libraries()
    config = _config(stage, manifest, cache_dir)
    names = [s.strip() for s in scorers.split(",")] if scorers else None
    table, path = stage_difficulty(config, read_manifest(config.data.manifest), scorers=names, force=True)
    echo(f"scored {len(table.ids)} training pairs with {', '.join(table.scores)} -> {path}")
    scorer, measurement = trust_source(table.scores)
    clean = table.measurements.get(scorer, {}).get(measurement)
    if clean is not None:
        suspect = int((clean < 0.5).sum())
        echo(f"{scorer}: about {1 - float(clean.mean()):.1%} of the pairs look wrong "
             f"({suspect} with clean probability < 0.5); see `oneencoder curriculum report`")


@app.command("report")
@user_errors
def report(
    stage: str = typer.Option("image_text", "--stage", "-s", help="Stage file (or shipped stage name)."),
    out: Path = typer.Option(Path("outputs/demo/curriculum-report"), "--out", "-o", help="Report folder."),
    manifest: Optional[Path] = typer.Option(None, help="Override the stage file's data.manifest."),
    cache_dir: Optional[Path] = typer.Option(None, help="Override the stage file's data.cache_dir."),
    pacer: Optional[str] = typer.Option(None, help="Plot this pacer instead of the stage's."),
    open_browser: bool = typer.Option(False, "--open", help="Open the page in a browser."),
) -> None:
    """HTML page: difficulty per scorer, scorer correlations, pacing schedule, easiest/hardest samples.

    Example:  oneencoder curriculum report --stage stages/image_text.toml --out outputs/demo/curriculum-report
    """
    quiet_libraries()
    config = _config(stage, manifest, cache_dir)
    records = read_manifest(config.data.manifest)
    table, _ = stage_difficulty(config, records)
    cur = config.curriculum
    steps = config.train.epochs * max(1, len(table.ids) // min(config.train.batch_size, len(table.ids)))
    weights = cur.scorers
    page = write_report(table, records, out, stage_name=config.name, weights=weights, pacer=pacer or cur.pacer,
                        pacer_options=cur.pacer_options if not pacer else {}, total_steps=steps,
                        hard_negatives=(cur.hn_start, cur.hard_negatives))
    echo(f"wrote {page}")
    if open_browser:
        webbrowser.open(page.resolve().as_uri())
