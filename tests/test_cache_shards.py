"""Sharded cache builds (``--shard i/n``, torchrun ranks) merged into one cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.errors import CacheMismatchError, OneEncoderError
from oneencoder.features.cache import (FeatureCache, build_cache, cache_dir_for, cache_lock, input_key, read_rejects,
                                       rejects_path)
from oneencoder.features.rounding import feature_mismatch
from oneencoder.features.shards import Shard, merge_shards
from oneencoder.fileio import write_jsonl_atomic
from oneencoder.modality import create_modality

pytestmark = pytest.mark.bytes  # compares outputs byte for byte (docs/reliability.md)

# Shards batch other samples together than one build does, and features depend in their last
# fp16 bit on the batch (kernel choice per batch size and processor; text padding): features are
# compared to within fp16 rounding (oneencoder.features.rounding), everything else exactly.
BATCH = {"image": 4, "text": 4}


@pytest.fixture(scope="module")
def records(small_records, bad_records) -> list[dict]:
    return small_records[:10] + bad_records


def _contents(root: Path, modality) -> dict:
    """Everything a reader sees but the features: ids, measurements, inputs, the rejects file."""
    with FeatureCache(cache_dir_for(root, modality.spec.name), modality.fingerprint(), readonly=True) as cache:
        ids = sorted(cache.ids())
        return {"ids": ids, "measurements": cache.measurements(ids), "inputs": cache.inputs(),
                "rejects": rejects_path(root, modality.spec.name).read_bytes()}


def _features_mismatch(root: Path, reference: Path, modality) -> list[str]:
    """Ids whose features differ from ``reference``'s by more than fp16 rounding, with why."""
    fingerprint = modality.fingerprint()
    with (FeatureCache(cache_dir_for(root, modality.spec.name), fingerprint, readonly=True) as got,
          FeatureCache(cache_dir_for(reference, modality.spec.name), fingerprint, readonly=True) as want):
        ids = sorted(want.ids())
        pairs = zip(ids, got.get_many(ids), want.get_many(ids))
        return [f"{sid}: {why}" for sid, a, b in pairs if (why := feature_mismatch(a, b))]


@pytest.fixture(scope="module")
def unsharded(records, stage_modalities, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("one")
    for name, m in stage_modalities.items():
        build_cache(m, records, root, batch_size=BATCH[name], progress=False)
    return root


def test_two_shards_merged_equal_one_build(records, stage_modalities, unsharded, tmp_path: Path) -> None:
    for name, m in stage_modalities.items():
        reports = [build_cache(m, records, tmp_path, batch_size=BATCH[name], progress=False, shard=Shard(i, 2))
                   for i in range(2)]
        parts = [set(_contents(Shard(i, 2).root(tmp_path), m)["ids"]) for i in range(2)]
        assert parts[0] and parts[1] and not parts[0] & parts[1]  # both shards did work, none twice
        assert sum(r.total for r in reports) == len(records)
        merged = merge_shards(name, m.fingerprint(), tmp_path)
        assert merged.shards == 2 and merged.entries == len(parts[0] | parts[1])
        assert merged.rejects == sum(len(r.rejects) for r in reports) == 2 - (name == "text")
        expected = _contents(unsharded, m)
        assert _contents(tmp_path, m) == expected
        assert _features_mismatch(tmp_path, unsharded, m) == []
        # Idempotent: a rerun of the merge changes no byte.
        with FeatureCache(cache_dir_for(tmp_path, name), m.fingerprint(), readonly=True) as cache:
            merged_bytes = [t.numpy().tobytes() for t in cache.get_many(expected["ids"])]
        again = merge_shards(name, m.fingerprint(), tmp_path)
        assert again == merged and _contents(tmp_path, m) == expected
        with FeatureCache(cache_dir_for(tmp_path, name), m.fingerprint(), readonly=True) as cache:
            assert [t.numpy().tobytes() for t in cache.get_many(expected["ids"])] == merged_bytes
    # Readers open the merged cache exactly as an unsharded one.
    from oneencoder.training.pairs import load_pair_split

    split = load_pair_split(records, "train", stage_modalities, tmp_path)
    reference = load_pair_split(records, "train", stage_modalities, unsharded)
    assert split.ids == reference.ids and len(split.ids) > 0
    for name in stage_modalities:
        assert feature_mismatch(split.banks[name].data, reference.banks[name].data) is None


def test_a_second_sharded_build_encodes_only_what_the_merged_cache_lacks(records, text_modality,
                                                                         tmp_path: Path) -> None:
    for i in range(2):
        build_cache(text_modality, records[:6], tmp_path, progress=False, shard=Shard(i, 2))
    merge_shards("text", text_modality.fingerprint(), tmp_path, remove=True)
    assert not (tmp_path / "shards").exists()
    reports = [build_cache(text_modality, records, tmp_path, progress=False, shard=Shard(i, 2)) for i in range(2)]
    assert sum(r.cached_before for r in reports) == 6
    assert sum(r.encoded for r in reports) == len(records) - 6 - 1  # the empty caption is rejected
    merge_shards("text", text_modality.fingerprint(), tmp_path)
    with FeatureCache(cache_dir_for(tmp_path, "text"), text_modality.fingerprint(), readonly=True) as cache:
        assert len(cache) == len(records) - 1


def test_merge_refuses_a_shard_with_another_fingerprint(records, text_modality, tmp_path: Path) -> None:
    build_cache(text_modality, records, tmp_path, progress=False, shard=Shard(0, 2))
    build_cache(create_modality("text", max_tokens=16), records, tmp_path, progress=False, shard=Shard(1, 2))
    with pytest.raises(CacheMismatchError, match=r"^shard 1/2: .*max_tokens") as refused:
        merge_shards("text", text_modality.fingerprint(), tmp_path)
    assert "\n" not in str(refused.value)
    assert not cache_dir_for(tmp_path, "text").exists()  # nothing was written


def test_merge_refuses_unfinished_or_mixed_shards(records, text_modality, tmp_path: Path) -> None:
    with pytest.raises(OneEncoderError, match="no shards of 'text'"):
        merge_shards("text", text_modality.fingerprint(), tmp_path)
    build_cache(text_modality, records[:4], tmp_path, progress=False, shard=Shard(0, 2))
    with pytest.raises(OneEncoderError, match=r"shard 1/2 of 'text' is not finished .*--shard 1/2"):
        merge_shards("text", text_modality.fingerprint(), tmp_path)
    build_cache(text_modality, records[:4], tmp_path, progress=False, shard=Shard(0, 3))
    with pytest.raises(OneEncoderError, match=r"several counts \(2, 3\); pass --shards N"):
        merge_shards("text", text_modality.fingerprint(), tmp_path)
    with pytest.raises(OneEncoderError, match="shard 1/3 of 'text' is not finished"):
        merge_shards("text", text_modality.fingerprint(), tmp_path, count=3)


def test_shards_split_by_id_alone(monkeypatch) -> None:
    ids = [f"stamp/{i}" for i in range(300)]
    for n in (1, 2, 3):
        owners = [[s for s in range(n) if Shard(s, n).owns(sid)] for sid in ids]
        assert all(len(o) == 1 for o in owners)  # every sample in exactly one shard
        sizes = [sum(o == [s] for o in owners) for s in range(n)]
        assert min(sizes) > 300 / n * 0.7, sizes
    assert Shard.parse(" 1 / 4") == Shard(1, 4) and str(Shard(1, 4)) == "1/4"
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(OneEncoderError, match="expected i/n"):
            Shard.parse(bad)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert Shard.from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert Shard.from_env() == Shard(3, 4)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert Shard.from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(OneEncoderError, match="WORLD_SIZE='two'"):
        Shard.from_env()


def test_cli_ranks_build_shards_and_merge(records, tmp_path: Path, monkeypatch) -> None:
    """Each torchrun rank (RANK/WORLD_SIZE) builds its shard; `cache merge` makes the one cache."""
    manifest = tmp_path / "m.jsonl"
    write_jsonl_atomic(manifest, records[:6])
    runner = CliRunner()
    common = ["--manifest", str(manifest), "--cache-dir", str(tmp_path / "cache"), "--workers", "0",
              "--device", "cpu"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        result = runner.invoke(app, ["cache", "build", *common])
        assert result.exit_code == 0, result.output
        assert f"shard {rank}/2: image:" in result.output and "oneencoder cache merge" in result.output
    monkeypatch.delenv("WORLD_SIZE")
    result = runner.invoke(app, ["cache", "merge", "--cache-dir", str(tmp_path / "cache"), "--remove-shards"])
    assert result.exit_code == 0, result.output
    assert "image: merged 2 shards, 6 entries, 0 rejected" in result.output
    assert "text: merged 2 shards, 6 entries, 0 rejected" in result.output
    assert not (tmp_path / "cache" / "shards").exists()
    result = runner.invoke(app, ["cache", "build", *common])  # unsharded: everything is there
    assert "image: 6 samples, 6 already cached, 0 encoded, 0 rejected" in result.output
    result = runner.invoke(app, ["cache", "build", *common, "--shard", "2/2"])
    assert result.exit_code == 2 and result.output.strip() == (
        "error: --shard '2/2': expected i/n with 0 <= i < n, e.g. --shard 0/4")


def test_merge_applies_what_the_shards_saw(records, text_modality, tmp_path: Path) -> None:
    """A caption that turned bad since the merged cache was built: the merge drops its old features."""
    good = [dict(r) for r in records[:6]]
    build_cache(text_modality, good, tmp_path, progress=False)  # an earlier, unsharded build
    good[0]["caption"] = ""
    good[1]["caption"] = "A caption written since."
    reports = [build_cache(text_modality, good, tmp_path, progress=False, shard=Shard(i, 2)) for i in range(2)]
    assert sum(r.cached_before for r in reports) == 4 and sum(r.encoded for r in reports) == 1
    with cache_lock(cache_dir_for(Shard(0, 2).root(tmp_path), "text")):  # shard 0 being rebuilt
        with pytest.raises(OneEncoderError, match="is writing the feature cache .*shards/0-of-2/text"):
            merge_shards("text", text_modality.fingerprint(), tmp_path)
    report = merge_shards("text", text_modality.fingerprint(), tmp_path)
    assert (report.entries, report.rejects, report.dropped) == (5, 1, 1)
    assert report.summary() == "text: merged 2 shards, 5 entries, 1 rejected (1 stale entry removed)"
    with FeatureCache(cache_dir_for(tmp_path, "text"), text_modality.fingerprint(), readonly=True) as cache:
        assert good[0]["id"] not in cache.ids()
        assert cache.inputs()[good[1]["id"]] == input_key(text_modality, good[1]["caption"])
    assert set(read_rejects(rejects_path(tmp_path, "text"))) == {good[0]["id"]}
