"""The LMDB feature cache: rejects, fp16 storage, resume, fingerprints, FeatureBank."""

from __future__ import annotations

import gc
import json
import shutil
import struct
import re
from pathlib import Path

import lmdb
import pytest
import torch

from oneencoder.errors import CacheMismatchError, OneEncoderError
from oneencoder.features.bank import FeatureBank
from oneencoder.features.cache import FeatureCache, build_cache, cache_dir_for, rejects_path
from oneencoder.modalities.text import TextModality
from oneencoder.modality import create_modality

pytestmark = pytest.mark.bytes  # compares outputs byte for byte (docs/reliability.md)


def _raw(cache: FeatureCache, sid: str) -> bytes | None:
    with cache.env.begin() as txn:
        return txn.get(b"f/" + sid.encode())


def _read_rejects(root: Path, modality: str) -> dict[str, dict]:
    rows = [json.loads(line) for line in rejects_path(root, modality).read_text().splitlines() if line.strip()]
    return {r["id"]: r for r in rows}


@pytest.fixture(scope="module")
def built(small_records, bad_records, stage_modalities, tmp_path_factory):
    """Both modalities cached for 16 real stamps plus the three bad samples."""
    records = small_records[:16] + bad_records
    root = tmp_path_factory.mktemp("cache_with_rejects")
    reports = {name: build_cache(m, records, root, batch_size=8, num_workers=0, progress=False)
               for name, m in stage_modalities.items()}
    return root, records, reports


def test_bad_samples_are_rejected_with_reasons(built, bad_expected) -> None:
    root, records, reports = built
    for name in ("image", "text"):
        expected = {sid: why for sid, (mod, why) in bad_expected.items() if mod == name}
        report = reports[name]
        assert set(report.rejects) == set(expected), (name, report.rejects)
        assert report.encoded == len(records) - len(expected)
        assert report.total == len(records) and report.cached_before == 0
        on_disk = _read_rejects(root, name)
        assert set(on_disk) == set(expected)
        for sid, fragment in expected.items():
            assert on_disk[sid]["modality"] == name
            assert fragment in on_disk[sid]["reason"], on_disk[sid]
            assert report.rejects[sid] == on_disk[sid]["reason"]
        assert f"{len(expected)} rejected" in report.summary()


def test_good_samples_are_cached_as_fp16_with_right_lengths(built, stage_modalities, text_backbone,
                                                            image_backbone, bad_expected) -> None:
    root, records, _ = built
    text, image = stage_modalities["text"], stage_modalities["image"]
    for name, modality in stage_modalities.items():
        good = [r for r in records if bad_expected.get(r["id"], ("-",))[0] != name]
        with FeatureCache(cache_dir_for(root, name), modality.fingerprint(), readonly=True) as cache:
            assert cache.ids() == {r["id"] for r in good}
            for rec in good[:5]:
                raw = _raw(cache, rec["id"])
                (n,) = struct.unpack("<I", raw[:4])
                assert len(raw) == 4 + n * modality.feature_dim * 2  # fp16, padding not stored
                feats = cache.get(rec["id"])
                assert feats.dtype == torch.float16 and feats.shape == (n, modality.feature_dim)
                if name == "text":
                    ids = text.preprocess(text.load(rec["caption"]))
                    # "pooled": one sentence token; "pooled+tokens": that token plus the word pieces.
                    assert n == {"pooled": 1, "pooled+tokens": len(ids) + 1, "tokens": len(ids)}[text.options["tokens"]]
                    meas = cache.measurements([rec["id"]])[0]
                    assert meas == {"n_words": float(len(rec["caption"].split())), "n_chars": float(len(rec["caption"])),
                                    "n_tokens": float(len(ids))}  # word pieces, never the pooled token
                else:
                    assert n == image.max_tokens  # every image gives the same number of tokens
                    meas = cache.measurements([rec["id"]])[0]
                    img = image.load(rec["image"])
                    assert meas == image.difficulty(img, None)
    # Cached values are the backbone's output rounded to fp16.
    rec = records[3]
    with FeatureCache(cache_dir_for(root, "text"), text.fingerprint(), readonly=True) as cache:
        cached = cache.get(rec["id"]).float()
    tokens, mask = text.encode(text_backbone, text.collate([text.preprocess(text.load(rec["caption"]))]))
    assert torch.allclose(cached, tokens[0][mask[0]], rtol=2e-3, atol=2e-3)
    with FeatureCache(cache_dir_for(root, "image"), image.fingerprint(), readonly=True) as cache:
        cached = cache.get(rec["id"]).float()
    tokens, _ = image.encode(image_backbone, image.collate([image.preprocess(image.load(rec["image"]))]))
    assert torch.allclose(cached, tokens[0], rtol=2e-3, atol=2e-3)


def test_second_build_encodes_nothing_and_keeps_rejects(built, stage_modalities, bad_expected) -> None:
    root, records, first = built
    for name, modality in stage_modalities.items():
        report = build_cache(modality, records, root, batch_size=8, num_workers=0, progress=False)
        assert report.encoded == 0
        assert report.cached_before == first[name].encoded
        assert report.rejects == first[name].rejects  # retried, still bad, still listed
        assert set(_read_rejects(root, name)) == {s for s, (m, _) in bad_expected.items() if m == name}


def test_interrupted_build_only_encodes_the_rest(small_records, text_modality, tmp_path: Path) -> None:
    records = small_records
    half = len(records) // 2
    first = build_cache(text_modality, records[:half], tmp_path, batch_size=16, progress=False)
    assert first.encoded == half
    with FeatureCache(cache_dir_for(tmp_path, "text"), text_modality.fingerprint()) as cache:
        before = {r["id"]: _raw(cache, r["id"]) for r in records[:half]}
    second = build_cache(text_modality, records, tmp_path, batch_size=16, progress=False)
    assert second.cached_before == half
    assert second.encoded == len(records) - half
    with FeatureCache(cache_dir_for(tmp_path, "text"), text_modality.fingerprint()) as cache:
        assert len(cache) == len(records)
        assert all(_raw(cache, sid) == raw for sid, raw in before.items())  # not re-encoded


class _InterruptAfter(TextModality):
    """The real text modality, interrupted (Ctrl-C) while preprocessing sample number ``limit``."""

    limit = 21

    def __init__(self, **options):
        super().__init__(**options)
        self.calls = 0

    def preprocess(self, raw):
        self.calls += 1
        if self.calls == self.limit:
            raise KeyboardInterrupt
        return super().preprocess(raw)


def test_ctrl_c_keeps_committed_batches(small_records, text_modality, tmp_path: Path) -> None:
    interrupting = _InterruptAfter(**text_modality.options)
    assert interrupting.fingerprint() == text_modality.fingerprint()
    with pytest.raises(KeyboardInterrupt):
        build_cache(interrupting, small_records, tmp_path, batch_size=8, progress=False)
    # Batches 1 and 2 (16 samples) were committed before sample 21 was interrupted.
    resumed = build_cache(text_modality, small_records, tmp_path, batch_size=8, progress=False)
    assert resumed.cached_before == 16
    assert resumed.encoded == len(small_records) - 16


def test_samples_without_the_modality_are_skipped_but_empty_values_rejected(text_modality, tmp_path: Path) -> None:
    # Multi-modal manifests: a stamp without a sound simply has no audio; an empty caption is bad input.
    records = [{"id": "a", "caption": "A frog."}, {"id": "b"}, {"id": "c", "caption": None}, {"id": "d", "caption": ""}]
    report = build_cache(text_modality, records, tmp_path, progress=False)
    assert report.encoded == 1 and report.total == 2
    assert set(report.rejects) == {"d"} and "caption" in report.rejects["d"]


def _copy_cache(root: Path, name: str, dest: Path) -> Path:
    """A private copy of one modality's cache (refused opens below must not touch the shared one)."""
    target = dest / name
    shutil.copytree(cache_dir_for(root, name), target)
    return dest


def test_other_fingerprint_is_refused(built, stage_modalities, tmp_path: Path) -> None:
    root, records, reports = built
    image = stage_modalities["image"]
    copy_root = _copy_cache(root, "image", tmp_path / "a")
    path = cache_dir_for(copy_root, "image")
    changed = {**image.fingerprint(), "preprocess_version": "image-v0"}
    built_with = re.escape(f"preprocess_version={image.spec.preprocess_version!r}")
    with pytest.raises(CacheMismatchError, match=built_with + r".*preprocess_version='image-v0'"):
        FeatureCache(path, changed, readonly=True)
    # A modality with other options (fewer text tokens) may not reuse a text cache either;
    # build_cache refuses before encoding anything.
    text_copy = _copy_cache(root, "text", tmp_path / "b")
    with pytest.raises(CacheMismatchError, match="max_tokens"):
        build_cache(create_modality("text", max_tokens=16), records, text_copy, progress=False)
    gc.collect()  # see test_refused_open_releases_the_environment
    # The refused opens did not change the stored fingerprints.
    with FeatureCache(path, image.fingerprint(), readonly=True) as cache:
        assert len(cache) == reports["image"].encoded
    with FeatureCache(cache_dir_for(text_copy, "text"), stage_modalities["text"].fingerprint(),
                      readonly=True) as cache:
        assert len(cache) == reports["text"].encoded


def test_refused_open_releases_the_environment(built, stage_modalities, tmp_path: Path) -> None:
    root, _, reports = built
    image = stage_modalities["image"]
    path = cache_dir_for(_copy_cache(root, "image", tmp_path), "image")
    with pytest.raises(CacheMismatchError) as refused:
        FeatureCache(path, {**image.fingerprint(), "preprocess_version": "image-v0"}, readonly=True)
    assert refused.value is not None  # the caller still holds the error (e.g. to log it)
    with FeatureCache(path, image.fingerprint(), readonly=True) as cache:
        assert len(cache) == reports["image"].encoded


def test_readonly_open_of_missing_cache_is_a_user_error(tmp_path: Path, text_modality) -> None:
    with pytest.raises(OneEncoderError, match="no feature cache"):
        FeatureCache(tmp_path / "nothing", text_modality.fingerprint(), readonly=True)


# ----- FeatureBank -------------------------------------------------------------------


def test_bank_gather_masks_and_trims() -> None:
    torch.manual_seed(0)
    seqs = [torch.randn(3, 4).half(), torch.randn(1, 4).half(), torch.randn(5, 4).half()]
    bank = FeatureBank(seqs)
    assert len(bank) == 3 and bank.dim == 4 and bank.data.shape == (3, 5, 4)
    tokens, mask = bank.gather(torch.tensor([1, 0]))
    assert tokens.dtype == torch.float32 and tokens.shape == (2, 3, 4)  # trimmed to the longest (3)
    assert mask.tolist() == [[True, False, False], [True, True, True]]
    assert torch.equal(tokens[0, :1], seqs[1].float()) and torch.equal(tokens[1], seqs[0].float())
    assert torch.count_nonzero(tokens[0, 1:]) == 0
    tokens, mask = bank.gather(torch.tensor([1]))
    assert tokens.shape == (1, 1, 4) and mask.tolist() == [[True]]
    with pytest.raises(ValueError):
        FeatureBank([])


def test_bank_from_real_cache(built, text_modality) -> None:
    root, records, _ = built
    ids = [r["id"] for r in records if r["caption"]]
    bank = FeatureBank.open(cache_dir_for(root, "text"), text_modality.fingerprint(), ids)
    with FeatureCache(cache_dir_for(root, "text"), text_modality.fingerprint(), readonly=True) as cache:
        feats = cache.get_many(ids)
    assert bank.lengths.tolist() == [f.shape[0] for f in feats]
    tokens, mask = bank.gather(torch.arange(len(ids)))
    assert tokens.shape[1] == max(f.shape[0] for f in feats)
    for i, f in enumerate(feats):
        n = f.shape[0]
        assert int(mask[i].sum()) == n and bool(mask[i, :n].all())
        assert torch.equal(tokens[i, :n], f.float())
