"""Waveform augmentation of training sounds: real stamp sounds, real files, train split only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from oneencoder.data.sources.audio_augment import augment_records
from oneencoder.modality import create_modality


@pytest.fixture(scope="module")
def two_sounds(stamps) -> list[dict]:
    train = [r for r in stamps if r["sound"] and r["split"] == "train"][:2]
    test = [r for r in stamps if r["sound"] and r["split"] == "test"][:1]
    return train + test


def test_copies_are_real_decodable_variants_of_train_sounds_only(two_sounds, tmp_path: Path) -> None:
    new, rejects = augment_records(two_sounds, tmp_path, copies=2, progress=False)
    assert rejects == []
    assert len(new) == 4  # 2 train sounds x 2 copies; the test sound is never augmented
    assert {r["split"] for r in new} == {"train"}
    audio = create_modality("audio")
    for record in new:
        source = next(r for r in two_sounds if r["id"] == record["augmented_from"])
        assert record["id"].startswith(source["id"] + "#aug")
        assert record["caption"] == source["caption"] and record["group"] == source["group"]
        assert record["image"] is None  # unchanged inputs are not encoded again
        variant, original = audio.load(record["sound"]).waveform, audio.load(source["sound"]).waveform
        assert np.isfinite(variant).all() and 0 < np.abs(variant).max() <= 1.0
        n = min(len(variant), len(original))
        assert not np.allclose(variant[:n], original[:n], atol=1e-3)
    assert new[0]["sound"] != new[1]["sound"]


@pytest.mark.bytes
def test_same_seed_same_files_and_reruns_reuse_them(two_sounds, tmp_path: Path) -> None:
    first, _ = augment_records(two_sounds[:1], tmp_path / "a", copies=1, progress=False)
    other, _ = augment_records(two_sounds[:1], tmp_path / "b", copies=1, progress=False)
    path = Path(first[0]["sound"])
    assert path.read_bytes() == Path(other[0]["sound"]).read_bytes()
    mtime = path.stat().st_mtime_ns
    again, _ = augment_records(two_sounds[:1], tmp_path / "a", copies=1, progress=False)
    assert again == first and path.stat().st_mtime_ns == mtime


def test_undecodable_sound_is_rejected_and_the_rest_go_on(two_sounds, tmp_path: Path) -> None:
    broken = tmp_path / "broken.ogg"
    broken.write_bytes(b"not an ogg file")
    bad = {**two_sounds[0], "id": "broken", "sound": str(broken)}
    new, rejects = augment_records([bad, two_sounds[1]], tmp_path / "out", copies=1, progress=False)
    assert [r["augmented_from"] for r in new] == [two_sounds[1]["id"]]
    assert len(rejects) == 1 and rejects[0]["id"] == "broken" and "broken.ogg" in rejects[0]["reason"]
