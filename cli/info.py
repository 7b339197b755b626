"""``oneencoder info``: what a model directory holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from oneencoder.errors import OneEncoderError
from oneencoder.evaluation.metrics import format_number
from oneencoder.evaluation.model_card import CARD
from oneencoder.model.checkpoint import modality_from_meta, read_meta, verify_files
from oneencoder.model.parts import projection_from_dict

from ._common import echo, user_errors

_SHOWN_METRICS = ("R@1", "R@5", "R@10", "MRR")


def backbone_status(name: str, info: dict) -> str:
    """Whether the backbone the model was trained on is installed here, unchanged."""
    try:
        installed = modality_from_meta(name, info, check_weights=False).weights_sha256()
    except OneEncoderError as e:
        return f"backbone missing: {e}"
    if installed != info["weights_sha256"]:
        return f"backbone changed: installed weights sha256 {installed[:12]}... != recorded {info['weights_sha256'][:12]}..."
    return "backbone present, checksum OK"


def _test_results(stage: dict) -> dict[str, dict[str, dict[str, float]]]:
    """``{"test" | "test[<subset>]": {direction: {metric: value}}}`` of one stage entry."""
    return {key: {d: m for d, m in value.items() if isinstance(m, dict)}
            for key, value in stage.items() if (key == "test" or key.startswith("test[")) and isinstance(value, dict)}


def describe(model: Path) -> dict[str, Any]:
    """The model directory's record, its files verified, with each backbone's status here."""
    meta = read_meta(model)  # checked: every key used below is there, with its type
    verify_files(model, meta)
    return {"model": str(model), "checksums": "OK", **meta,
            "backbones": {name: backbone_status(name, m) for name, m in meta["modalities"].items()}}


@user_errors
def info(
    model: Path = typer.Argument(..., help="Model directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the model's record as one JSON object."),
) -> None:
    """List modalities with their backbones, the stage history and its metrics; verify checksums.

    Example:  oneencoder info outputs/demo/model

    For scripts:  oneencoder info outputs/demo/model --json | python -m json.tool
    """
    record = describe(model)
    if as_json:
        echo(json.dumps(record, ensure_ascii=False))
        return
    p = projection_from_dict(record["projection"], f"{model}: projection")
    echo(f"{model}: d_model={record['d_model']}, projection {p.layers} layer(s) x {p.heads} heads, "
         f"{len(record['files'])} files, checksums OK")
    echo("modalities:")
    for name, m in record["modalities"].items():
        echo(f"  {name:10s} backbone={m['backbone']}  dim={m['feature_dim']}  tokens<={m['max_tokens']}  "
             f"preprocess={m['preprocess_version']}  [{record['backbones'][name]}]")
        if m.get("class"):
            dist = f" from {m['distribution']} {m.get('distribution_version', '')}" if m.get("distribution") else ""
            echo(f"  {'':10s} class={m['class']}{dist}")
    echo("stages:")
    for s in record["stages"]:
        echo(f"  {s['name']:12s} {'+'.join(s['pair'])}  trained={','.join(s['trainable'])}  "
             f"n_train={s.get('n_train')}  {s.get('time', '')}")
        for key, directions in _test_results(s).items():
            for direction, metrics in directions.items():
                shown = [k for k in _SHOWN_METRICS if isinstance(metrics.get(k), (int, float))]
                echo(f"    {key} {direction}: " + "  ".join(f"{k}={format_number(metrics[k])}" for k in shown))
    card = model / CARD
    if card.is_file():
        echo(f"model card (licences, data, held-out results with intervals, limitations): {card}")
    else:
        echo(f"model card: none yet ({CARD} is written when a stage finishes)")
    decoder = record.get("decoder")
    if isinstance(decoder, dict):
        echo(f"caption decoder: {decoder.get('vocab_size')} words, trained on {decoder.get('n_captions')} captions "
             f"(noise {decoder.get('noise_std')}, projection {decoder.get('projection')!r}, chosen on "
             f"{decoder.get('n_val')} validation {decoder.get('condition')} samples)  {decoder.get('time', '')}")
