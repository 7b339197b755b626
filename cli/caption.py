"""``oneencoder train-decoder`` and ``oneencoder caption``: captions for any modality of a model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, List, Optional

import typer

from oneencoder.apps.captions import DECODER_TRAIN, NOISE_GRID, evaluate_captions, fit_decoder, imagenet_captions
from oneencoder.errors import OneEncoderError
from oneencoder.fileio import write_json_atomic
from oneencoder.training.prepare import prepare_stage

from ._common import CACHE_DIR_HELP, echo, note, prepared_model, quiet_libraries, user_errors
from .search import query_parts, strict_json


def _floats(text: str, option: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OneEncoderError(f"{option} {text!r}: give comma-separated numbers, e.g. 0,0.01,0.02") from None
    if not values or any(v < 0 for v in values):
        raise OneEncoderError(f"{option} {text!r}: give one or more numbers >= 0")
    return values


def print_caption_scores(results: dict[str, Any], split: str) -> None:
    echo(f"captions on the {split} split (decoder vs retrieval captioning vs the most frequent caption):")
    head = f"{'modality':10s} {'n':>5s} {'':10s} {'BLEU-1':>7s} {'BLEU-4':>7s} {'CIDEr-D':>8s} {'WER':>6s}"
    echo(head)
    echo("-" * len(head))
    for name, result in results.items():
        for row in ("decoder", "retrieval", "prior"):
            s = result[row]
            echo(f"{name:10s} {result['n']:5d} {row:10s} {s['BLEU-1']:7.3f} {s['BLEU-4']:7.3f} {s['CIDEr-D']:8.3f} "
                 f"{s['WER']:6.3f}")
    for name, result in results.items():
        for ex in result["examples"][:3]:
            echo(f"  {name} {ex['id']}: {ex['decoder']!r} (retrieval {ex['retrieval']!r}; truth {ex['caption']!r})")


@user_errors
def train_decoder(
    model: Path = typer.Option(..., "--model", "-m", help="Model directory; the decoder is saved in it."),
    data: Path = typer.Option(Path("outputs/demo/manifest.jsonl"), "--data",
                              help="Manifest: its train captions are the training text, its val rows choose."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
    condition: Optional[str] = typer.Option(None, help="Modality whose validation samples choose the noise and "
                                                        "projection (default: the first non-text one, e.g. image)."),
    imagenet: bool = typer.Option(True, help="Also train on the 1000 ImageNet class names as captions ('A tench.')."),
    noise: str = typer.Option(",".join(f"{x:g}" for x in NOISE_GRID),
                              help="CapDec noise levels to try (per-dimension std), chosen on validation."),
    epochs: int = typer.Option(DECODER_TRAIN.epochs, min=1, help="Most epochs per noise level (early stopping)."),
    seed: int = typer.Option(0, help="Seed of the decoder's initialisation and batches."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps"),
    split: str = typer.Option("test", help="Split scored after training (train, val or test)."),
) -> None:
    """Train the model's caption decoder on text alone, choose it on validation, score it.

    Example:  oneencoder train-decoder --model outputs/demo/model --data outputs/demo/manifest.jsonl
    """
    quiet_libraries()
    prepared = prepare_stage(model_dir=model, manifest=data, cache_dir=cache_dir, build_caches=False)
    prepared.build_caches(log=note, quiet_when_cached=True)
    m = prepared_model(prepared, device)
    train = dataclasses.replace(DECODER_TRAIN, epochs=epochs, seed=seed, device=device)
    fit_decoder(m, prepared.records, prepared.cache_dir, condition=condition,
                extra_captions=imagenet_captions() if imagenet else (), noise_grid=_floats(noise, "--noise"),
                train=train, log=note)
    results = evaluate_captions(m, prepared.records, prepared.cache_dir, split)
    path = model / f"captions-{split}.json"
    write_json_atomic(path, results)
    print_caption_scores(results, split)
    echo(f"wrote {path}")


@user_errors
def caption(
    model: Path = typer.Option(..., "--model", "-m", help="Model directory with a decoder (train-decoder)."),
    text: Optional[List[str]] = typer.Option(None, "--text", "-t", help="A text to describe (repeatable)."),
    file: Optional[List[Path]] = typer.Option(None, "--file", "-f",
                                              help="An image, sound, video or depth file (repeatable)."),
    smiles: Optional[List[str]] = typer.Option(None, "--smiles", help="A molecule (SMILES) (repeatable)."),
    as_modality: Optional[str] = typer.Option(None, "--as", help="Modality of --file when its extension is ambiguous."),
    n: int = typer.Option(1, "-n", min=1, help="Captions per input."),
    beam: int = typer.Option(3, min=1, help="Beam width."),
    sample: bool = typer.Option(False, help="Nucleus sampling instead of beam search."),
    seed: int = typer.Option(0, help="Seed of --sample."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of lines."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps"),
) -> None:
    """Describe each input in words, whatever its modality.

    Example:  oneencoder caption --model outputs/demo/model --file /usr/share/tuxpaint/stamps/animals/mammals/badger.png
    """
    quiet_libraries()
    import oneencoder

    m = oneencoder.load(model, device=device)
    parts = query_parts(m, text or [], file or [], smiles or [], [], as_modality)
    rows = []
    for modality, value, _, shown in parts:
        captions = m.caption(modality, [value], n=n, beam=beam, sample=sample, seed=seed, progress=False)[0]
        rows.append({"modality": modality, "input": shown, "captions": captions})
    if as_json:
        echo(strict_json({"model": str(m.model_dir), "results": rows}))
        return
    for row in rows:
        echo(f"{row['modality']} {row['input']}:")
        for c in row["captions"]:
            echo(f"  {c}")
