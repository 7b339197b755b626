"""``oneencoder eval``: retrieval metrics between every modality pair a model holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from oneencoder.apps.captions import evaluate_captions
from oneencoder.errors import OneEncoderError
from oneencoder.generation.captioner import load_captioner
from oneencoder.evaluation.calibration import stored_calibrations
from oneencoder.evaluation.retrieval import evaluate_samples
from oneencoder.evaluation.robustness import corruptible, evaluate_robustness, format_robustness
from oneencoder.fileio import ensure_writable, write_json_atomic
from oneencoder.training.prepare import prepare_stage

from ._common import echo, note, prepared_model, quiet_libraries, user_errors
from .caption import print_caption_scores
from .train import print_results


@user_errors
def evaluate(
    model: Path = typer.Option(Path("outputs/demo/model"), "--model", "-m", help="Model directory."),
    manifest: Path = typer.Option(Path("outputs/demo/manifest.jsonl"), help="Manifest with the samples."),
    cache_dir: Optional[Path] = typer.Option(None, help="Feature cache root (default: <manifest folder>/cache, else "
                                                        "the one the model trained on); missing features are built."),
    split: str = typer.Option("test", help="train, val or test."),
    out: Optional[Path] = typer.Option(None, help="JSON file for the results (default: <model>/eval-<split>.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object instead of tables."),
    generate: bool = typer.Option(False, "--generate",
                                  help="Also caption every modality's samples with the model's decoder "
                                       "(train-decoder): BLEU, CIDEr-D and WER beside retrieval captioning and "
                                       "the text-only prior."),
    robustness: bool = typer.Option(False, "--robustness",
                                    help="Also rerun the retrieval with each query modality corrupted at set strengths "
                                         "(re-encoded from its files, in memory) and, for records with several input "
                                         "modalities, with each dropped; reports how far each metric falls."),
    robustness_modalities: Optional[str] = typer.Option(None, metavar="A,B",
                                                        help="Query modalities to corrupt or drop (default: all that "
                                                             "offer corruptions)."),
    robustness_limit: Optional[int] = typer.Option(None, min=1, metavar="N",
                                                   help="Re-encode at most N queries per modality (the same N in "
                                                        "every run)."),
) -> None:
    """Recall@1/5/10, mAP, NDCG@10, R-Precision, MRR, median rank, with chance levels.

    Example:  oneencoder eval --model outputs/demo/model --split test

    For scripts:  oneencoder --quiet eval --model outputs/demo/model --json | python -m json.tool

    Robustness:  oneencoder eval --model outputs/demo/model --robustness --robustness-modalities image
    """
    quiet_libraries()
    prepared = prepare_stage(model_dir=model, manifest=manifest, cache_dir=cache_dir, build_caches=False)
    path = out or model / f"eval-{split}.json"
    ensure_writable(path)  # before the features and metrics are computed
    if len(prepared.modalities) < 2:
        held = prepared.meta["modalities"]
        fields = {n: info["record_key"] for n, info in held.items()}
        raise OneEncoderError(f"{manifest}: inputs for {len(prepared.modalities)} of the model's modalities "
                              f"({', '.join(prepared.modalities) or 'none'}); eval needs two (fields: {fields})")
    chosen = corruptible(prepared.modalities, robustness_modalities) if robustness else None  # checked first
    prepared.build_caches(log=note)
    captioner = load_captioner(model) if generate else None  # no decoder: say so before the retrieval work
    results = evaluate_samples(prepared.model, prepared.modalities, prepared.records, prepared.cache_dir, split,
                               calibration=stored_calibrations(prepared.meta))  # its precision on this split
    if generate:
        results["generation"] = evaluate_captions(prepared_model(prepared, "auto"), prepared.records,
                                                  prepared.cache_dir, split, captioner=captioner)
    if robustness:
        results["robustness"] = evaluate_robustness(prepared.model, prepared.modalities, prepared.records,
                                                    prepared.cache_dir, split, only=chosen, limit=robustness_limit)
    write_json_atomic(path, results)
    if as_json:
        echo(json.dumps(results, ensure_ascii=False))
        note(f"wrote {path}")
        return
    print_results(results)
    if generate:
        print_caption_scores(results["generation"], split)
    if robustness:
        echo(f"\nrobustness on the {split} split (in brackets: the change from the clean row):")
        echo(format_robustness(results["robustness"]))
    echo(f"wrote {path}")
