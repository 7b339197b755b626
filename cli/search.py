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
from oneencoder.evaluation.metrics import format_number
from oneencoder.features.inputs import modality_of_file

from ._common import echo, quiet_libraries, user_errors


def query_of(m: OneEncoder, text: Optional[str], file: Optional[Path], smiles: Optional[str],
             as_modality: Optional[str]) -> tuple[str, Any, str]:
    """``(modality, input, shown)`` of the one query the options give."""
    given = [name for name, v in (("--text", text), ("--file", file), ("--smiles", smiles)) if v is not None]
    if len(given) != 1:
        raise OneEncoderError("give exactly one query: --text, --file or --smiles"
                              + (f" (got {', '.join(given)})" if given else ""))
    if text is not None:
        return "text", text, text
    if smiles is not None:
        return "molecule", smiles, smiles
    if not file.is_file():
        raise OneEncoderError(f"--file {file}: no such file")
    if as_modality is not None:
        readers = file_modalities(m)
        if as_modality not in readers:  # else `--as text` would embed the file's path as a text
            raise OneEncoderError(f"--as {as_modality}: not a modality of this model that reads files "
                                  f"(it has {', '.join(readers) or 'none'})")
    modality = as_modality or modality_of_file(file, m.modalities)
    return modality, str(file), str(file)


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


@user_errors
def search(
    index: List[Path] = typer.Option(..., "--index", "-i", help="Index directory (repeatable)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m",
                                         help="Model directory (default: the one the first index was built with)."),
    text: Optional[str] = typer.Option(None, "--text", "-t", help="A text query."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="An image, sound, video or depth file as query."),
    smiles: Optional[str] = typer.Option(None, "--smiles", help="A molecule (SMILES) as query."),
    as_modality: Optional[str] = typer.Option(None, "--as", help="Modality of --file when its extension is ambiguous."),
    k: int = typer.Option(10, "--k", "-k", min=1, help="Results per index."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps"),
) -> None:
    """Search every --index with one query in any modality of the model.

    Example:  oneencoder search --index outputs/demo/index-image --text "A badger." --k 5
    """
    quiet_libraries()
    m = oneencoder.load(model or _model_of(index), device=device)
    indexes = open_indexes(m, index)
    modality, value, shown = query_of(m, text, file, smiles, as_modality)
    query = m.encode(modality, [value])
    results = [(path, ix, ix.search(query, k).hits[0]) for path, ix in zip(index, indexes)]
    if as_json:
        echo(strict_json({"query": {"modality": modality, "input": shown}, "model": str(m.model_dir),
                          "results": [{"index": str(path), "modality": ix.modality, "kind": ix.kind,
                                       "count": len(ix), "hits": hits} for path, ix, hits in results]}))
        return
    echo(f"{modality} query: {shown}")
    for path, ix, hits in results:
        echo(f"{path} ({ix.modality}, {len(ix)} vectors, {ix.kind}):")
        for h in hits:  # rank, score and id are the index's own; the user's fields are under "item"
            item = h["item"]
            shown_input = str(item.get("caption") or item.get("input") or "")
            echo(f"  {h['rank']:3d}. {format_number(h['score'], signed=True)}  {h['id']}"
                 + (f"  {shown_input}" if shown_input != h["id"] else ""))
