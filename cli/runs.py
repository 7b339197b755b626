"""``oneencoder runs list|compare``: what each training run of a model did, and two runs side by side."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import typer

from oneencoder.errors import OneEncoderError
from oneencoder.evaluation.metrics import format_number
from oneencoder.fileio import ensure_writable
from oneencoder.training.curves import plot_curves
from oneencoder.training.runs import RunSummary, compare_runs, distinct_labels, list_runs, resolve_run

from ._common import echo, note, user_errors
from .search import strict_json

app = typer.Typer(help="List a model's training runs, compare two runs.", no_args_is_help=True)


_WIDEST = 60  # characters of a setting's value shown (a backbone's whole record would fill the screen)


def _shown(value: Any) -> str:
    """A metric as every metric is shown (3 decimals); ``-`` where a run has none."""
    if value is None:
        return "-"
    return format_number(value) if isinstance(value, float) else str(value)


def _setting(value: Any) -> str:
    """A setting as written in settings.json (``0.0003``, not rounded), cut at ``_WIDEST`` characters."""
    text = "-" if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= _WIDEST else text[:_WIDEST - 3] + "..."


def _columns(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _test_r1(run: RunSummary) -> str:
    return ", ".join(f"{d} {format_number(m['R@1'])}" for d, m in run.test.items() if "R@1" in m) or "-"


def _pairs(items: list[tuple[str, Any, Any]]) -> list[dict[str, Any]]:
    return [{"name": n, "a": x, "b": y} for n, x, y in items]


def _as_dict(run: RunSummary) -> dict[str, Any]:
    return {**dataclasses.asdict(run), "path": str(run.path)}


@app.command("list")
@user_errors
def list_command(
    model: Path = typer.Argument(..., metavar="MODEL_DIR", help="Model directory (its runs/ folder is read)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Every run folder of a model: epochs, the kept epoch, its validation score, held-out R@1.

    Example:  oneencoder runs list outputs/demo/model
    """
    runs = list_runs(model)
    if as_json:
        echo(strict_json({"model": str(model), "runs": [_as_dict(r) for r in runs]}))
        return
    if not runs:
        echo(f"{model} has no runs yet")
        return
    header = ["run", "epochs", "best epoch", "best val score", "test R@1"]
    echo(_columns([header] + [[r.name, str(r.epochs), _shown(r.best_epoch), _shown(r.best_score), _test_r1(r)]
                              for r in runs]))


@app.command("compare")
@user_errors
def compare_command(
    a: Path = typer.Argument(..., metavar="A", help="A run folder (<model>/runs/<stage>) or a model directory."),
    b: Path = typer.Argument(..., metavar="B", help="Another run folder or model directory."),
    stage: Optional[str] = typer.Option(None, "--stage", "-s",
                                        help="The run to take from a model directory that holds several."),
    png: Path = typer.Option(Path("runs-compare.png"), "--png",
                             help="PNG of both runs' curves (default: runs-compare.png in the current folder)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """The settings that differ between two runs, their metrics side by side, and a PNG of both curves.

    Example:  oneencoder runs compare outputs/lr1e-3/model outputs/lr3e-3/model --png lr.png

    Settings come from each run's settings.json (what the result depends on: the stage file's
    values, the data's hash, the backbones), metrics from metrics.jsonl and test.json.
    """
    if png.suffix.lower() != ".png":
        raise OneEncoderError(f"--png {png}: give a file name ending in .png")
    run_a, run_b = resolve_run(a, stage), resolve_run(b, stage)
    ensure_writable(png)
    result = compare_runs(run_a, run_b)
    labels = [f"{ab}: {label}" for ab, label in zip("AB", distinct_labels([run_a, run_b]))]
    plot_curves(dict(zip(labels, (run_a, run_b))), png)
    if as_json:
        echo(strict_json({"a": _as_dict(result.a), "b": _as_dict(result.b), "settings": _pairs(result.settings),
                          "metrics": _pairs(result.metrics), "notes": result.notes, "png": str(png)}))
        return
    for label, run in zip(labels, (result.a, result.b)):
        echo(f"{label}  ({run.path})")
    for line in result.notes:
        note(line)
    if result.settings:
        echo("\nsettings that differ (settings.json):")
        echo(_columns([["setting", "A", "B"]] + [[n, _setting(x), _setting(y)] for n, x, y in result.settings]))
    elif not result.notes:
        echo("\nsettings: the same in both settings.json (which leaves out device, log_every, report_to "
             "and the other settings that do not change what is learned)")
    echo("\nmetrics:")
    echo(_columns([["metric", "A", "B"]] + [[n, _shown(x), _shown(y)] for n, x, y in result.metrics]))
    echo(f"\nwrote {png}")
