"""``oneencoder calibrate``: fit an existing model's match calibration and means on validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from oneencoder.apps.calibrate import calibrate as calibrate_model
from oneencoder.evaluation.calibration import format_gap_table

from ._common import echo, note, quiet_libraries, user_errors


@user_errors
def calibrate(
    model: Path = typer.Option(..., "--model", "-m", help="Model directory (its oneencoder.json and means change)."),
    manifest: Path = typer.Option(..., help="Manifest with the validation (and test) samples."),
    cache_dir: Optional[Path] = typer.Option(None, help="Feature cache root (default: <manifest folder>/cache, else "
                                                        "the one the model trained on); missing features are built."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Fit each direction's match probability and each modality's mean on the validation split, and
    check the threshold on the test split. Stages do this themselves; this is for older models.

    Example:  oneencoder calibrate --model outputs/demo/model --manifest outputs/demo/manifest.jsonl
    """
    quiet_libraries()
    report = calibrate_model(model, manifest, cache_dir, log=note)
    if as_json:
        echo(json.dumps(report, ensure_ascii=False))
        return
    echo(f"calibrated {', '.join(report['calibration'])} on the validation split; means of "
         + ", ".join(f"{n} ({count} samples)" for n, count in report["means"].items()))
    check = report["check"]
    if check:
        for name, directions in [("", check["directions"]), *check.get("subsets", {}).items()]:
            where = f"{check['split']}" + (f", subset {name}" if name else "")
            echo(f"\nmodality gap (cosines) and match threshold (precision on {where}, validation's prediction "
                 "in brackets):")
            echo(format_gap_table(directions))
