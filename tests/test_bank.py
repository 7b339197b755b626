"""Feature banks: the disk bank (memory map exported beside the cache) against the in-memory one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import oneencoder.features.bank as bank_module
from oneencoder.errors import ConfigError
from oneencoder.features.bank import DiskFeatureBank, FeatureBank, choose_bank, export_dir, export_features, load_banks
from oneencoder.features.cache import FeatureCache, cache_dir_for
from oneencoder.modality import Modality
from oneencoder.training.pairs import load_pair_split

pytestmark = pytest.mark.bytes  # compares outputs byte for byte (docs/reliability.md)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.fixture()
def cache_copy(small_cache: Path, tmp_path: Path) -> Path:
    """A private copy of the session's real cache, so exports and edits stay out of it."""
    root = tmp_path / "cache"
    for name in ("image", "text"):
        shutil.copytree(cache_dir_for(small_cache, name), cache_dir_for(root, name))
    return root


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randperm(n, generator=g)[:7], torch.tensor([3, 3, 0]), torch.arange(n), torch.tensor([n - 1])]


def _assert_same_bank(disk: DiskFeatureBank, memory: FeatureBank, device: str = "cpu") -> None:
    assert len(disk) == len(memory) and disk.dim == memory.dim
    for index in _batches(len(memory)):
        (td, md), (tm, mm) = disk.gather(index), memory.gather(index)
        assert td.device.type == tm.device.type == device and td.dtype == tm.dtype == torch.float32
        assert torch.equal(md, mm) and torch.equal(td, tm)


@pytest.mark.parametrize("device", DEVICES)
def test_disk_bank_equals_memory_bank_on_a_real_cache(cache_copy: Path, small_records: list[dict],
                                                      stage_modalities: dict[str, Modality], device: str) -> None:
    ids = [r["id"] for r in small_records]
    for name, modality in stage_modalities.items():
        with FeatureCache(cache_dir_for(cache_copy, name), modality.fingerprint(), readonly=True) as cache:
            memory = FeatureBank.from_cache(cache, ids, device)
            disk = DiskFeatureBank.from_cache(cache, ids, device)
            assert export_dir(cache, ids).parent == cache_copy / f"{name}.export"  # beside the cache
        _assert_same_bank(disk, memory, device)


def test_disk_bank_with_ragged_and_empty_samples(tmp_path: Path) -> None:
    fingerprint = {"modality": "synthetic", "feature_dim": 5, "max_tokens": 6}
    g = torch.Generator().manual_seed(1)
    tokens = {f"s{i}": torch.randn(n, 5, generator=g).half() for i, n in enumerate([3, 1, 6, 0, 2, 6, 1])}
    with FeatureCache(tmp_path / "synthetic", fingerprint) as cache:
        cache.put_many([(sid, t, {}) for sid, t in tokens.items()])
    ids = list(tokens)[::-1]
    with FeatureCache(tmp_path / "synthetic", fingerprint, readonly=True) as cache:
        memory, disk = FeatureBank.from_cache(cache, ids), DiskFeatureBank.from_cache(cache, ids)
    assert disk.lengths.tolist() == [tokens[i].shape[0] for i in ids]
    _assert_same_bank(disk, memory)


def test_export_is_reused_until_the_cache_changes(cache_copy: Path, small_records: list[dict],
                                                  text_modality: Modality) -> None:
    path, fingerprint = cache_dir_for(cache_copy, "text"), text_modality.fingerprint()
    ids = [r["id"] for r in small_records]
    with FeatureCache(path, fingerprint, readonly=True) as cache:
        directory = export_features(cache, ids)
        inode = (directory / "tokens.f16").stat().st_ino
        assert export_features(cache, ids) == directory
        assert (directory / "tokens.f16").stat().st_ino == inode  # current: reused, not rewritten
        other = export_features(cache, ids[:5])
        assert other != directory  # another id list, another export
    # Rewrite one sample: the export made before is stale and must be rebuilt, never read.
    changed = torch.full((1, text_modality.feature_dim), 0.5, dtype=torch.float16)
    with FeatureCache(path, fingerprint) as cache:
        cache.put_many([(ids[2], changed, {})])
    with FeatureCache(path, fingerprint, readonly=True) as cache:
        bank = DiskFeatureBank.from_cache(cache, ids)
        assert export_dir(cache, ids) == directory
        memory = FeatureBank.from_cache(cache, ids)
    assert (directory / "tokens.f16").stat().st_ino != inode
    tokens, _ = bank.gather(torch.tensor([2]))
    assert torch.equal(tokens[0], changed.float())
    _assert_same_bank(bank, memory)
    # An interrupted export leaves no meta.json; the next open rebuilds it.
    (directory / "meta.json").unlink()
    with FeatureCache(path, fingerprint, readonly=True) as cache:
        _assert_same_bank(DiskFeatureBank.from_cache(cache, ids), memory)
    assert json.loads((directory / "meta.json").read_text())["n"] == len(ids)


def test_load_pair_split_on_disk_equals_memory(cache_copy: Path, small_records: list[dict],
                                               stage_modalities: dict[str, Modality]) -> None:
    memory = load_pair_split(small_records, "train", stage_modalities, cache_copy)
    disk = load_pair_split(small_records, "train", stage_modalities, cache_copy, bank="disk")
    assert disk.ids == memory.ids and disk.groups == memory.groups
    for name in stage_modalities:
        assert isinstance(memory.banks[name], FeatureBank) and isinstance(disk.banks[name], DiskFeatureBank)
        _assert_same_bank(disk.banks[name], memory.banks[name])


def test_auto_takes_disk_only_when_the_banks_do_not_fit(cache_copy: Path, stage_modalities: dict[str, Modality],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    caches = {n: FeatureCache(cache_dir_for(cache_copy, n), m.fingerprint(), readonly=True)
              for n, m in stage_modalities.items()}
    try:
        needed = sum(bank_module.padded_bytes(c, 1000) for c in caches.values())
        assert needed == 1000 * 2 * sum(m.max_tokens * m.feature_dim for m in stage_modalities.values())
        free = bank_module.available_memory()
        assert free is not None and free > 0  # /proc/meminfo here (or psutil when installed)
        monkeypatch.setattr(bank_module, "available_memory", lambda device="cpu": needed * 2)
        assert choose_bank("auto", caches, 1000) == "disk"  # more than a third of what is free
        monkeypatch.setattr(bank_module, "available_memory", lambda device="cpu": needed * 4)
        assert choose_bank("auto", caches, 1000) == "memory"
        assert choose_bank("disk", caches, 1000) == "disk" and choose_bank("memory", caches, 1000) == "memory"
        with pytest.raises(ConfigError, match=r"\[train\] bank = 'ram'"):
            load_banks(caches, ["x"], "ram")
    finally:
        for cache in caches.values():
            cache.close()


def test_bank_from_padded_equals_the_list_constructor() -> None:
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randn(n, 4, generator=g).half() for n in (2, 4, 1)]
    padded = torch.randn(3, 4, 4, generator=g)  # garbage past each length must read as zeros
    for i, t in enumerate(seqs):
        padded[i, : t.shape[0]] = t.float()
    bank = FeatureBank.from_padded(padded, torch.tensor([t.shape[0] for t in seqs]))
    reference = FeatureBank(seqs)
    assert torch.equal(bank.data, reference.data) and torch.equal(bank.lengths, reference.lengths)
    with pytest.raises(ValueError, match="lengths"):
        FeatureBank.from_padded(padded, torch.tensor([5, 1, 1]))
