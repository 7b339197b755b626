"""``oneencoder eval``: retrieval metrics between every modality pair a model holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from oneencoder.data.manifest import read_manifest
from oneencoder.errors import OneEncoderError
from oneencoder.evaluation.retrieval import evaluate_samples
from oneencoder.features.cache import build_cache
from oneencoder.fileio import ensure_writable, write_json_atomic
from oneencoder.model.checkpoint import load_model, modality_from_meta

from ._common import echo, note, quiet_libraries, user_errors
from .train import print_results


@user_errors
def evaluate(
    model: Path = typer.Option(Path("outputs/demo/model"), "--model", "-m", help="Model directory."),
    manifest: Path = typer.Option(Path("outputs/demo/manifest.jsonl"), help="Manifest with the samples."),
    cache_dir: Path = typer.Option(Path("outputs/demo/cache"), help="Feature cache root (missing features are built)."),
    split: str = typer.Option("test", help="train, val or test."),
    out: Optional[Path] = typer.Option(None, help="JSON file for the results (default: <model>/eval-<split>.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object instead of tables."),
) -> None:
    """Recall@1/5/10, mAP, NDCG@10, R-Precision, MRR, median rank, with chance levels.

    Example:  oneencoder eval --model outputs/demo/model --split test

    For scripts:  oneencoder --quiet eval --model outputs/demo/model --json | python -m json.tool
    """
    quiet_libraries()
    net, meta = load_model(model)  # registers the model's recorded modality classes first
    path = out or model / f"eval-{split}.json"
    ensure_writable(path)  # before the features and metrics are computed
    records = read_manifest(manifest)
    present = [n for n, info in meta["modalities"].items() if any(r.get(info["record_key"]) for r in records)]
    if len(present) < 2:
        fields = {n: info["record_key"] for n, info in meta["modalities"].items()}
        raise OneEncoderError(f"{manifest}: inputs for {len(present)} of the model's modalities "
                              f"({', '.join(present) or 'none'}); eval needs two (fields: {fields})")
    modalities = {n: modality_from_meta(n, meta["modalities"][n]) for n in present}
    for m in modalities.values():
        build_cache(m, records, cache_dir, progress=True)
    results = evaluate_samples(net, modalities, records, cache_dir, split)
    write_json_atomic(path, results)
    if as_json:
        echo(json.dumps(results, ensure_ascii=False))
        note(f"wrote {path}")
        return
    print_results(results)
    echo(f"wrote {path}")
