"""Write a sketch manifest from an image manifest (e.g. the one `oneencoder data tuxpaint` writes).

Each record keeps its id, caption, group and split, and gets ``"sketch"``: the absolute path
of its image (the sketch is drawn from the image when features are cached). The ``image``
field is dropped, so the sketch stage caches only sketches and captions.

Usage::

    python examples/sketch/make_manifest.py outputs/demo/manifest.jsonl outputs/sketch/manifest.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

KEEP = ("id", "caption", "group", "split", "category")


def sketch_records(rows: list[dict], root: Path) -> list[dict]:
    """Sketch records from image records; relative image paths are taken against ``root``."""
    out = []
    for row in rows:
        image = row.get("image")
        if not image:
            continue
        path = image if os.path.isabs(image) else os.path.normpath(root / image)
        out.append({**{k: row[k] for k in KEEP if k in row}, "sketch": path})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="manifest with an 'image' field per record")
    parser.add_argument("out", type=Path, help="sketch manifest to write")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        print(f"error: manifest not found: {args.source}", file=sys.stderr)
        return 2
    with open(args.source, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    records = sketch_records(rows, args.source.resolve().parent)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:  # write, then rename: never a half-written manifest
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(records)} sketches")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
