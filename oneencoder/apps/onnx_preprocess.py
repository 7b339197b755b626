"""Torch-free preprocessing for the ONNX graphs in this folder, written by ``oneencoder export onnx``.

It makes the inputs of the ``*-full.onnx`` graphs exactly as oneencoder makes them (checked
against the library when the file is written), with numpy and Pillow alone; ``.svg`` files
also need ``cairosvg``, and token ids the ``tokenizers`` package. The numbers (image size,
mean, std, resampling, the tokenizer and its length) are the model's recorded options, in
``RECIPES`` below.

Command line::

    python preprocess.py stamp.png photo.jpg --out pixels.npy   # float32 [2, 3, S, S]
    python preprocess.py --text "A badger." --text "Two cats."  # prints input_ids, attention_mask

In Python (each modality exported end to end has a ``preprocess_<modality>`` function)::

    from preprocess import preprocess_image
    pixels = preprocess_image("stamp.png")                       # float32 [1, 3, S, S]
    session.run(["embedding"], {"input": pixels})
"""

# oneencoder keeps this module in oneencoder/apps/ and copies it, RECIPES filled in, as
# preprocess.py: so it may import nothing but the standard library, numpy and Pillow.

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

#: Per modality exported end to end: ``kind`` ("pixels" or "tokens"), its numbers and its graph.
RECIPES: dict[str, dict[str, Any]] = {}
HERE = Path(__file__).resolve().parent

_STRAIGHT_ALPHA = {"La": "LA", "RGBa": "RGBA"}  # premultiplied modes Pillow cannot convert to RGB
_WITH_ALPHA = ("RGBA", "LA", "P", "PA")  # composited on white


def _grey(values: np.ndarray, top: float, where: str) -> Image.Image:
    """8-bit grey with ``top`` as white; min-max stretched when ``top`` is 0."""
    arr = values.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: image holds NaN or infinite pixel values")
    if top <= 0:
        lo, hi = float(arr.min()), float(arr.max())
        arr, top = arr - lo, (hi - lo) or 1.0
    return Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8))


def real_range(img: Image.Image, where: str = "PIL image") -> Image.Image:
    """16-bit grey scaled by its bit depth, 32-bit integers and floats by their range, and
    premultiplied alpha made straight, as oneencoder reads them (8-bit images are unchanged)."""
    img.load()
    mode = img.mode
    if mode in _STRAIGHT_ALPHA:
        return img.convert(_STRAIGHT_ALPHA[mode])
    if mode.startswith("I;16"):
        return _grey(np.asarray(img), 65535.0, where)
    if mode not in ("I", "F"):
        return img
    arr = np.asarray(img)
    if mode == "F" and not np.isfinite(arr).all():
        raise ValueError(f"{where}: image holds NaN or infinite pixel values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0 and hi <= 255 and not (mode == "F" and hi <= 1):
        return img
    if mode == "F" and lo >= 0 and hi <= 1:
        return _grey(arr, 1.0, where)
    return _grey(arr, 65535.0 if mode == "I" and lo >= 0 and hi <= 65535 else 0.0, where)


def open_image(source: str | os.PathLike | Image.Image, svg_width: int) -> Image.Image:
    """A file (``.svg`` rendered ``svg_width`` pixels wide) or a PIL image, in its real range."""
    if isinstance(source, Image.Image):
        return real_range(source)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"{path}: image file not found")
    if path.suffix.lower() == ".svg":
        import cairosvg  # only for SVG files

        try:
            img = Image.open(io.BytesIO(cairosvg.svg2png(url=str(path), output_width=svg_width)))
        except Exception as e:  # cairosvg and its XML parser raise many types
            raise ValueError(f"{path}: cannot render SVG ({type(e).__name__}: {e})") from None
    else:
        try:
            img = Image.open(path)
        except (OSError, SyntaxError) as e:
            raise ValueError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    return real_range(img, str(path))


def pixels(source: str | os.PathLike | Image.Image, recipe: dict[str, Any]) -> np.ndarray:
    """One image as float32 ``[3, S, S]``: transparency on white, padded to a centred square on
    white (cut-outs keep their outline), resized, scaled to [0, 1], then ``(x - mean) / std``."""
    img = open_image(source, int(recipe["svg_width"]))
    if img.mode in _WITH_ALPHA:
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    img = img.convert("RGB")
    side = max(img.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    size = int(recipe["image_size"])
    square = square.resize((size, size), getattr(Image.Resampling, recipe["resample"]))
    arr = np.asarray(square, dtype=np.float32) / 255.0
    mean = np.asarray(recipe["mean"], dtype=np.float32)
    std = np.asarray(recipe["std"], dtype=np.float32)
    return ((arr - mean) / std).transpose(2, 0, 1).copy()


def token_ids(texts: Sequence[str], recipe: dict[str, Any], folder: str | os.PathLike = HERE) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask`` int64 ``[batch, longest]``: whitespace collapsed,
    the saved tokenizer truncating at ``max_tokens``, padded with ``pad_id`` on the right."""
    from tokenizers import Tokenizer  # only for token ids

    tok = Tokenizer.from_file(str(Path(folder) / recipe["tokenizer"]))
    tok.no_padding()
    tok.enable_truncation(int(recipe["max_tokens"]))
    clean = [" ".join(str(t).split()) for t in texts]
    if not clean or not all(clean):
        raise ValueError("empty text: every text needs at least one word")
    rows = [e.ids for e in tok.encode_batch(clean)]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), int(recipe["pad_id"]), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return {"input_ids": ids, "attention_mask": mask}


def preprocess(modality: str, inputs: Any, recipes: dict[str, dict[str, Any]] | None = None,
               folder: str | os.PathLike = HERE) -> Any:
    """The inputs of ``modality``'s full graph for one input or a list of them: pixels as one
    float32 array ``[batch, 3, S, S]``, token ids as a dict of two int64 arrays."""
    recipes = RECIPES if recipes is None else recipes
    if modality not in recipes:
        raise ValueError(f"no recipe for {modality!r} here; this file preprocesses {', '.join(recipes) or 'nothing'}")
    recipe = recipes[modality]
    many = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if recipe["kind"] == "tokens":
        return token_ids(many, recipe, folder)
    return np.stack([pixels(x, recipe) for x in many])


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Written beside its final name and renamed into place, so a failed write leaves nothing."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python preprocess.py FILE... [--out x.npy]`` or ``--text T...``; one ``error:`` line on bad input."""
    kinds = {r["kind"]: name for name, r in RECIPES.items()}
    parser = argparse.ArgumentParser(description="Make the inputs of this folder's ONNX graphs "
                                                 f"(recipes: {', '.join(RECIPES) or 'none'}).")
    parser.add_argument("files", nargs="*", help="image files (pixels for the graph that takes them)")
    parser.add_argument("--text", action="append", default=[], help="a text to tokenise (repeatable)")
    parser.add_argument("--out", type=Path, help="write the pixels as one .npy array [N, 3, S, S]")
    args = parser.parse_args(argv)
    try:
        if not args.files and not args.text:
            raise ValueError("name image files or give --text")
        for given, kind in ((args.files, "pixels"), (args.text, "tokens")):
            if given and kind not in kinds:
                raise ValueError(f"the graphs here take no {kind}; this file preprocesses {', '.join(RECIPES)}")
        if args.files:
            batch = preprocess(kinds["pixels"], args.files)
            if args.out:
                _save_npy(args.out, batch)
                print(f"wrote {args.out}: float32 {list(batch.shape)} for {RECIPES[kinds['pixels']]['graph']}")
            else:
                for name, row in zip(args.files, batch):
                    print(f"{name}: float32 {list(row.shape)}, mean {row.mean():.6f}, std {row.std():.6f}")
        if args.text:
            for key, value in preprocess(kinds["tokens"], args.text).items():
                print(f"{key}: {value.tolist()}")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
