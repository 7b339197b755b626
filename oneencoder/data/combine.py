"""One manifest from several: a multi-source stage keeps every source's held-out test rows apart.

Each input's rows are copied with absolute file paths (then written relative where they lie
under the output's folder, as every manifest is). A test row that carries no ``heldout``
value gets its source's name, so evaluation scores every source on its own gallery (the
``test subset`` tables) as well as all together. Ids must be unique across the inputs.

Example:
    >>> combine_manifests(["outputs/audio/manifest.jsonl", "outputs/sounds/manifest.jsonl"],
    ...                   "outputs/audio-sounds/manifest.jsonl", names=["tuxpaint", None])
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

from ..errors import OneEncoderError
from ..names import safe_name
from .manifest import read_manifest, write_manifest


def combine_manifests(inputs: Sequence[str | Path], out: str | Path,
                      names: Sequence[str | None] | None = None) -> dict[str, dict[str, int]]:
    """Write the rows of ``inputs`` to ``out``; returns rows per input and split.

    Args:
        inputs: Manifests to combine, in order.
        out: Manifest to write (atomically).
        names: Per input, the ``heldout`` value its unmarked test rows get; None (the
            default for every input) keeps them unmarked, so they are scored only with
            the whole test split.

    Raises:
        OneEncoderError: An input is missing or invalid, two inputs share an id, or the
            names do not match the inputs.
    """
    names = list(names) if names is not None else [None] * len(inputs)
    if len(names) != len(inputs):
        raise OneEncoderError(f"{len(names)} names for {len(inputs)} manifests: give one per manifest")
    rows, owner, counts = [], {}, {}
    for path, name in zip(inputs, names):
        if name is not None:
            safe_name(name, f"the name of {path}")
        manifest = read_manifest(path)  # file paths come back absolute
        for row in manifest:
            if row["id"] in owner:
                raise OneEncoderError(f"{path}: id {row['id']!r} is also in {owner[row['id']]}; "
                                      "ids must be unique across the combined manifests")
            owner[row["id"]] = str(path)
            if name is not None and row["split"] == "test" and not row.get("heldout"):
                row = {**row, "heldout": name}
            rows.append(row)
        counts[str(path)] = dict(Counter(r["split"] for r in manifest))
    write_manifest(out, rows)
    return counts
