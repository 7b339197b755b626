"""``oneencoder search``: one query (text, a file, or SMILES) against one or more indexes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer

import oneencoder
from oneencoder.apps.api import OneEncoder
from oneencoder.apps.index import VectorIndex, load_index
from oneencoder.errors import OneEncoderError
from oneencoder.evaluation.calibration import MatchCalibration
from oneencoder.evaluation.metrics import format_number
from oneencoder.features.inputs import modality_of_file

from ._common import echo, quiet_libraries, user_errors


def query_parts(m: OneEncoder, texts: List[str], files: List[Path], smiles: List[str], weights: List[float],
                as_modality: Optional[str]) -> list[tuple[str, Any, float, str]]:
    """``(modality, input, weight, shown)`` of every query part the options give, in the order
    texts, files, SMILES; ``weights`` is empty (all 1) or one per part in that order."""
    if files and as_modality is not None and as_modality not in file_modalities(m):
        # else `--as text` would embed the file's path as a text
        raise OneEncoderError(f"--as {as_modality}: not a modality of this model that reads files "
                              f"(it has {', '.join(file_modalities(m)) or 'none'})")
    for file in files:
        if not file.is_file():
            raise OneEncoderError(f"--file {file}: no such file")
    given = ([("text", t, t) for t in texts]
             + [(as_modality or modality_of_file(f, m.modalities), str(f), str(f)) for f in files]
             + [("molecule", s, s) for s in smiles])
    if not given:
        raise OneEncoderError("give a query: --text, --file or --smiles (each repeatable, to compose one query)")
    if weights and len(weights) != len(given):
        raise OneEncoderError(f"--weight given {len(weights)} times for {len(given)} query parts; give one per part "
                              "(in the order: every --text, then every --file, then every --smiles) or none")
    return [(modality, value, weights[i] if weights else 1.0, shown) for i, (modality, value, shown) in enumerate(given)]


def file_modalities(m: OneEncoder) -> list[str]:
    """The model's modalities whose inputs are files (what ``--as`` may name)."""
    from oneencoder.modality import MODALITIES

    return [name for name in m.modalities if MODALITIES.get(name).spec.reads_files]


def strict_json(payload: Any) -> str:
    """``payload`` as one line of strict JSON: never NaN or Infinity (``allow_nan=False``: indexes
    refuse them when built and loaded, so this only guards), and ``\\u`` escapes only where
    UTF-8 cannot hold a string (a lone surrogate)."""
    text = json.dumps(payload, ensure_ascii=False, allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(payload, allow_nan=False)
    return text


def open_indexes(m: OneEncoder, paths: List[Path]) -> list[VectorIndex]:
    """Load each index and check that ``m`` embeds into its space."""
    indexes = []
    for path in paths:
        index = load_index(path)
        index.check_model(m.meta, m.model_dir)
        indexes.append(index)
    return indexes


def _model_of(indexes: List[Path]) -> Path:
    from oneencoder.apps.index import read_index_meta

    recorded = read_index_meta(indexes[0]).get("model")
    if not recorded:
        raise OneEncoderError(f"{indexes[0]} records no model; pass --model")
    return Path(recorded)


def _calibration_facts(calibration: MatchCalibration | None) -> dict[str, Any] | None:
    """What a reader of ``match_probability`` needs: where it was fitted and the threshold it implies."""
    if calibration is None:
        return None
    return {"fitted_on": f"validation split of stage {calibration.stage}" if calibration.stage
            else "validation split (oneencoder calibrate)", "threshold": calibration.threshold,
            "val_precision": calibration.val_precision, "rule": calibration.rule,
            "matches_per_query": calibration.n_val_positives / calibration.n_val_queries}


def _probability_notes(m: OneEncoder, modality: str, composed: bool, indexes: List[VectorIndex],
                       calibrations: list[MatchCalibration | None]) -> list[str]:
    """Why some hits have ``match_probability`` null (a composed query, or no stored calibration)."""
    if composed:
        return ["match_probability is null: a composed query has no calibration (each is fitted for one "
                "query modality against one gallery modality)."]
    missing = sorted({ix.modality for ix, cal in zip(indexes, calibrations) if cal is None})
    return [f"match_probability is null for {modality}→{g}: {m.model_dir} stores no calibration of that "
            "direction (fitted on validation when a stage trains it; `oneencoder calibrate` fits one for an "
            "existing model)." for g in missing]


@user_errors
def search(
    index: List[Path] = typer.Option(..., "--index", "-i", help="Index directory (repeatable)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m",
                                         help="Model directory (default: the one the first index was built with)."),
    text: Optional[List[str]] = typer.Option(None, "--text", "-t", help="A text query (repeatable)."),
    file: Optional[List[Path]] = typer.Option(None, "--file", "-f",
                                              help="An image, sound, video or depth file as query (repeatable)."),
    smiles: Optional[List[str]] = typer.Option(None, "--smiles", help="A molecule (SMILES) as query (repeatable)."),
    weight: Optional[List[float]] = typer.Option(
        None, "--weight", "-w", help="Weight of each query part, in the order: every --text, every --file, every "
                                     "--smiles (default: 1 each; negative subtracts)."),
    as_modality: Optional[str] = typer.Option(None, "--as", help="Modality of --file when its extension is ambiguous."),
    k: int = typer.Option(10, "--k", "-k", min=1, help="Results per index."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps"),
) -> None:
    """Search every --index with one query in any modality of the model.

    Several parts (--text, --file, --smiles, each repeatable) make one composed query:
    the normalised, --weight-ed sum of their embeddings (OneEncoder.compose).

    Example:  oneencoder search --index outputs/demo/index-image --text "A badger." --k 5

    Example:  oneencoder search --index outputs/demo/index-image --file roar.ogg --text "An animal." -w 1 -w 0.5
    """
    quiet_libraries()
    m = oneencoder.load(model or _model_of(index), device=device)
    indexes = open_indexes(m, index)
    parts = query_parts(m, text or [], file or [], smiles or [], weight or [], as_modality)
    if len(parts) == 1:
        modality, value, _, shown = parts[0]
        query = m.encode(modality, [value])
    else:
        query = m.compose([(p[0], p[1], p[2]) for p in parts])
        modality = "+".join(dict.fromkeys(p[0] for p in parts))
        shown = " + ".join(f"{p[2]:g}·{p[0]}:{p[3]}" for p in parts)
    # A composed query has no direction of its own, so no calibration applies to it.
    calibrations = [None if len(parts) > 1 else m.match_calibration(modality, ix.modality) for ix in indexes]
    results = [(path, ix, ix.search(query, k).with_match_probability(cal and cal.in_gallery(len(ix))).hits[0], cal)
               for path, ix, cal in zip(index, indexes, calibrations)]
    if as_json:
        notes = _probability_notes(m, modality, len(parts) > 1, indexes, calibrations)
        echo(strict_json({"query": {"modality": modality, "input": shown,
                                    **({"parts": [{"modality": p[0], "input": p[3], "weight": p[2]} for p in parts]}
                                       if len(parts) > 1 else {})},
                          "model": str(m.model_dir),
                          **({"note": " ".join(notes)} if notes else {}),
                          "results": [{"index": str(path), "modality": ix.modality, "kind": ix.kind,
                                       "count": len(ix), "match_calibration": _calibration_facts(cal),
                                       "hits": hits} for path, ix, hits, cal in results]}))
        return
    echo(f"{modality} query: {shown}")
    for path, ix, hits, _ in results:
        echo(f"{path} ({ix.modality}, {len(ix)} vectors, {ix.kind}):")
        for h in hits:  # rank, score and id are the index's own; the user's fields are under "item"
            item = h["item"]
            shown_input = str(item.get("caption") or item.get("input") or "")
            echo(f"  {h['rank']:3d}. {format_number(h['score'], signed=True)}  {h['id']}"
                 + (f"  {shown_input}" if shown_input != h["id"] else ""))
