"""``oneencoder classify``: zero-shot classification of inputs among labels, through text prompts.

Given inputs and ``--labels``, it prints the top labels of each input. Given a folder of
class subfolders, or ``--manifest M --label-field F``, it classifies every labelled input
among the labels found and reports accuracy with chance, a per-class table and a
confusion-matrix PNG. Inputs are checked before the model is loaded.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from oneencoder.apps.zeroshot import probability_scale, prompts
from oneencoder.errors import OneEncoderError
from oneencoder.features.runtime import check_runtime
from oneencoder.evaluation.metrics import format_number
from oneencoder.fileio import ensure_writable
from oneencoder.training.prepare import prepare_stage

from ._common import (CACHE_DIR_HELP, NO_CACHE_HELP, PRECISION_HELP, RUNTIME_HELP, echo, input_cache, note,
                      prepared_model, quiet_libraries, runtime_notes, user_errors)
from .search import strict_json

_PLAIN_MODALITY = "image"  # the inputs' modality in the --labels form when --modality is not given


def _labels(labels: Optional[str], labels_file: Optional[Path]) -> list[str]:
    if (labels is None) == (labels_file is None):
        raise OneEncoderError("give the labels with --labels a,b,c or --labels-file FILE (one per line), or "
                              "classify a folder of class subfolders (or --manifest M --label-field F)")
    if labels_file is not None:
        if not labels_file.is_file():
            raise OneEncoderError(f"--labels-file {labels_file}: no such file")
        return [x.strip() for x in labels_file.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [x.strip() for x in labels.split(",")]


def _check_files(modality: str, inputs: list[str]) -> None:
    """A missing input file is an error now, not after the model has loaded."""
    from oneencoder.modality import MODALITIES

    if modality in MODALITIES and MODALITIES.get(modality).spec.reads_files:
        for x in inputs:
            if not os.path.isfile(x):
                what = "a folder: classify one folder alone to read its class subfolders" if os.path.isdir(x) \
                    else "no such file"
                raise OneEncoderError(f"{x}: {what}")


@user_errors
def classify(
    inputs: Optional[List[str]] = typer.Argument(None, help="Inputs (file paths, or texts/SMILES) with --labels; "
                                                            "or one folder of class subfolders."),
    model: Path = typer.Option(..., "--model", "-m", help="Model directory."),
    modality: Optional[str] = typer.Option(None, "--modality",
                                           help="Modality of the inputs (default: image with --labels; from "
                                                "the files of a folder or manifest)."),
    labels: Optional[str] = typer.Option(None, "--labels", "-l", help="Comma-separated class names."),
    labels_file: Optional[Path] = typer.Option(None, "--labels-file", help="Class names, one per line."),
    manifest: Optional[Path] = typer.Option(None, "--manifest",
                                            help="Classify this manifest's rows among the values of --label-field."),
    label_field: str = typer.Option("label", "--label-field", help="Manifest field holding the true label."),
    split: Optional[str] = typer.Option(None, "--split",
                                        help="Folder or manifest: train, val, test or all (default: test when "
                                             "there is one, else all)."),
    template: Optional[List[str]] = typer.Option(None, "--template",
                                                 help="Prompt with {} for the label, e.g. 'A picture of {}.' "
                                                      "(repeatable: the prompts' embeddings are averaged; "
                                                      "default '{}' with --labels, 'A {}.' for a folder or "
                                                      "manifest, as `data import` captions labels)."),
    k: int = typer.Option(3, "--k", "-k", min=1, help="Labels shown per input (with --labels)."),
    confusion: Path = typer.Option(Path("confusion.png"), "--confusion",
                                   help="Folder or manifest: where to write the confusion-matrix PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
    no_cache: bool = typer.Option(False, "--no-cache", help=NO_CACHE_HELP),
    runtime: str = typer.Option("torch", "--runtime", help=RUNTIME_HELP),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
) -> None:
    """Score inputs against every label's prompt: top k per input, or an accuracy report for labelled data.

    Example:  oneencoder classify photo.png --model outputs/demo/model --labels animals,food,vehicles
    --template "A picture of {}."

    Labelled folder (class subfolders; split folders: the test split):  oneencoder classify photos/
    --model outputs/demo/model  (accuracy with chance, per-class table, confusion.png)

    Labelled manifest:  oneencoder classify --manifest data.jsonl --label-field category --model outputs/demo/model
    """
    quiet_libraries()
    check_runtime(runtime, precision)  # before the model loads
    load = functools.partial(prepared_model, device=device, runtime=runtime, precision=precision)
    inputs = list(inputs or [])
    folder = Path(inputs[0]) if len(inputs) == 1 and os.path.isdir(inputs[0]) else None
    if folder is not None or manifest is not None:
        _report(folder, manifest, inputs, model, modality, labels, labels_file, label_field, split, template,
                confusion, as_json, load, cache_dir, no_cache)
        return
    if not inputs:
        raise OneEncoderError("give inputs with --labels, a folder of class subfolders, or --manifest M")
    names = _labels(labels, labels_file)
    modality = modality or _PLAIN_MODALITY
    _check_files(modality, inputs)
    templates = template or ["{}"]
    prepared = prepare_stage(model_dir=model, cache_dir=cache_dir, modalities=[modality], build_caches=False)
    m = load(prepared)
    temperature, meaning = probability_scale(prepared.meta)
    with input_cache(prepared, modality, no_cache) as cache:
        result = m.classify(modality, inputs, names, template=templates, k=k, temperature=temperature, cache=cache)
    if not as_json:
        runtime_notes(m)
    if as_json:  # stdout and stderr together stay one JSON object
        echo(strict_json({"modality": modality, "labels": result.labels, "template": templates,
                          "temperature": temperature, "probabilities": meaning,
                          "results": [{"input": x, "top": top} for x, top in zip(inputs, result.to_json())]}))
        return
    if cache is not None:
        note(cache.summary())
    for x, top in zip(inputs, result.top):
        echo(x)
        for rank, (label, score, prob) in enumerate(top, 1):
            echo(f"  {rank}. {label:24s} cos {format_number(score, signed=True)}  p {format_number(prob)}")
    note(meaning)


def _report(folder: Optional[Path], manifest: Optional[Path], inputs: list[str], model: Path,
            modality: Optional[str], labels: Optional[str], labels_file: Optional[Path], label_field: str,
            split: Optional[str], template: Optional[List[str]], confusion: Path, as_json: bool,
            load: Callable[[Any], Any], cache_dir: Optional[Path], no_cache: bool) -> None:
    """``classify FOLDER`` / ``classify --manifest M``: every check before the model loads, then the report."""
    from oneencoder.apps.zeroshot_report import (classification_report, format_report, labelled_folder,
                                                 labelled_manifest, plot_confusion)
    from oneencoder.data.folder_import import DEFAULT_TEMPLATE
    from oneencoder.model.checkpoint import read_meta

    if labels is not None or labels_file is not None:
        raise OneEncoderError("the labels of a folder come from its class subfolders, those of a manifest from "
                              "--label-field; drop --labels/--labels-file")
    if folder is not None and manifest is not None or manifest is not None and inputs:
        raise OneEncoderError("classify either one folder or --manifest M, not both (nor inputs with --manifest)")
    held = list(read_meta(model)["modalities"])
    data = (labelled_folder(folder, held, modality, split) if folder is not None
            else labelled_manifest(manifest, label_field, held, modality, split))
    templates = template or [DEFAULT_TEMPLATE]
    prompts(data.prompt_labels, templates)  # duplicate labels or a bad template: before the model loads
    ensure_writable(confusion)
    if not as_json:
        for line in data.notes:
            note(f"note: {line}")
        note(f"classifying {len(data.inputs)} {data.modality} inputs of {data.source} among {len(data.labels)} "
             f"labels")
    prepared = prepare_stage(model_dir=model, cache_dir=cache_dir, modalities=[data.modality], build_caches=False)
    m = load(prepared)
    temperature, meaning = probability_scale(prepared.meta)
    with input_cache(prepared, data.modality, no_cache) as cache:
        result = m.classify(data.modality, data.inputs, data.prompt_labels, template=templates, k=len(data.labels),
                            temperature=temperature, cache=cache)
    if not as_json:
        runtime_notes(m)
    report = classification_report(data.truth, result, data.labels)
    plot_confusion(report, confusion)
    report = {"modality": data.modality, "source": data.source, "templates": templates,
              **report, "probabilities": {"temperature": temperature, "meaning": meaning, **report["calibration"]},
              "confusion_png": str(confusion),
              "predictions": [{"input": x, "label": t, "predicted": data.labels[row.argmax()],
                               "prob": float(p.max())}
                              for x, t, row, p in zip(data.inputs, data.truth, result.scores, result.probs)]}
    del report["calibration"]
    if as_json:
        echo(strict_json(report))
        return
    if cache is not None:
        note(cache.summary())
    echo(f"{data.source}: {report['n']} {data.modality} inputs, {len(data.labels)} labels, "
         f"templates {', '.join(repr(t) for t in templates)}")
    echo(format_report(report))
    cal = report["probabilities"]
    wrong = f", mean p of wrong top-1 answers {cal['mean_prob_wrong']:.3f}" if cal["mean_prob_wrong"] is not None else ""
    echo(f"\n{meaning} (expected calibration error {cal['ece']:.3f}{wrong})")
    echo(f"confusion matrix: {confusion}")
