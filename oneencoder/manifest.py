"""JSONL manifests: one sample per line, with an ``id``, a ``split`` and modality fields.

Example line::

    {"id": "animals/mammals/badger", "image": "/usr/share/.../badger.png",
     "caption": "A badger.", "group": "3f2a...", "split": "train", ...}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from .errors import OneEncoderError

SPLITS = ("train", "val", "test")


def caption_key(caption: str) -> str:
    """Normalised caption: samples that share it are one group and share a split."""
    return caption.strip().lower()


def caption_bucket(caption: str) -> int:
    """Bucket 0-9 of the fixed caption-hash split (see docs/concepts.md)."""
    return int(hashlib.sha1(caption_key(caption).encode("utf-8")).hexdigest(), 16) % 10


def caption_split(caption: str) -> str:
    """test if bucket in {0, 1}, val if 2, else train. No test caption is ever trained on."""
    b = caption_bucket(caption)
    return "test" if b in (0, 1) else "val" if b == 2 else "train"


def caption_group(caption: str) -> str:
    return hashlib.sha1(caption_key(caption).encode("utf-8")).hexdigest()[:16]


def read_manifest(path: str | Path) -> list[dict]:
    """Read a manifest; a malformed line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise OneEncoderError(f"manifest not found: {path} (create one with `oneencoder data tuxpaint`)")
    rows, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise OneEncoderError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "id" not in row:
                raise OneEncoderError(f"{path}:{lineno}: each line must be an object with an 'id'")
            if row["id"] in seen:
                raise OneEncoderError(f"{path}:{lineno}: duplicate id {row['id']!r}")
            seen.add(row["id"])
            row.setdefault("split", "train")
            if row["split"] not in SPLITS:
                raise OneEncoderError(f"{path}:{lineno}: split {row['split']!r} is not one of {SPLITS}")
            rows.append(row)
    if not rows:
        raise OneEncoderError(f"manifest {path} has no samples")
    return rows


def manifest_hash(rows: Iterable[dict]) -> str:
    """Content hash of a manifest, recorded in the model's stage history."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True).encode("utf-8"))
    return h.hexdigest()
