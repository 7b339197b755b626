"""Streaming retrieval (group codes, query blocks) against the dense score-matrix metrics.

The dense path (``retrieval_metrics`` on a ``[Q, G]`` matrix) is checked by hand in
test_metrics.py; here the streamed kernel must reproduce it exactly on small problems
with ties, several relevant items per query and deduplication.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import oneencoder.evaluation.metrics as metrics_module
from oneencoder.errors import OneEncoderError
from oneencoder.evaluation.metrics import (chance_metrics, chance_metrics_from_counts, mean_pair_score, relevant_counts,
                                           retrieval_metrics, retrieval_metrics_by_group)
from oneencoder.evaluation.retrieval import retrieval_between
from oneencoder.evaluation.topk import topk_search

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _problem(seed: int, n_queries: int = 41, n_gallery: int = 67, groups: int = 15, integer: bool = True,
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Embeddings and group codes; small integer entries make every dot product exact, so ties are real."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        q = torch.randint(-2, 3, (n_queries, 3), generator=g).to(dtype)
        x = torch.randint(-2, 3, (n_gallery, 3), generator=g).to(dtype)
    else:
        q = torch.randn(n_queries, 8, generator=g, dtype=dtype)
        x = torch.randn(n_gallery, 8, generator=g, dtype=dtype)
    gallery_codes = torch.randint(0, groups, (n_gallery,), generator=g) * 7 - 20  # any integers, not 0..K-1
    query_codes = gallery_codes[torch.randint(0, n_gallery, (n_queries,), generator=g)]
    return q, x, query_codes, gallery_codes


def _assert_same(streamed: dict[str, float], dense: dict[str, float]) -> None:
    assert list(streamed) == list(dense)
    for key, value in dense.items():
        assert streamed[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize("counting", ["sorted", "counted", "counted in column slices"])
def test_streaming_equals_dense(device: str, integer: bool, counting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Force each path: every block sorted, or every block counted (whole rows, or 7 columns at a time).
    monkeypatch.setattr(metrics_module, "_COUNT_LIMIT", 0 if counting == "sorted" else 1_000)
    if counting == "counted in column slices":
        monkeypatch.setattr(metrics_module, "_COUNT_COLUMNS", 7)
    for seed in range(6):
        q, x, cq, cg = _problem(seed, integer=integer, dtype=torch.float32 if integer else torch.float64)
        q, x = q.to(device), x.to(device)
        scores = q @ x.T
        if integer:
            assert (scores[:, :, None] == scores[:, None, :]).sum() > scores.numel()  # ties are present
        relevant = cq.to(device)[:, None] == cg.to(device)[None, :]
        assert (relevant.sum(1) > 1).any()  # several relevant items per query
        dense = retrieval_metrics(scores, relevant, ks=(1, 3, 10, 100))
        for block in (1, 4, None):
            streamed = retrieval_metrics_by_group(q, x, cq, cg, ks=(1, 3, 10, 100), block=block)
            mean_pos = streamed.pop("mean_pos_cos")
            _assert_same(streamed, dense)
            assert mean_pos == pytest.approx(float(scores[relevant].double().mean()), rel=1e-12)


def test_first_rank_counts_equal_scores_before_lower_indices() -> None:
    # Constant scores: the stable order is gallery order, so query i finds its item at rank i + 1.
    codes = torch.arange(5)
    m = retrieval_metrics_by_group(torch.ones(5, 2), torch.ones(5, 2), codes, codes, block=2)
    assert m["R@1"] == pytest.approx(0.2)
    assert m["MRR"] == pytest.approx(sum(1 / r for r in range(1, 6)) / 5)
    assert m["median_rank"] == 3.0


def test_chance_from_counts_equals_matrix_form() -> None:
    for seed in range(4):
        _, _, cq, cg = _problem(seed)
        relevant = cq[:, None] == cg[None, :]
        counts = relevant_counts(cq, cg)
        assert torch.equal(counts, relevant.sum(1))
        assert chance_metrics_from_counts(counts, len(cg), trials=30, seed=seed) == chance_metrics(
            relevant, trials=30, seed=seed)


def _dense_retrieval_between(emb_q: torch.Tensor, groups_q: list[str], emb_g: torch.Tensor, groups_g: list[str],
                             dedupe_q: bool, dedupe_g: bool) -> dict[str, dict[str, float]]:
    """What ``retrieval_between`` computed before streaming: the full score and relevance matrices."""
    def first(groups: list[str]) -> list[int]:
        return [i for i, g in enumerate(groups) if g not in groups[:i]]

    qi = first(groups_q) if dedupe_q else list(range(len(groups_q)))
    gi = first(groups_g) if dedupe_g else list(range(len(groups_g)))
    relevant = torch.tensor([[groups_q[i] == groups_g[j] for j in gi] for i in qi])
    has = relevant.any(1)
    scores = emb_q[qi][has] @ emb_g[gi].T
    relevant = relevant[has]
    metrics, chance = retrieval_metrics(scores, relevant), chance_metrics(relevant)
    metrics["mean_pos_cos"], chance["mean_pos_cos"] = float(scores[relevant].mean()), float(scores.mean())
    return {"metrics": metrics, "chance": chance}


@pytest.mark.parametrize("dedupe", [(False, False), (True, False), (False, True), (True, True)])
def test_retrieval_between_equals_dense(dedupe: tuple[bool, bool]) -> None:
    g = torch.Generator().manual_seed(3)
    captions = [f"caption {int(i)}" for i in torch.randint(0, 16, (40,), generator=g)]
    images = [f"caption {int(i)}" for i in torch.randint(0, 12, (50,), generator=g)]  # captions 12-15: no image
    emb_q = torch.nn.functional.normalize(torch.randn(40, 16, generator=g, dtype=torch.float64), dim=1)
    emb_g = torch.nn.functional.normalize(torch.randn(50, 16, generator=g, dtype=torch.float64), dim=1)
    expected = _dense_retrieval_between(emb_q, captions, emb_g, images, *dedupe)
    got = retrieval_between(emb_q, captions, emb_g, images, *dedupe)
    for part in ("metrics", "chance"):
        _assert_same(got[part], expected[part])
    assert got["metrics"]["n_queries"] < (len(set(captions)) if dedupe[0] else 40)  # queries without images left out


def test_retrieval_between_without_any_relevant_item_is_a_user_error() -> None:
    with pytest.raises(OneEncoderError, match="no query has a relevant gallery item"):
        retrieval_between(torch.randn(3, 4), ["a", "b", "c"], torch.randn(2, 4), ["x", "y"])


def test_streaming_bad_inputs_raise() -> None:
    q, x, cq, cg = _problem(0)
    with pytest.raises(ValueError, match="of 41 queries have no relevant"):
        retrieval_metrics_by_group(q, x, torch.full_like(cq, 10**6), cg)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics_by_group(torch.full_like(q, float("nan")), x, cq, cg)
    with pytest.raises(ValueError, match="group codes"):
        retrieval_metrics_by_group(q, x, cq[:-1], cg)
    with pytest.raises(ValueError, match="same d"):
        retrieval_metrics_by_group(q[:, :2], x, cq, cg)


def test_mean_pair_score_is_the_mean_of_all_scores() -> None:
    q, x, _, _ = _problem(1, integer=False, dtype=torch.float64)
    assert mean_pair_score(q, x) == pytest.approx(float((q @ x.T).mean()), rel=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_search_is_the_stable_sort(device: str) -> None:
    for seed in range(4):
        q, x, _, _ = _problem(seed)
        q, x = q.to(device), x.to(device)
        order = torch.sort(q @ x.T, dim=1, descending=True, stable=True)
        for k in (1, 5, 67, 500):
            for block in (3, None):
                values, index = topk_search(q, x, k, block=block)
                assert torch.equal(index, order.indices[:, :k]) and torch.equal(values, order.values[:, :k])
    with pytest.raises(ValueError, match="k must be"):
        topk_search(q, x, 0)


class _LargestOutput(TorchFunctionMode):
    """Records the largest tensor any torch call returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_grows_with_queries_times_gallery() -> None:
    n, block = 600, 20
    q, x, cq, cg = _problem(0, n_queries=n, n_gallery=n, groups=250, integer=False)
    with _LargestOutput() as seen:
        retrieval_metrics_by_group(q, x, cq, cg, block=block)
        topk_search(q, x, 10, block=block)
    assert seen.largest <= block * n < n * n // 10
