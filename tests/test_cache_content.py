"""A cache keyed by content: changed inputs are re-encoded, rejects merge, one builder at a time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
import torch
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.errors import OneEncoderError
from oneencoder.features.cache import (FeatureCache, build_cache, cache_dir_for, cache_lock, input_key, read_rejects,
                                       rejects_path)
from oneencoder.features.rounding import feature_mismatch
from oneencoder.fileio import write_jsonl_atomic

pytestmark = pytest.mark.bytes  # compares outputs byte for byte (docs/reliability.md)


def _features(root: Path, modality, sid: str) -> torch.Tensor:
    with FeatureCache(cache_dir_for(root, modality.spec.name), modality.fingerprint(), readonly=True) as cache:
        return cache.get(sid)


def test_input_keys(text_modality, image_modality, tmp_path: Path) -> None:
    assert input_key(text_modality, "A frog.") == input_key(text_modality, "A frog.")
    assert input_key(text_modality, "A frog.") != input_key(text_modality, "A toad.")
    png = tmp_path / "a.png"
    png.write_bytes(b"x" * 10)
    first = input_key(image_modality, str(png))
    assert first.startswith(f"file:{png.resolve()}:10:")
    os.utime(png, ns=(1, 1))
    assert input_key(image_modality, str(png)) != first  # same bytes, other mtime: re-encoded (a stat, no hash)
    link = tmp_path / "link.png"
    link.symlink_to(png)
    assert input_key(image_modality, str(link)) == input_key(image_modality, str(png))  # resolved path
    assert input_key(image_modality, str(tmp_path / "gone.png")).endswith(":missing")


def test_a_changed_caption_is_re_encoded(small_records, text_modality, tmp_path: Path) -> None:
    records = [dict(r) for r in small_records[:6]]
    build_cache(text_modality, records, tmp_path, progress=False)
    records[2]["caption"] = records[4]["caption"]  # same id, the caption of another stamp
    report = build_cache(text_modality, records, tmp_path, progress=False)
    assert (report.cached_before, report.encoded, report.changed) == (5, 1, 1)
    assert "5 already cached, 1 encoded (1 changed, re-encoded), 0 rejected" in report.summary()
    # The new entry is what a fresh build of that caption gives, to the byte: both encoded alone.
    fresh = tmp_path / "fresh"
    build_cache(text_modality, [records[2]], fresh, progress=False)
    assert torch.equal(_features(tmp_path, text_modality, records[2]["id"]),
                       _features(fresh, text_modality, records[2]["id"]))
    assert build_cache(text_modality, records, tmp_path, progress=False).encoded == 0


def test_a_replaced_or_moved_image_is_re_encoded(small_records, image_modality, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    records = []
    for i, rec in enumerate(small_records[:3]):
        target = folder / f"{i}{Path(rec['image']).suffix}"
        shutil.copy(rec["image"], target)
        records.append({"id": f"s{i}", "image": str(target)})
    build_cache(image_modality, records, tmp_path / "cache", progress=False)
    shutil.copy(records[1]["image"], records[0]["image"])  # file 0 now holds picture 1
    records[2] = {"id": "s2", "image": records[1]["image"]}  # s2 now points to picture 1
    report = build_cache(image_modality, records, tmp_path / "cache", progress=False)
    assert (report.cached_before, report.encoded, report.changed) == (1, 2, 2)
    picture_1 = _features(tmp_path / "cache", image_modality, "s1")
    for sid in ("s0", "s2"):  # encoded in another batch than s1 was: equal to fp16 rounding
        assert feature_mismatch(_features(tmp_path / "cache", image_modality, sid), picture_1) is None


def test_an_input_that_turned_bad_loses_its_stale_features(small_records, text_modality, tmp_path: Path) -> None:
    records = [dict(r) for r in small_records[:4]]
    build_cache(text_modality, records, tmp_path, progress=False)
    records[1]["caption"] = "   "
    report = build_cache(text_modality, records, tmp_path, progress=False)
    assert set(report.rejects) == {records[1]["id"]} and report.dropped == 1
    assert report.summary().endswith("1 rejected (1 stale entry removed)")
    with FeatureCache(cache_dir_for(tmp_path, "text"), text_modality.fingerprint(), readonly=True) as cache:
        assert records[1]["id"] not in cache.ids() and len(cache) == 3  # training never reads the old caption


def test_rejects_are_kept_per_manifest_entry(small_records, bad_records, text_modality, tmp_path: Path) -> None:
    empty = next(r for r in bad_records if r["caption"] == "")
    first = [dict(r) for r in small_records[:3]] + [dict(empty)]
    second = [dict(r) for r in small_records[3:6]] + [{**empty, "id": "other/empty"}]
    build_cache(text_modality, first, tmp_path, progress=False)
    build_cache(text_modality, second, tmp_path, progress=False)  # another manifest, same cache
    rows = read_rejects(rejects_path(tmp_path, "text"))
    assert set(rows) == {empty["id"], "other/empty"}
    assert rows[empty["id"]]["input"] == input_key(text_modality, "") and "empty" in rows[empty["id"]]["reason"]
    first[-1]["caption"] = "A picture that is now described."
    report = build_cache(text_modality, first, tmp_path, progress=False)
    assert report.encoded == 1 and not report.rejects
    assert set(read_rejects(rejects_path(tmp_path, "text"))) == {"other/empty"}  # the fixed sample left


def test_a_cache_without_recorded_inputs_opens_and_is_re_encoded(small_records, text_modality,
                                                                 tmp_path: Path) -> None:
    records = small_records[:5]
    build_cache(text_modality, records, tmp_path, progress=False)
    path = cache_dir_for(tmp_path, "text")
    before = {r["id"]: _features(tmp_path, text_modality, r["id"]) for r in records}
    env = lmdb.open(str(path), subdir=True)  # as a cache written before inputs were recorded
    with env.begin(write=True) as txn:
        for r in records:
            assert txn.delete(b"k/" + r["id"].encode())
    env.close()
    with FeatureCache(path, text_modality.fingerprint(), readonly=True) as cache:  # readers do not care
        assert len(cache) == 5 and set(cache.inputs().values()) == {None}
    report = build_cache(text_modality, records, tmp_path, progress=False)
    assert (report.encoded, report.unrecorded, report.changed) == (5, 5, 0)
    assert "5 encoded (5 without a recorded input, re-encoded)" in report.summary()
    with FeatureCache(path, text_modality.fingerprint(), readonly=True) as cache:
        assert cache.inputs() == {r["id"]: input_key(text_modality, r["caption"]) for r in records}
    for r in records:  # same batches as the first build: the same bytes
        assert torch.equal(_features(tmp_path, text_modality, r["id"]), before[r["id"]])


def test_a_second_builder_stops_with_one_line(small_records, text_modality, tmp_path: Path) -> None:
    path = cache_dir_for(tmp_path / "cache", "text")
    with cache_lock(path):
        with pytest.raises(OneEncoderError, match=rf"\(process {os.getpid()}\) is writing the feature cache {path};"):
            build_cache(text_modality, small_records[:2], tmp_path / "cache", progress=False)
    assert build_cache(text_modality, small_records[:2], tmp_path / "cache", progress=False).encoded == 2
    # Another process holding the lock (as a running `cache build` does): the CLI prints one line.
    manifest = tmp_path / "m.jsonl"
    write_jsonl_atomic(manifest, small_records[:3])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(path) + '.lock'!r}, os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.pwrite(fd, b'%d' % os.getpid(), 0); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = CliRunner().invoke(app, ["cache", "build", "--manifest", str(manifest), "--cache-dir",
                                          str(tmp_path / "cache"), "--workers", "0", "--device", "cpu"])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1] == (f"error: another `oneencoder cache` command (process {holder.pid}) is writing the feature "
                         f"cache {path}; wait for it to finish, then rerun")
    assert "Traceback" not in result.output


def test_a_read_only_cache_root_is_one_line(small_records, text_modality, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(OneEncoderError, match="cannot write the feature cache"):
            build_cache(text_modality, small_records[:1], root / "cache", progress=False)
    finally:
        root.chmod(0o700)
