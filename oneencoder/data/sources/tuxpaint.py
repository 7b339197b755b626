"""Tux Paint stamps (Debian ``tuxpaint-stamps-default``, GPL-2) as image-text pairs.

Each stamp is ``name.png`` (or ``name.svg``) with ``name.txt`` whose first line is
the English caption; ``name.ogg`` is an optional sound effect. The data is read
in place from ``/usr/share/tuxpaint/stamps`` and never copied.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ...errors import OneEncoderError
from ..manifest import caption_group, caption_split

DEFAULT_ROOT = Path("/usr/share/tuxpaint/stamps")
INSTALL_HINT = "install it with `apt-get update && apt-get install -y tuxpaint-stamps-default` (or run `make setup`)"


def _caption(txt: Path) -> str:
    try:
        first = txt.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return first[0].strip() if first else ""


def tuxpaint_records(root: str | Path = DEFAULT_ROOT) -> list[dict]:
    """One record per stamp image, sorted by id. Stamps without a caption keep ``caption: ""``.

    Empty captions are kept on purpose so the cache build reports them as rejects.
    """
    root = Path(root)
    if not root.is_dir():
        raise OneEncoderError(f"Tux Paint stamps not found at {root}; {INSTALL_HINT}")
    images: dict[Path, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in (".png", ".svg") or "_desc" in path.stem:
            continue
        stem = path.with_suffix("")
        # Prefer the PNG photo when a stamp ships both.
        if stem not in images or path.suffix.lower() == ".png":
            images[stem] = path
    records = []
    for stem, image in sorted(images.items()):
        txt = stem.with_suffix(".txt")
        if not txt.exists():
            continue  # not a stamp (no description file at all)
        caption = _caption(txt)
        sound = stem.with_suffix(".ogg")
        rel = stem.relative_to(root)
        records.append(
            {
                "id": str(rel),
                "image": str(image),
                "caption": caption,
                "category": rel.parts[0],
                "group": caption_group(caption) if caption else f"nocaption:{rel}",
                "sound": str(sound) if sound.exists() else None,
                "split": caption_split(caption),
            }
        )
    if not records:
        raise OneEncoderError(f"no stamps with captions under {root}; {INSTALL_HINT}")
    return records


def summarize(records: list[dict]) -> dict[str, int]:
    splits = Counter(r["split"] for r in records)
    return {
        "stamps": len(records),
        "unique_captions": len({r["group"] for r in records if r["caption"]}),
        "with_sound": sum(1 for r in records if r["sound"]),
        **{f"split_{k}": v for k, v in sorted(splits.items())},
    }
