"""``oneencoder export onnx``: a model's per-modality heads (and optionally backbones) as ONNX graphs."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ._common import echo, quiet_libraries, user_errors

app = typer.Typer(help="Export a model for runtimes without oneencoder or PyTorch.", no_args_is_help=True)


@app.command("onnx")
@user_errors
def onnx(
    model: Path = typer.Option(..., "--model", "-m", help="Model directory."),
    modality: Optional[List[str]] = typer.Option(None, "--modality",
                                                 help="Modality to export (repeatable; default: all the model holds)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the .onnx files and export.json."),
    with_backbone: bool = typer.Option(False, "--with-backbone",
                                       help="Also export text and image end to end (token ids / pixels in), "
                                            "the frozen backbone included."),
    # Literals, as oneencoder.apps.export (torch) loads only when the command runs; it checks the range.
    opset: int = typer.Option(18, help="ONNX opset version, 18 to 25: what the exporter writes and onnxruntime "
                                       "runs. A graph is written only with the opset asked for."),
    check: bool = typer.Option(True, "--check/--no-check",
                               help="Run each graph in onnxruntime and compare it with PyTorch."),
) -> None:
    """Per modality: adapter + Universal Projection (+ language prior) on cached backbone features.

    Example:  oneencoder export onnx --model outputs/demo/model --out outputs/demo/onnx --with-backbone
    """
    quiet_libraries()
    from oneencoder.apps.export import export_onnx

    report = export_onnx(model, out, modalities=modality or None, with_backbone=with_backbone, opset=opset,
                         check=check)
    for graph in report["graphs"]:
        parity = f", max |onnxruntime - torch| {graph['max_abs_diff']:.1e}" if "max_abs_diff" in graph else ""
        echo(f"wrote {out / graph['file']}: {graph['modality']} ({graph['input']}) -> {graph['output_dim']}-d{parity}")
    if report.get("preprocess"):
        _echo_preprocess(out, report["preprocess"])
    echo(f"wrote {out / 'export.json'}")


def _echo_preprocess(out: Path, report: dict) -> None:
    """One line for preprocess.py (when written) and one per modality it leaves out, with the reason."""
    if report["file"]:
        echo(f"wrote {out / report['file']}: {', '.join(report['recipes'])} inputs with numpy + Pillow "
             "(no torch), matching oneencoder's preprocessing")
    for name, why in report["skipped"].items():
        echo(f"{name}: not in preprocess.py: {why}")


@app.command("preprocess")
@user_errors
def preprocess(
    model: Path = typer.Option(..., "--model", "-m", help="Model directory."),
    modality: Optional[List[str]] = typer.Option(None, "--modality",
                                                 help="Modality (repeatable; default: each that can be exported "
                                                      "with its backbone)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for preprocess.py (the graphs' folder)."),
) -> None:
    """Only preprocess.py: the full graphs' inputs with numpy + Pillow, no torch (as `onnx --with-backbone`).

    Example:  oneencoder export preprocess --model outputs/demo/model --out outputs/demo/onnx
    """
    quiet_libraries()
    from oneencoder.apps.export import export_preprocess

    _echo_preprocess(out, export_preprocess(model, out, modalities=modality or None))
