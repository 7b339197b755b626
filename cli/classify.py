"""``oneencoder classify``: zero-shot classification of inputs among labels, through text prompts."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from oneencoder.errors import OneEncoderError
from oneencoder.evaluation.metrics import format_number
from oneencoder.training.prepare import prepare_stage

from ._common import (CACHE_DIR_HELP, NO_CACHE_HELP, echo, input_cache, note, prepared_model, quiet_libraries,
                      user_errors)
from .search import strict_json


def _labels(labels: Optional[str], labels_file: Optional[Path]) -> list[str]:
    if (labels is None) == (labels_file is None):
        raise OneEncoderError("give the labels with --labels a,b,c or --labels-file FILE (one per line)")
    if labels_file is not None:
        if not labels_file.is_file():
            raise OneEncoderError(f"--labels-file {labels_file}: no such file")
        return [x.strip() for x in labels_file.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [x.strip() for x in labels.split(",")]


@user_errors
def classify(
    inputs: List[str] = typer.Argument(..., help="Inputs: file paths, or texts/SMILES."),
    model: Path = typer.Option(..., "--model", "-m", help="Model directory."),
    modality: str = typer.Option("image", "--modality", help="Modality of the inputs."),
    labels: Optional[str] = typer.Option(None, "--labels", "-l", help="Comma-separated class names."),
    labels_file: Optional[Path] = typer.Option(None, "--labels-file", help="Class names, one per line."),
    template: List[str] = typer.Option(["{}"], "--template",
                                       help="Prompt with {} for the label, e.g. 'A picture of {}.' "
                                            "(repeatable: the prompts' embeddings are averaged)."),
    k: int = typer.Option(3, "--k", "-k", min=1, help="Labels shown per input."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
    no_cache: bool = typer.Option(False, "--no-cache", help=NO_CACHE_HELP),
) -> None:
    """Score each input against every label's prompt; print the top k with cosine and probability.

    Example:  oneencoder classify photo.png --model outputs/demo/model --labels animals,food,vehicles
    --template "A picture of {}."
    """
    quiet_libraries()
    names = _labels(labels, labels_file)
    prepared = prepare_stage(model_dir=model, cache_dir=cache_dir, modalities=[modality], build_caches=False)
    m = prepared_model(prepared, device)
    with input_cache(prepared, modality, no_cache) as cache:
        result = m.classify(modality, list(inputs), names, template=template if len(template) > 1 else template[0],
                            k=k, cache=cache)
    if cache is not None and not as_json:  # --json: stdout and stderr together stay one JSON object
        note(cache.summary())
    if as_json:
        echo(strict_json({"modality": modality, "labels": result.labels, "template": template,
                          "results": [{"input": x, "top": top} for x, top in zip(inputs, result.to_json())]}))
        return
    for x, top in zip(inputs, result.top):
        echo(x)
        for rank, (label, score, prob) in enumerate(top, 1):
            echo(f"  {rank}. {label:24s} cos {format_number(score, signed=True)}  p {format_number(prob)}")
