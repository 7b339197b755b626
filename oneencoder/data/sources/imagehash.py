"""Perceptual image signatures for finding near-duplicate images (numpy and Pillow only).

A signature is what is left of an image after compositing it on white, cropping it to its
content (pixels darker than :data:`WHITE`) and shrinking it:

* ``dhash``: a 64-bit difference hash of the crop at 9x8 grayscale (bit = "this cell is
  darker than its right neighbour"), the classic dHash;
* ``colour``: the crop as a 4x4 RGB thumbnail (48 bytes);
* ``aspect``: the crop's width / height.

Two images are near-duplicates when their dHashes differ in at most :data:`DHASH_MAX` bits,
their colour thumbnails differ by at most :data:`COLOUR_MAX` (mean absolute difference,
0-255) and their aspect ratios by at most a factor :data:`ASPECT_MAX`. The dHash alone is
not enough on clip art: every tall, thin object on white (a lighthouse, a pepper grinder,
a pencil) hashes alike, so the colour and shape checks are what keep it from matching
unrelated drawings (docs/openclipart.md shows the measured pairs).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ...deps import require
from ...fileio import append_jsonl

#: Grayscale value below which a pixel (after compositing on white) is content, not background.
WHITE = 240
#: Thresholds of :func:`is_near_duplicate`, chosen by looking at the closest pairs (docs/openclipart.md).
DHASH_MAX = 6
COLOUR_MAX = 10.0
ASPECT_MAX = 1.25
#: Version of the signature recipe; cached signatures of another version are recomputed.
SIGNATURE_VERSION = 1
_THUMB = 128  # work on a copy this large: hashing needs 9x8 pixels, not megapixels


@dataclass(frozen=True)
class Signature:
    """Perceptual signature of one image (see the module docstring).

    Attributes:
        dhash: 64-bit difference hash of the content crop.
        colour: 4x4 RGB thumbnail of the content crop, 48 bytes.
        aspect: Width / height of the content crop.
    """

    dhash: int
    colour: bytes
    aspect: float

    def to_json(self) -> dict:
        return {"dhash": f"{self.dhash:016x}", "colour": self.colour.hex(), "aspect": self.aspect}

    @classmethod
    def from_json(cls, row: dict) -> Signature:
        return cls(int(row["dhash"], 16), bytes.fromhex(row["colour"]), float(row["aspect"]))


def open_image(path: str | Path) -> Image.Image:
    """Open a raster image with Pillow, or render an SVG with cairosvg (as the image modality does)."""
    path = Path(path)
    if path.suffix.lower() == ".svg":
        cairosvg = require("cairosvg")
        return Image.open(io.BytesIO(cairosvg.svg2png(url=str(path), output_width=2 * _THUMB)))
    return Image.open(path)


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    rgba.thumbnail((_THUMB, _THUMB), reducing_gap=2.0)
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def signature(image: Image.Image) -> Signature:
    """The signature of ``image`` (any mode; transparency is composited on white)."""
    rgb = _on_white(image)
    ys, xs = np.nonzero(np.asarray(rgb.convert("L")) < WHITE)
    if len(ys):  # a blank image keeps its whole canvas
        rgb = rgb.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    gray = np.asarray(rgb.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.float32)
    bits = (gray[:, :-1] < gray[:, 1:]).flatten()
    dhash = int("".join("1" if b else "0" for b in bits), 2)
    colour = np.asarray(rgb.resize((4, 4), Image.Resampling.BOX), dtype=np.uint8).tobytes()
    return Signature(dhash, colour, rgb.width / rgb.height)


def file_signature(path: str | Path) -> Signature:
    """Signature of an image file; raises whatever Pillow or cairosvg raise on a bad file.

    Images over Pillow's decompression-bomb limit (178.9 Mpx) raise; those between half of
    it and it are read without a warning, since only a thumbnail is kept.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with open_image(path) as image:
            return signature(image)


def distance(a: Signature, b: Signature) -> tuple[int, float, float]:
    """``(dHash Hamming distance, colour mean absolute difference, aspect ratio factor >= 1)``."""
    colour = float(np.abs(np.frombuffer(a.colour, np.uint8).astype(np.float32)
                          - np.frombuffer(b.colour, np.uint8)).mean())
    return (a.dhash ^ b.dhash).bit_count(), colour, max(a.aspect, b.aspect) / min(a.aspect, b.aspect)


def is_near_duplicate(a: Signature, b: Signature) -> bool:
    """Whether two signatures are within every threshold (dHash, colour and aspect)."""
    bits, colour, aspect = distance(a, b)
    return bits <= DHASH_MAX and colour <= COLOUR_MAX and aspect <= ASPECT_MAX


def nearest_duplicates(queries: dict[str, Signature], references: dict[str, Signature],
                       chunk: int = 512) -> dict[str, dict]:
    """Queries that are near-duplicates of a reference, with the closest such reference.

    Args:
        queries: ``{id: signature}`` to check.
        references: ``{id: signature}`` to check against.
        chunk: Queries compared at once (bounds memory: chunk x references x 48 floats).

    Returns:
        ``{query id: {"match", "dhash_distance", "colour_distance"}}`` for every query with at
        least one reference within all thresholds; the match is the one with the fewest
        differing dHash bits (then the closest colours, then the smallest id).
    """
    if not queries or not references:
        return {}
    ref_ids = sorted(references)
    ref_hash = np.array([references[r].dhash for r in ref_ids], dtype=np.uint64)
    ref_col = np.stack([np.frombuffer(references[r].colour, np.uint8) for r in ref_ids]).astype(np.float32)
    ref_asp = np.log([references[r].aspect for r in ref_ids])
    ids = sorted(queries)
    out: dict[str, dict] = {}
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        q_hash = np.array([queries[q].dhash for q in part], dtype=np.uint64)
        q_col = np.stack([np.frombuffer(queries[q].colour, np.uint8) for q in part]).astype(np.float32)
        q_asp = np.log([queries[q].aspect for q in part])
        bits = np.bitwise_count(q_hash[:, None] ^ ref_hash[None, :]).astype(np.int64)
        colour = np.abs(q_col[:, None, :] - ref_col[None, :, :]).mean(-1)
        ok = ((bits <= DHASH_MAX) & (colour <= COLOUR_MAX)
              & (np.abs(q_asp[:, None] - ref_asp[None, :]) <= np.log(ASPECT_MAX) + 1e-9))
        for i in np.nonzero(ok.any(1))[0]:
            cand = np.nonzero(ok[i])[0]
            j = min(cand, key=lambda c: (bits[i, c], colour[i, c], ref_ids[c]))
            out[part[i]] = {"match": ref_ids[j], "dhash_distance": int(bits[i, j]),
                            "colour_distance": round(float(colour[i, j]), 2)}
    return out


class SignatureStore:
    """Signatures of image files, remembered in a JSONL file so a rerun (or a resumed run) skips them.

    A line is keyed by the file's absolute path, size and modification time, and by
    :data:`SIGNATURE_VERSION`; a file that changed is hashed again.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._known: dict[tuple, Signature] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    if row.get("v") == SIGNATURE_VERSION:
                        self._known[(row["path"], row["size"], row["mtime_ns"])] = Signature.from_json(row)
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by an interruption: that file is hashed again

    @staticmethod
    def _key(path: str | Path) -> tuple:
        path = os.path.abspath(path)
        stat = os.stat(path)
        return path, stat.st_size, stat.st_mtime_ns

    def get(self, path: str | Path) -> Signature:
        """The file's signature, computed (and appended to the store) when not known yet."""
        key = self._key(path)
        if key not in self._known:
            sig = file_signature(path)
            append_jsonl(self.path, {"v": SIGNATURE_VERSION, "path": key[0], "size": key[1],
                                     "mtime_ns": key[2], **sig.to_json()})
            self._known[key] = sig
        return self._known[key]

    def __contains__(self, path: str | Path) -> bool:
        try:
            return self._key(path) in self._known
        except OSError:
            return False

