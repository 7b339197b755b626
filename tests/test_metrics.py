"""Tests for oneencoder.evaluation.metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

import oneencoder.evaluation.metrics as metrics_module
from oneencoder.evaluation.metrics import chance_metrics, format_table, retrieval_metrics

# Hand-made example: 3 queries, 4 gallery items, several positives, one tie.
#   q0 ranks 0,1,2,3 -> hits at ranks 2 and 4
#   q1 ranks 1,2,3,0 -> hit at rank 4
#   q2 ranks 2, then 0 and 1 tied (stable: 0 first), then 3 -> hits at ranks 1 and 3
_SCORES = torch.tensor(
    [
        [0.9, 0.8, 0.7, 0.6],
        [0.1, 0.4, 0.3, 0.2],
        [0.5, 0.5, 0.9, 0.1],
    ]
)
_RELEVANT = torch.tensor(
    [
        [False, True, False, True],
        [True, False, False, False],
        [False, True, True, False],
    ]
)


def test_perfect_ranking_scores_one() -> None:
    relevant = torch.eye(6, dtype=torch.bool)
    relevant[0, 3] = True  # a second positive, ranked second
    scores = relevant.float() + torch.eye(6)  # the diagonal positive first, other positives next
    m = retrieval_metrics(scores, relevant)
    for key in ("R@1", "R@5", "R@10", "MRR", "mAP", "NDCG@10", "R-Precision"):
        assert m[key] == pytest.approx(1.0), key
    assert m["median_rank"] == 1.0
    assert m["n_queries"] == 6.0 and m["n_gallery"] == 6.0


def test_hand_made_example() -> None:
    m = retrieval_metrics(_SCORES, _RELEVANT, ks=(1, 2, 5, 10))
    assert m["R@1"] == pytest.approx(1 / 3)
    assert m["R@2"] == pytest.approx(2 / 3)
    assert m["R@5"] == pytest.approx(1.0)  # K clipped to G = 4
    assert m["R@10"] == pytest.approx(1.0)
    # AP: q0 (1/2 + 2/4)/2, q1 1/4, q2 (1/1 + 2/3)/2
    assert m["mAP"] == pytest.approx((0.5 + 0.25 + 5 / 6) / 3)
    # R-Precision: q0 1 of top 2, q1 0 of top 1, q2 1 of top 2
    assert m["R-Precision"] == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    assert m["MRR"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 1) / 3)
    assert m["median_rank"] == 2.0  # first ranks 2, 4, 1
    ideal2 = 1 + 1 / math.log2(3)
    ndcg = [
        (1 / math.log2(3) + 1 / math.log2(5)) / ideal2,
        (1 / math.log2(5)) / 1.0,
        (1 + 1 / math.log2(4)) / ideal2,
    ]
    assert m["NDCG@10"] == pytest.approx(sum(ndcg) / 3)
    assert (m["n_queries"], m["n_gallery"]) == (3.0, 4.0)


def test_chunked_evaluation_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = retrieval_metrics(_SCORES, _RELEVANT)
    monkeypatch.setattr(metrics_module, "_CHUNK_ELEMENTS", 4)  # one query per chunk
    assert retrieval_metrics(_SCORES, _RELEVANT) == pytest.approx(expected)


def test_worst_ranking_gives_rank_g() -> None:
    g = 7
    scores = torch.arange(g, 0, -1, dtype=torch.float32).repeat(3, 1)  # item 0 best, item g-1 worst
    relevant = torch.zeros(3, g, dtype=torch.bool)
    relevant[:, -1] = True
    m = retrieval_metrics(scores, relevant)
    assert m["median_rank"] == float(g)
    assert m["MRR"] == pytest.approx(1 / g)
    assert m["mAP"] == pytest.approx(1 / g)
    assert m["R@1"] == 0.0 and m["R@5"] == 0.0
    assert m["R@10"] == 1.0  # K = 10 clipped to G = 7
    assert m["NDCG@10"] == pytest.approx(1 / math.log2(g + 1))


def test_ties_are_not_a_free_lunch() -> None:
    # Constant scores: ranking follows gallery order, so query i finds its match at rank i + 1.
    m = retrieval_metrics(torch.zeros(4, 4), torch.eye(4, dtype=torch.bool))
    assert m["R@1"] == pytest.approx(0.25)
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert m["median_rank"] == 2.5  # ranks 1..4, mean of the middle two


def test_chance_r_at_1_single_relevant_is_one_over_g() -> None:
    for g in (3, 7, 100, 5000):
        relevant = torch.zeros(2, g, dtype=torch.bool)
        relevant[:, 0] = True
        c = chance_metrics(relevant, ks=(1,), trials=1)
        assert c["R@1"] == pytest.approx(1 / g, rel=1e-12, abs=0)
        harmonic = sum(1 / k for k in range(1, g + 1))
        assert c["MRR"] == pytest.approx(harmonic / g, rel=1e-12)


def test_chance_exact_matches_formula_and_monte_carlo() -> None:
    g = 20
    counts = [1, 3, 5, 20]
    relevant = torch.zeros(len(counts), g, dtype=torch.bool)
    for q, r in enumerate(counts):
        relevant[q, torch.randperm(g, generator=torch.Generator().manual_seed(q))[:r]] = True
    c = chance_metrics(relevant, ks=(1, 5, 10, 50), trials=20, seed=1)

    for k in (1, 5, 10, 50):
        kk = min(k, g)
        exact = sum(1 - math.comb(g - r, kk) / math.comb(g, kk) for r in counts) / len(counts)
        assert c[f"R@{k}"] == pytest.approx(exact, rel=1e-12)
    exact_mrr = sum(
        sum(math.comb(g - k, r - 1) / math.comb(g, r) / k for k in range(1, g - r + 2)) for r in counts
    ) / len(counts)
    assert c["MRR"] == pytest.approx(exact_mrr, rel=1e-12)

    # Brute force: rank the gallery by random permutations and count hits.
    gen = torch.Generator().manual_seed(123)
    trials = 4000
    hits = {1: 0.0, 5: 0.0, 10: 0.0}
    for _ in range(trials):
        m = retrieval_metrics(torch.rand(len(counts), g, generator=gen), relevant, ks=(1, 5, 10))
        for k in hits:
            hits[k] += m[f"R@{k}"]
    for k, total in hits.items():
        assert c[f"R@{k}"] == pytest.approx(total / trials, abs=0.02)


def test_chance_single_relevant_item_closed_forms() -> None:
    g = 50
    relevant = torch.zeros(200, g, dtype=torch.bool)
    relevant[:, 0] = True
    c = chance_metrics(relevant, trials=10, seed=0)
    assert list(c) == list(retrieval_metrics(torch.rand(200, g), relevant))  # same keys, same order
    # One relevant item: AP equals 1/rank, R-Precision equals R@1, rank is uniform on 1..G.
    assert c["mAP"] == pytest.approx(c["MRR"], rel=1e-12)
    assert c["R-Precision"] == pytest.approx(1 / g, rel=1e-12)
    expected_ndcg = sum(1 / math.log2(k + 1) for k in range(1, 11)) / g
    assert c["NDCG@10"] == pytest.approx(expected_ndcg, rel=1e-12)
    assert c["median_rank"] == pytest.approx((g + 1) / 2, abs=3)
    # Same seed, same sampled median.
    assert chance_metrics(relevant, trials=10, seed=0) == c


def test_chance_matches_brute_force_with_several_relevant_items() -> None:
    g, counts = 30, [1, 2, 5, 12, 30]
    generator = torch.Generator().manual_seed(0)
    relevant = torch.zeros(len(counts) * 20, g, dtype=torch.bool)
    for q in range(relevant.shape[0]):
        relevant[q, torch.randperm(g, generator=generator)[: counts[q % len(counts)]]] = True
    c = chance_metrics(relevant, trials=400, seed=0)
    trials, brute = 1500, {}
    for _ in range(trials):
        scores = torch.rand(relevant.shape, generator=generator, dtype=torch.float64)
        for name, value in retrieval_metrics(scores, relevant).items():
            brute[name] = brute.get(name, 0.0) + value / trials
    for name in ("R@1", "R@5", "R@10", "mAP", "NDCG@10", "R-Precision", "MRR"):
        assert c[name] == pytest.approx(brute[name], abs=0.01), name
    assert c["median_rank"] == pytest.approx(brute["median_rank"], abs=0.25)
    # A query whose whole gallery is relevant scores 1 on everything.
    full = chance_metrics(torch.ones(3, 4, dtype=torch.bool))
    assert all(full[name] == pytest.approx(1.0) for name in ("R@1", "mAP", "NDCG@10", "R-Precision", "MRR"))


def test_queries_without_relevant_item_raise() -> None:
    relevant = torch.eye(3, dtype=torch.bool)
    relevant[1, 1] = False
    with pytest.raises(ValueError, match="1 of 3 queries"):
        retrieval_metrics(torch.rand(3, 3), relevant)
    with pytest.raises(ValueError, match="1 of 3 queries"):
        chance_metrics(relevant)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(torch.rand(3, 4), torch.eye(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((2, 2), float("nan")), torch.eye(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(torch.rand(2, 2), torch.eye(2, dtype=torch.bool), ks=(0,))


def test_format_table() -> None:
    metrics = {"R@1": 0.3124, "R@5": 0.6, "R@10": 0.75}
    chance = {"R@1": 0.0061, "R@5": 0.03, "R@10": 0.06}
    table = format_table([("image→text", metrics, chance), ("text→image", metrics, chance)])
    lines = table.splitlines()
    assert lines[0].split() == ["direction", "R@1", "R@5", "R@10"]
    assert lines[2].startswith("image→text")
    assert lines[3].startswith("text→image")
    assert "0.312 (chance 0.006)" in lines[2]
    assert "0.750 (chance 0.060)" in lines[3]
    assert len({len(line) for line in lines}) == 1  # columns aligned


def test_small_splits_are_flagged() -> None:
    from oneencoder.evaluation.metrics import MIN_RANKING_QUERIES, small_split_warning

    assert small_split_warning("test", MIN_RANKING_QUERIES) is None
    line = small_split_warning("validation", 20)
    assert line is not None and "\n" not in line
    assert "validation split has 20 queries" in line and "moves R@1 by 5.0 points" in line
