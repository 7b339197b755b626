"""Molecule: SMILES strings encoded by RDKit, which acts as the frozen "backbone".

No pretrained molecular network ships in any wheel, so the frozen encoder is a fixed,
deterministic featuriser (no weights, no network access):

* **token 0** is a Morgan count fingerprint (radius ``radius``, ``fp_size`` bits),
  folded to ``feature_dim`` dims by summing bit ``i`` into dim ``i % feature_dim``,
  then ``log1p`` of the counts;
* **tokens 1..** are one per functional group / fragment present in the molecule, from
  RDKit's ``FragmentDescriptors.csv`` (the ``rdkit.Chem.Fragments.fr_*`` functions, 85 in
  RDKit 2026.9), ordered by their index in that file, at most ``max_tokens - 1`` of them.

Fragment token layout (``feature_dim`` wide, every other dim zero)::

    dims [0, F)   one-hot of the fragment's index in FragmentDescriptors.csv (F fragments)
    dim  F        log1p(number of matches of the fragment in the molecule)
    dim  F + 1    1.0, a flag that marks a fragment token

So ``feature_dim`` must be at least ``F + 2``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import random
import re
from typing import Any

import numpy as np
import torch
from torch import nn

from oneencoder.errors import ConfigError, SampleError
from oneencoder.features.backbones import freeze
from oneencoder.fileio import sha256_text
from oneencoder.modality import Modality, ModalitySpec, register_modality
from oneencoder.options import AT_LEAST_1, NON_NEGATIVE, declare, option

DEFAULT_BACKBONE = "rdkit:morgan-count+fragments"

# Size caps, checked before any work that grows faster than linearly: RDKit's Bertz
# complexity (a difficulty measurement) and 2-D drawing take ~0.5 s at 600 atoms, ~2.5 s at
# 1,000 and minutes at 5,000. The largest molecule of the PubChem table that `data
# chemicals` reads has 473 atoms and 1,155 characters.
MAX_SMILES_CHARS = 4096
MAX_SMILES_ATOMS = 600
# Drawing (``depict``) grows quadratically: 5,000 atoms drew for over 100 s. A larger molecule
# is shown without a picture.
MAX_DRAW_CHARS = 1_000
MAX_DRAW_ATOMS = 250
_PREVIEW_CHARS = 60  # how much of a rejected SMILES its one-line error quotes
_MESSAGE_CHARS = 300  # RDKit's reason repeats the whole input; keep the line short
# A CXSMILES extension block after one space (``CCO |$;;$|``) is the one thing RDKit may
# read after whitespace; anything else after it would silently become the molecule's name.
_CXSMILES_TAIL = re.compile(r"\S+ \|[^|\s]*\|")


def _rdkit() -> Any:
    try:
        import rdkit  # noqa: F401
        from rdkit import Chem
    except ImportError:  # pragma: no cover - rdkit is a core dependency
        from oneencoder.errors import MissingDependencyError

        raise MissingDependencyError("the molecule modality needs RDKit: `pip install rdkit`") from None
    return Chem


@functools.lru_cache(maxsize=None)
def _fragment_functions() -> tuple[tuple[str, Any], ...]:
    """``(name, count_fn)`` for every fragment of FragmentDescriptors.csv, in file order."""
    from rdkit.Chem import Fragments

    return tuple(Fragments.fns)


def fragment_names() -> list[str]:
    """Names of the fragments (``fr_COO``...) in token-index order."""
    return [name for name, _ in _fragment_functions()]


def _fragment_csv_path() -> str:
    from rdkit import RDConfig

    return os.path.join(RDConfig.RDDataDir, "FragmentDescriptors.csv")


@functools.lru_cache(maxsize=None)
def _morgan_generator(radius: int, fp_size: int) -> Any:
    from rdkit.Chem import rdFingerprintGenerator

    return rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=fp_size)


def _clean_rdkit_message(text: str) -> str:
    """RDKit's log lines without their ``[hh:mm:ss]`` stamps, joined into one line."""
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and "]" in line[:12]:
            line = line[line.index("]") + 1 :].strip()
        if line:
            lines.append(line)
    return "; ".join(lines)


def _preview(text: str) -> str:
    """``text`` quoted for a one-line error, shortened when long."""
    if len(text) <= _PREVIEW_CHARS:
        return repr(text)
    return f"{text[:_PREVIEW_CHARS]!r}... ({len(text):,} characters)"


def _check_text(text: str) -> None:
    """Refuse what cannot be one SMILES before RDKit reads it (its cost grows with the size)."""
    if len(text) > MAX_SMILES_CHARS:
        raise SampleError(f"SMILES {_preview(text)} is over the limit of {MAX_SMILES_CHARS:,} characters")
    if any(not c.isprintable() and not c.isspace() for c in text):  # NUL, escape codes...
        raise SampleError(f"invalid SMILES {_preview(text)}: it holds control characters")


def _check_no_tail(text: str) -> None:
    """Refuse text after the SMILES. RDKit stops at the first space or tab and keeps the rest
    as the molecule's name, so "O=C=O extra words" would silently be read as CO2."""
    if any(c.isspace() for c in text) and not _CXSMILES_TAIL.fullmatch(text):
        first = text.split()[0]
        raise SampleError(f"invalid SMILES {_preview(text)}: text after {_preview(first)} is not SMILES "
                          "(one molecule per field, no spaces or names)")


def parse_smiles(smiles: str) -> Any:
    """SMILES to a sanitised RDKit ``Mol``.

    Leading and trailing whitespace is ignored; a SMILES longer than ``MAX_SMILES_CHARS``
    characters, with more than ``MAX_SMILES_ATOMS`` atoms, or with other text after it
    (only a CXSMILES ``|...|`` block may follow a space) is refused.

    Raises:
        SampleError: with RDKit's own message (parse error, valence problem...), or the limit exceeded.
    """
    Chem = _rdkit()
    from rdkit import rdBase

    if not isinstance(smiles, str):
        raise SampleError(f"SMILES must be a string, got {type(smiles).__name__}")
    text = smiles.strip()
    if not text:
        raise SampleError("empty SMILES")
    _check_text(text)
    with rdBase.CaptureErrorLog() as capture:
        mol = Chem.MolFromSmiles(text, sanitize=False)
    if mol is None:
        why = _clean_rdkit_message(capture.messages) or "RDKit could not parse it"
        raise SampleError(f"invalid SMILES {_preview(text)}: {why[:_MESSAGE_CHARS]}")
    _check_no_tail(text)  # after parsing, so a wrong first word still gets RDKit's own reason
    # Parsing is linear; sanitising, fingerprints and descriptors are not: count first.
    if mol.GetNumAtoms() > MAX_SMILES_ATOMS:
        raise SampleError(f"SMILES {_preview(text)} has {mol.GetNumAtoms():,} atoms, over the limit of "
                          f"{MAX_SMILES_ATOMS:,}")
    try:
        with rdBase.CaptureErrorLog():
            Chem.SanitizeMol(mol)
    except Exception as e:  # Chem.MolSanitizeException and its subclasses (valence, kekulize...)
        why = _clean_rdkit_message(str(e)) or type(e).__name__
        raise SampleError(f"invalid SMILES {_preview(text)}: {why[:_MESSAGE_CHARS]}") from None
    return mol


def fragment_counts(mol: Any) -> list[tuple[int, str, int]]:
    """``(index, name, count)`` for every fragment present (count > 0), by index."""
    out = []
    for index, (name, fn) in enumerate(_fragment_functions()):
        count = int(fn(mol))
        if count > 0:
            out.append((index, name, count))
    return out


class _RDKitBackbone(nn.Module):
    """The frozen encoder: features are computed in ``preprocess``, so this is the identity.

    It has no parameters; a zero-size buffer follows ``.to(device)`` so ``encode`` knows
    where the caller wants the tokens.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("device_anchor", torch.zeros(0), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


@register_modality
class MoleculeModality(Modality):
    """Small molecules given as SMILES; invalid SMILES are per-sample errors with RDKit's reason."""

    spec = ModalitySpec(
        name="molecule",
        backbone=DEFAULT_BACKBONE,
        preprocess_version="molecule-v1",
        record_key="smiles",
        default_anchor="text",
        dedupe_in_eval=False,
        metric_style="ranking",  # reported the Text2Mol way: MRR, Hits@1, Hits@10
        extra_deps=("rdkit",),
        typed_query="smiles",
        typed_query_label="Molecule (SMILES)",
        typed_query_example="CCO",
    )
    default_options = declare({
        "backbone": DEFAULT_BACKBONE,
        # Morgan bits are folded to this width; fragment tokens use the same width
        "feature_dim": option(1024, range=AT_LEAST_1),
        # total tokens: 1 Morgan + at most max_tokens - 1 fragments
        "max_tokens": option(16, range=AT_LEAST_1),
        "radius": option(2, range=NON_NEGATIVE),  # 0: each atom alone
        "fp_size": option(2048, range=AT_LEAST_1),
    })

    @classmethod
    def licence_for(cls, backbone: str, options: dict[str, Any]) -> tuple[str, str] | None:
        """RDKit's licence: its fingerprints and fragment table are the frozen encoder (no weights)."""
        return ("BSD-3-Clause", "RDKit (Morgan count fingerprints and FragmentDescriptors.csv); no pretrained "
                                "weights") if backbone == DEFAULT_BACKBONE else None

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.backbone_id != DEFAULT_BACKBONE:
            raise ConfigError(f"[modalities.molecule] backbone {self.backbone_id!r}: only {DEFAULT_BACKBONE!r} exists")
        n_frag = len(_fragment_functions())
        if int(self.options["feature_dim"]) < n_frag + 2:
            raise ConfigError(f"[modalities.molecule] feature_dim={self.options['feature_dim']} is too small; "
                              f"fragment tokens need at least {n_frag + 2}")

    @property
    def feature_dim(self) -> int:
        return int(self.options["feature_dim"])

    @property
    def max_tokens(self) -> int:
        return int(self.options["max_tokens"])

    def weights_sha256(self) -> str:
        import rdkit

        with open(_fragment_csv_path(), encoding="utf-8", errors="replace") as f:
            fragments = f.read()
        desc = (f"rdkit={rdkit.__version__};morgan-count radius={self.options['radius']} "
                f"fpSize={self.options['fp_size']} fold={self.feature_dim} log1p;"
                f"fragments={hashlib.sha256(fragments.encode()).hexdigest()}")
        return sha256_text(desc)

    def load_backbone(self) -> nn.Module:
        return freeze(_RDKitBackbone())

    def load(self, source: Any) -> Any:
        return parse_smiles(source)

    def _morgan_token(self, mol: Any) -> np.ndarray:
        gen = _morgan_generator(int(self.options["radius"]), int(self.options["fp_size"]))
        counts = gen.GetCountFingerprintAsNumPy(mol).astype(np.float64)
        folded = np.zeros(self.feature_dim, dtype=np.float64)
        np.add.at(folded, np.arange(counts.shape[0]) % self.feature_dim, counts)
        return np.log1p(folded).astype(np.float32)

    def preprocess(self, raw: Any) -> torch.Tensor:
        present = fragment_counts(raw)[: self.max_tokens - 1]
        n_frag = len(_fragment_functions())
        tokens = np.zeros((1 + len(present), self.feature_dim), dtype=np.float32)
        tokens[0] = self._morgan_token(raw)
        for row, (index, _, count) in enumerate(present, 1):
            tokens[row, index] = 1.0
            tokens[row, n_frag] = math.log1p(count)
            tokens[row, n_frag + 1] = 1.0
        return torch.from_numpy(tokens)

    def collate(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        width = max(t.shape[0] for t in items)
        tokens = torch.zeros((len(items), width, self.feature_dim), dtype=torch.float32)
        mask = torch.zeros((len(items), width), dtype=torch.bool)
        for row, t in enumerate(items):
            tokens[row, : t.shape[0]] = t
            mask[row, : t.shape[0]] = True
        return {"tokens": tokens, "mask": mask}

    @torch.inference_mode()
    def encode(self, backbone: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # The backbone has no parameters: its buffer (or else the batch) says where to go.
        anchor = next(backbone.buffers(), None)
        device = anchor.device if anchor is not None else batch["tokens"].device
        tokens = backbone(batch["tokens"].to(device)).float()
        return tokens, batch["mask"].to(device)

    def language_slice(self) -> tuple[int, int] | None:
        return None

    def difficulty(self, raw: Any, tokens: torch.Tensor) -> dict[str, float]:
        """Structural complexity for the curriculum scorers.

        Returns:
            ``bertz_ct`` (Bertz complexity index), ``n_rings`` (SSSR ring count),
            ``n_stereocentres`` (tetrahedral centres, assigned or not) and ``n_heavy_atoms``.
        """
        from rdkit import Chem
        from rdkit.Chem import GraphDescriptors, rdMolDescriptors

        centres = Chem.FindMolChiralCenters(raw, includeUnassigned=True, useLegacyImplementation=False)
        return {
            "bertz_ct": float(GraphDescriptors.BertzCT(raw)),
            "n_rings": float(rdMolDescriptors.CalcNumRings(raw)),
            "n_stereocentres": float(len(centres)),
            "n_heavy_atoms": float(raw.GetNumHeavyAtoms()),
        }

    # ----- corruptions of ``eval --robustness`` ----------------------------------------------
    def corruptions(self) -> dict[str, tuple[float, ...]]:
        """Atom ``masking``: 10, 30 or 50 % of the heavy atoms (at least one) become RDKit dummy atoms
        (``*``, atomic number 0), bonds kept: the fingerprint and fragment tokens lose what those
        atoms were, not the molecule's shape."""
        return {"masking": (0.1, 0.3, 0.5)}

    def corrupt(self, raw: Any, kind: str, strength: float, rng: random.Random) -> Any:
        Chem = _rdkit()
        from rdkit import rdBase

        if kind != "masking":
            raise ConfigError(f"molecule corruption {kind!r} not known; use masking")
        heavy = [a.GetIdx() for a in raw.GetAtoms() if a.GetAtomicNum() > 1]
        count = min(len(heavy), max(1, round(strength * len(heavy)))) if strength > 0 else 0
        mol = Chem.RWMol(raw)
        for index in rng.sample(heavy, count):
            atom = mol.GetAtomWithIdx(index)
            atom.SetAtomicNum(0)
            atom.SetFormalCharge(0)
            atom.SetIsotope(0)
            atom.SetNumExplicitHs(0)
            atom.SetNoImplicit(True)  # a dummy carries no hydrogens of its own
        out = mol.GetMol()
        with rdBase.BlockLogs():
            try:
                Chem.SanitizeMol(out)
            except Exception:  # noqa: BLE001 - a masked ring that no longer kekulises: keep it unsanitised
                out.UpdatePropertyCache(strict=False)
                Chem.GetSymmSSSR(out)
        return out

    def depict(self, value: Any, width: int = 220, height: int = 160) -> str | None:
        """RDKit's 2-D drawing of a SMILES string as SVG markup (to inline in HTML).

        None if RDKit cannot parse it, or if it is over :data:`MAX_DRAW_CHARS` characters or
        :data:`MAX_DRAW_ATOMS` atoms: drawing grows much faster than the molecule, so these caps
        hold whatever this modality accepts as input.
        """
        from rdkit import Chem, rdBase
        from rdkit.Chem.Draw import rdMolDraw2D

        if not isinstance(value, str) or len(value) > MAX_DRAW_CHARS:
            return None
        with rdBase.BlockLogs():
            mol = Chem.MolFromSmiles(value)
        if mol is None or mol.GetNumAtoms() > MAX_DRAW_ATOMS:
            return None
        drawer = rdMolDraw2D.MolDraw2DSVG(width, height)
        drawer.drawOptions().clearBackground = False
        rdMolDraw2D.PrepareAndDrawMolecule(drawer, mol)
        drawer.FinishDrawing()
        svg = drawer.GetDrawingText()
        return svg[svg.find("<svg"):]  # without the XML declaration


# The name before every built-in became XModality: model directories saved earlier record
# "oneencoder.modalities.molecule:Molecule", which must keep loading.
Molecule = MoleculeModality
