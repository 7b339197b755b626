"""``train --seeds N``: N real runs on the session's small Tux Paint data, mean ± std, resumable."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from oneencoder.errors import ConfigError
from oneencoder.training.seeds import SEEDS_DIR, SUMMARY, mean_std, run_seeds


@pytest.fixture(scope="module")
def seeded(small_manifest, small_cache, make_config, tmp_path_factory) -> dict:
    config = make_config(small_manifest, small_cache, epochs=2, seed=3)
    model_dir = tmp_path_factory.mktemp("seeds") / "model"
    result = run_seeds(config, model_dir, 2)
    return {"config": config, "dir": model_dir, "result": result}


def test_each_seed_is_a_real_run_and_the_summary_is_their_mean(seeded) -> None:
    rows = seeded["result"]["seeds"]
    assert [r["seed"] for r in rows] == [3, 4]
    key = "test image→text R@1"
    values = [r["test"]["image→text"]["R@1"] for r in rows]
    spread = seeded["result"]["mean_std"][key]
    assert spread["mean"] == pytest.approx(statistics.mean(values))
    assert spread["std"] == pytest.approx(statistics.stdev(values))
    # different seeds train different models: their validation scores differ
    assert rows[0]["val"]["score"] != rows[1]["val"]["score"]
    # the model directory is the first seed's: its test numbers are the run's own
    first = seeded["result"]["first"]["test"]["directions"]["image→text"]["metrics"]["R@1"]
    assert values[0] == first
    run_dir = seeded["dir"] / "runs" / seeded["config"].name
    stored = json.loads((run_dir / SUMMARY).read_text())
    assert stored["mean_std"][key]["mean"] == pytest.approx(spread["mean"])
    assert not list(Path(seeded["dir"]).parent.glob("oneencoder-seed*"))  # temporary copies are gone


def test_a_rerun_reuses_the_finished_seeds(seeded, monkeypatch) -> None:
    import oneencoder.training.seeds as seeds

    def no_training(*args, **kwargs):
        raise AssertionError("a finished seed was trained again")

    monkeypatch.setattr(seeds, "train_in_copy", no_training)
    again = run_seeds(seeded["config"], seeded["dir"], 2)
    assert again["seeds"][1] == seeded["result"]["seeds"][1]
    assert (seeded["dir"] / "runs" / seeded["config"].name / SEEDS_DIR / "seed-4.json").exists()


def test_mean_std_of_one_seed_has_no_spread() -> None:
    row = {"val": {"score": 0.5}, "test": {"image→text": {"R@1": 0.25}}}
    assert mean_std([row]) == {"val score": {"mean": 0.5, "std": 0.0},
                               "test image→text R@1": {"mean": 0.25, "std": 0.0}}


def test_zero_seeds_is_a_config_error(seeded) -> None:
    with pytest.raises(ConfigError, match="--seeds"):
        run_seeds(seeded["config"], seeded["dir"], 0)
