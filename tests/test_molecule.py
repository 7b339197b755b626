"""The molecule modality (RDKit Morgan + fragment tokens) and the chemicals dataset builder."""

from __future__ import annotations

import json

import pytest
import torch

from oneencoder.data.sources.chemicals import chemicals_records, summarize
from oneencoder.errors import ConfigError, SampleError
from oneencoder.features.cache import FeatureCache, build_cache, cache_dir_for, rejects_path
from oneencoder.modalities.molecule import fragment_counts, fragment_names
from oneencoder.modality import create_modality

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"


@pytest.fixture(scope="module")
def mol() -> object:
    return create_modality("molecule")


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return chemicals_records(limit=2000)


def test_spec(mol) -> None:
    assert mol.spec.record_key == "smiles" and mol.spec.default_anchor == "text"
    assert mol.spec.dedupe_in_eval is False
    assert mol.feature_dim == 1024 and mol.max_tokens == 16
    assert mol.language_slice() is None
    assert len(mol.weights_sha256()) == 64


def test_ethanol_tokens(mol) -> None:
    tokens = mol.preprocess(mol.load("CCO"))
    assert tokens.ndim == 2 and tokens.shape[1] == mol.feature_dim
    assert 1 <= tokens.shape[0] <= mol.max_tokens
    assert tokens.dtype == torch.float32
    # Token 0: log1p Morgan counts (non-negative, non-empty).
    assert (tokens[0] >= 0).all() and tokens[0].sum() > 0
    # Same input, same tokens (the frozen encoder is deterministic).
    assert torch.equal(tokens, mol.preprocess(mol.load("CCO")))


def test_carboxylic_acid_has_cooh_fragment_token(mol) -> None:
    names = fragment_names()
    present = fragment_counts(mol.load("CC(=O)O"))
    assert "fr_COO" in [name for _, name, _ in present]
    tokens = mol.preprocess(mol.load("CC(=O)O"))
    assert tokens.shape[0] == 1 + len(present)
    cooh = names.index("fr_COO")
    one_hot = tokens[1:, : len(names)]
    assert (one_hot.sum(1) == 1).all()
    assert one_hot[:, cooh].sum() == 1
    row = int(one_hot[:, cooh].argmax()) + 1
    assert tokens[row, len(names)] == pytest.approx(torch.log1p(torch.tensor(1.0)).item())
    assert tokens[row, len(names) + 1] == 1.0
    # Fragment tokens come in fragment-index order.
    order = one_hot.argmax(1).tolist()
    assert order == sorted(order)


def test_max_tokens_caps_fragments() -> None:
    small = create_modality("molecule", max_tokens=3)
    assert small.preprocess(small.load(ASPIRIN)).shape[0] == 3
    assert create_modality("molecule", max_tokens=1).preprocess(small.load(ASPIRIN)).shape[0] == 1


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="feature_dim"):
        create_modality("molecule", feature_dim=16)
    with pytest.raises(ConfigError, match="max_tokens"):
        create_modality("molecule", max_tokens=0)


@pytest.mark.parametrize("smiles,rdkit_text", [
    ("C1CC", "unclosed ring"),
    ("C(C)(C)(C)(C)C", "valence"),
    ("not a smiles", "Parse Error"),
])
def test_invalid_smiles_is_a_sample_error_with_rdkit_message(mol, smiles: str, rdkit_text: str) -> None:
    with pytest.raises(SampleError, match=rdkit_text) as info:
        mol.load(smiles)
    assert smiles in str(info.value)
    with pytest.raises(SampleError, match="empty"):
        mol.load("  ")


def test_difficulty(mol) -> None:
    benzene = mol.difficulty(mol.load("c1ccccc1"), torch.zeros(1, 1))
    assert benzene["n_rings"] == 1 and benzene["n_heavy_atoms"] == 6 and benzene["n_stereocentres"] == 0
    ethanol = mol.difficulty(mol.load("CCO"), torch.zeros(1, 1))
    aspirin = mol.difficulty(mol.load(ASPIRIN), torch.zeros(1, 1))
    assert aspirin["bertz_ct"] > ethanol["bertz_ct"]
    alanine = mol.difficulty(mol.load("C[C@@H](C(=O)O)N"), torch.zeros(1, 1))
    assert alanine["n_stereocentres"] == 1


def test_encode_batch(mol) -> None:
    backbone = mol.load_backbone()
    assert not any(p.requires_grad for p in backbone.parameters())
    items = [mol.preprocess(mol.load(s)) for s in ("CCO", ASPIRIN, "c1ccccc1")]
    tokens, mask = mol.encode(backbone, mol.collate(items))
    width = max(t.shape[0] for t in items)
    assert tokens.shape == (3, width, mol.feature_dim) and mask.shape == (3, width)
    assert mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [t.shape[0] for t in items]
    for row, item in enumerate(items):
        assert torch.equal(tokens[row, mask[row]], item)
        assert (tokens[row, ~mask[row]] == 0).all()


def test_chemicals_records_are_scaffold_disjoint(records) -> None:
    assert 1500 <= len(records) <= 2000
    assert all(r["caption"] for r in records)
    assert all(r["id"].startswith("cid:") for r in records)
    assert len({r["id"] for r in records}) == len(records)
    by_split: dict[str, set[str]] = {}
    for r in records:
        by_split.setdefault(r["split"], set()).add(r["scaffold"])
    assert set(by_split) == {"train", "val", "test"}
    assert not by_split["train"] & by_split["test"]
    assert not by_split["train"] & by_split["val"]
    assert not by_split["val"] & by_split["test"]
    s = summarize(records)
    assert s["molecules"] == len(records)
    assert s["split_train"] + s["split_val"] + s["split_test"] == len(records)
    # The first row of the table, as documented.
    assert records[0]["id"] == "cid:7" and records[0]["caption"] == "9-ethyladenine"


def test_chemicals_seed_shuffles_deterministically() -> None:
    a, b = chemicals_records(limit=200, seed=3), chemicals_records(limit=200, seed=3)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert sorted(r["id"] for r in a) == sorted(r["id"] for r in chemicals_records(limit=200))


def test_build_cache_rejects_invalid_smiles(mol, records, tmp_path) -> None:
    subset = [dict(r) for r in records[:50]]
    subset.append({"id": "bad:1", "smiles": "C1CC", "caption": "broken ring", "split": "train"})
    report = build_cache(mol, subset, tmp_path, batch_size=16, progress=False)
    assert "bad:1" in report.rejects and "unclosed ring" in report.rejects["bad:1"]
    assert report.encoded + len(report.rejects) == len(subset)
    assert report.encoded >= 49
    rows = [json.loads(line) for line in rejects_path(tmp_path, "molecule").read_text().splitlines()]
    assert [{k: r[k] for k in ("id", "modality", "reason")} for r in rows] == [
        {"id": "bad:1", "modality": "molecule", "reason": report.rejects["bad:1"]}]  # rows also record the "input"
    with FeatureCache(cache_dir_for(tmp_path, "molecule"), mol.fingerprint(), readonly=True) as cache:
        assert "bad:1" not in cache.ids()
        good = next(r["id"] for r in subset if r["id"] not in report.rejects)
        feats = cache.get(good)
        assert feats.ndim == 2 and feats.shape[1] == mol.feature_dim
        m = cache.measurements([good])[0]
        assert {"bertz_ct", "n_rings", "n_stereocentres", "n_heavy_atoms"} <= set(m)
    # Resuming encodes nothing new.
    again = build_cache(mol, subset, tmp_path, batch_size=16, progress=False)
    assert again.encoded == 0 and again.cached_before == report.encoded
