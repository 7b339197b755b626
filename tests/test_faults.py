"""The short fault-injection harness (``benchmarks/faults.py`` runs the long one).

``kill -9`` between two file writes of ``train`` (inside a checkpoint and inside a
model-directory update) and of ``add-modality`` (its first best model committed, not yet
in place), and at a random time of ``cache build``; each rerun must resume and end
byte-identical to an uninterrupted run (the cache's features: to within fp16 rounding,
see ``oneencoder/features/rounding.py``), with no sample lost.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import faults  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.bytes]


def test_train_killed_between_file_writes_resumes_byte_identical(small_manifest: Path, small_cache: Path,
                                                                 tmp_path: Path) -> None:
    stage = faults.stage_file(tmp_path, small_manifest, small_cache, epochs=2)
    # After the resume state of epoch 1 (its 2nd file), and inside a model update after its commit point.
    tally, total = faults.train_boundaries(tmp_path, stage, kills=[5, 9])
    assert total >= 10, total
    assert tally.failures == [] and tally.kills == tally.resumed == tally.identical == 2


def test_add_modality_killed_after_its_first_commit_point_resumes_byte_identical(trained_model,
                                                                                tmp_path: Path) -> None:
    """A rerun used to resume from the committed first-epoch adapter's random state, not the run's own."""
    sounds = faults.make_data(tmp_path / "data", {"train": 16, "val": 6, "test": 6}, with_sound=True)
    cache = tmp_path / "data" / "cache"
    stage = faults.stage_file(tmp_path, sounds, cache, epochs=2, shipped="audio")
    tally, total = faults.add_modality_boundaries(tmp_path, trained_model["dir"], stage, sounds, cache,
                                                  kills=faults.after_first_commit_point)
    assert total >= 10, total
    assert tally.failures == [] and tally.kills == tally.resumed == tally.identical == 1


def test_cache_build_killed_at_a_random_time_resumes_with_nothing_lost(small_manifest: Path, small_cache: Path,
                                                                        tmp_path: Path) -> None:
    stage = faults.stage_file(tmp_path, small_manifest, small_cache, epochs=1)
    root = tmp_path / "cache"
    args = ["cache", "build", "--stage", str(stage), "--workers", "2", "--cache-dir", str(root)]
    # Killed soon after the image cache's first write, while its samples are being encoded.
    delay = random.Random(0).uniform(0.0, 0.5)
    assert faults.run_killed_once_writing(args, root / "image" / "data.mdb", delay), "it finished before the kill"
    done = faults.run_cli(args)
    assert done.returncode == 0, done.stderr[-1500:]
    assert faults.cached_ids(root) == faults.cached_ids(small_cache)
    assert faults.fingerprint_cache(root) == faults.fingerprint_cache(small_cache)
