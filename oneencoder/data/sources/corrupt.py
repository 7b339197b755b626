"""Corrupt a known share of a manifest's training pairs, to measure what noise costs.

:func:`corrupt_rows` picks a seeded fraction of the training rows that have a caption
and shuffles the captions among them with a derangement: no chosen row keeps its own
caption, nor one that reads the same (templates repeat captions, so a plain permutation
would often hand a row its own text back). Each corrupted row gets ``"corrupted": true``
and ``"true_caption"`` (fields training never reads) and a group recomputed from its
new caption. Validation and test rows, and unchosen training rows, are left as they are.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from ...errors import OneEncoderError
from ..manifest import CAPTION_FIELD, caption_group, caption_key, read_manifest, write_manifest

CORRUPTED_FIELD = "corrupted"
TRUE_FIELD = f"true_{CAPTION_FIELD}"
CLEAN_ID_FIELD = "clean_id"


@dataclass
class CorruptReport:
    """What :func:`corrupt_manifest` wrote.

    Attributes:
        out: The corrupted manifest.
        rows: Rows in it.
        eligible: Training rows with a non-empty caption (the pool the fraction is taken of).
        corrupted: Rows whose caption was replaced.
        unmoved: Chosen rows that had to keep their caption (their text made up over half the chosen rows).
    """

    out: Path
    rows: int
    eligible: int
    corrupted: int
    unmoved: int

    def summary(self) -> str:
        line = (f"wrote {self.out}: {self.rows} samples, captions shuffled among {self.corrupted} of "
                f"{self.eligible} training pairs ({self.corrupted / max(self.eligible, 1):.1%})")
        if self.unmoved:
            line += f"; {self.unmoved} chosen rows kept their caption (no other caption to give them)"
        return line


def _eligible(row: dict) -> bool:
    caption = row.get(CAPTION_FIELD)
    return row.get("split", "train") == "train" and isinstance(caption, str) and bool(caption.strip())


def _derangement(keys: list[str], rng: random.Random) -> list[int]:
    """A permutation ``p`` of ``range(len(keys))`` with ``keys[p[i]] != keys[i]`` wherever possible.

    Sattolo's algorithm gives a random single cycle (so ``p[i] != i``); then a position that
    received an equal key swaps targets with another position where the swap helps both.
    """
    n = len(keys)
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]

    def helps(i: int, j: int) -> bool:
        return (j != i and perm[j] != i and perm[i] != j
                and keys[perm[j]] != keys[i] and keys[perm[i]] != keys[j])

    for i in range(n):
        if keys[perm[i]] != keys[i]:
            continue
        # A few random partners almost always do; scanning all is the fallback.
        tries = [rng.randrange(n) for _ in range(32)]
        j = next((j for j in tries if helps(i, j)), None)
        if j is None:
            j = next((j for j in rng.sample(range(n), n) if helps(i, j)), None)
        if j is not None:
            perm[i], perm[j] = perm[j], perm[i]
    return perm


def corrupt_rows(rows: list[dict], fraction: float, seed: int = 0) -> tuple[list[dict], int, int, int]:
    """Shuffle captions among a seeded ``fraction`` of the training rows that have one.

    Args:
        rows: Manifest rows (not modified).
        fraction: Share of the eligible training rows to corrupt, 0 to 1.
        seed: Seed of the choice and of the shuffle.

    Returns:
        ``(new rows, eligible, corrupted, unmoved)``; see :class:`CorruptReport`.
    """
    if not 0.0 <= fraction <= 1.0:
        raise OneEncoderError(f"--fraction must be between 0 and 1, got {fraction}")
    pool = [i for i, row in enumerate(rows) if _eligible(row)]
    k = round(fraction * len(pool))
    k = 0 if k < 2 else k  # one caption alone cannot move
    rng = random.Random(seed)
    chosen = sorted(rng.sample(pool, k))
    keys = [caption_key(rows[i][CAPTION_FIELD]) for i in chosen]
    perm = _derangement(keys, rng)
    out = [dict(row) for row in rows]
    corrupted = unmoved = 0
    for slot, i in enumerate(chosen):
        new = rows[chosen[perm[slot]]][CAPTION_FIELD]
        if caption_key(new) == keys[slot]:
            unmoved += 1
            continue
        group = caption_group(new)
        out[i].update({"id": f"{rows[i]['id']}#corrupt-{group[:8]}", CAPTION_FIELD: new, "group": group,
                       CORRUPTED_FIELD: True, TRUE_FIELD: rows[i][CAPTION_FIELD], CLEAN_ID_FIELD: rows[i]["id"]})
        corrupted += 1
    return out, len(pool), corrupted, unmoved


def corrupt_manifest(src: str | Path, out: str | Path, fraction: float, seed: int = 0) -> CorruptReport:
    """Read ``src``, corrupt a ``fraction`` of its training pairs (:func:`corrupt_rows`), write ``out``.

    Raises:
        OneEncoderError: ``out`` is ``src``, ``src`` is already corrupted, or it is not a valid manifest.
    """
    src, out = Path(src), Path(out)
    if os.path.abspath(src) == os.path.abspath(out):
        raise OneEncoderError(f"--out {out} is the input manifest; write the corrupted copy to another file")
    rows = read_manifest(src)
    if any(CORRUPTED_FIELD in row for row in rows):
        raise OneEncoderError(f"{src} already has corrupted rows (field {CORRUPTED_FIELD!r}); "
                              "corrupt the clean manifest instead")
    new, eligible, corrupted, unmoved = corrupt_rows(list(rows), fraction, seed)
    write_manifest(out, new)
    return CorruptReport(out, len(new), eligible, corrupted, unmoved)
