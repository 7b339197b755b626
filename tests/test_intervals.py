"""Bootstrap 95 % intervals over queries: on real embeddings of the session's trained model, and
on per-query vectors whose sampling spread is known."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from oneencoder.evaluation.bootstrap import bootstrap_intervals
from oneencoder.evaluation.metrics import PerQuery, format_table, retrieval_per_query_by_group
from oneencoder.evaluation.retrieval import evaluate_samples, retrieval_between
from oneencoder.model.checkpoint import load_model

COUNTS = ("n_queries", "n_gallery")


@pytest.fixture(scope="module")
def evaluated(trained_model, stage_modalities, small_records, small_cache) -> dict:
    model, _ = load_model(trained_model["dir"])
    return evaluate_samples(model.eval(), stage_modalities, small_records, small_cache, "test")


def test_every_metric_has_an_interval_that_holds_its_value(evaluated) -> None:
    assert evaluated["bootstrap"] == {"method": "percentile bootstrap over queries", "level": 0.95,
                                      "resamples": 1000, "seed": 0}
    for direction, result in evaluated["directions"].items():
        metrics, intervals = result["metrics"], result["intervals"]
        assert list(intervals) == [k for k in metrics if k not in COUNTS], direction  # every metric, same order
        for name, (low, high) in intervals.items():
            assert low <= metrics[name] <= high, (direction, name, low, metrics[name], high)
        assert intervals["MRR"][1] - intervals["MRR"][0] > 0  # 14 queries: a real spread, not a point


def test_intervals_are_deterministic_and_the_seed_matters(evaluated, trained_model, stage_modalities,
                                                          small_records, small_cache) -> None:
    model, _ = load_model(trained_model["dir"])
    again = evaluate_samples(model.eval(), stage_modalities, small_records, small_cache, "test")
    assert {d: r["intervals"] for d, r in again["directions"].items()} == \
        {d: r["intervals"] for d, r in evaluated["directions"].items()}
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=1)
    x = torch.nn.functional.normalize(q + torch.randn(60, 8, generator=g), dim=1)
    per_query = retrieval_per_query_by_group(q, x, torch.arange(60), torch.arange(60))
    assert per_query.intervals(seed=0) == per_query.intervals(seed=0)
    assert per_query.intervals(seed=0) != per_query.intervals(seed=1)


def test_intervals_narrow_with_more_queries() -> None:
    """R@1 of Bernoulli(0.4) hits: the interval's width shrinks like 1/sqrt(Q) (about 2 x 1.96 x sd)."""
    rng = np.random.default_rng(7)
    widths = {}
    for n in (50, 500, 5000):
        hits = (rng.random(n) < 0.4).astype(float)
        low, high = bootstrap_intervals({"R@1": hits})["R@1"]
        widths[n] = high - low
        expected = 2 * 1.96 * np.sqrt(hits.mean() * (1 - hits.mean()) / n)
        assert widths[n] == pytest.approx(expected, rel=0.2), (n, widths[n], expected)
    assert widths[50] > widths[500] > widths[5000]


def test_medians_and_pair_means_resample_the_same_queries() -> None:
    rng = np.random.default_rng(3)
    ranks = rng.integers(1, 40, 301).astype(float)
    pos, count = rng.random(301) * 3, rng.integers(1, 4, 301).astype(float)
    found = bootstrap_intervals({"MRR": 1 / ranks}, medians={"median_rank": ranks}, ratios={"mean_pos_cos": (pos, count)})
    assert list(found) == ["MRR", "median_rank", "mean_pos_cos"]
    assert found["median_rank"][0] <= np.median(ranks) <= found["median_rank"][1]
    assert found["mean_pos_cos"][0] <= pos.sum() / count.sum() <= found["mean_pos_cos"][1]
    with pytest.raises(ValueError, match="one length"):
        bootstrap_intervals({"a": np.ones(3)}, medians={"b": np.ones(4)})


def test_metrics_are_the_means_of_the_per_query_values() -> None:
    g = torch.Generator().manual_seed(1)
    q, x = torch.randn(40, 6, generator=g), torch.randn(50, 6, generator=g)
    codes_g = torch.randint(0, 10, (50,), generator=g)
    codes_q = codes_g[torch.randint(0, 50, (40,), generator=g)]
    per_query = retrieval_per_query_by_group(q, x, codes_q, codes_g)
    assert isinstance(per_query, PerQuery)
    metrics = per_query.metrics()
    for name, values in per_query.values().items():
        assert values.shape == (40,) and metrics[name] == pytest.approx(values.mean().item(), abs=1e-15)
    assert retrieval_between(q, [str(int(c)) for c in codes_q], x, [str(int(c)) for c in codes_g]).keys() == \
        {"metrics", "chance", "gap"}  # validation asks for no intervals


def test_a_thousand_resamples_of_two_thousand_queries_cost_under_a_second() -> None:
    rng = np.random.default_rng(0)
    means = {f"m{i}": rng.random(2445) for i in range(7)}
    start = time.perf_counter()
    bootstrap_intervals(means, medians={"median_rank": rng.integers(1, 100, 2445).astype(float)})
    assert time.perf_counter() - start < 2.0  # measured ~0.3 s on 2 shared cores


def test_the_table_shows_each_interval_under_its_value(evaluated) -> None:
    directions = evaluated["directions"]
    table = format_table([(d, r["metrics"], r["chance"]) for d, r in directions.items()], ("R@1", "MRR"),
                         [r["intervals"] for r in directions.values()])
    lines = table.splitlines()
    row = lines[2]
    below = lines[3]
    r = next(iter(directions.values()))
    low, high = r["intervals"]["R@1"]
    assert f"[{low:.3f}, {high:.3f}]" in below
    assert below.index("[") == row.index(f"{r['metrics']['R@1']:.3f}")  # starts under its value
    assert max(len(line) for line in lines) <= 120
