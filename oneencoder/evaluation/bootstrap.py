"""Bootstrap confidence intervals over queries: how far a metric could move on another draw of them.

A retrieval metric is a statistic of per-query values (R@K and MRR are means of them,
median rank a median). Resampling the queries with replacement and recomputing the
statistic gives its sampling distribution; the 2.5th and 97.5th percentiles of that
distribution are the percentile 95 % interval (Efron & Tibshirani, 1993, ch. 13).

Every metric of one problem is recomputed on the *same* resamples, drawn from one seeded
NumPy generator, so intervals are reproducible and mutually consistent. A resample is held
as how often it draws each query, so every mean is one matrix product: milliseconds for
thousands of queries, well under a second for tens of thousands.

Example:
    >>> bootstrap_intervals({"R@1": hits}, seed=0)
    {'R@1': [0.36, 0.47]}
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

#: Resamples drawn per problem: the interval ends move by well under 0.01 between seeds.
RESAMPLES = 1000
#: Confidence level of every reported interval.
LEVEL = 0.95
#: Seed of the resampling generator (fixed, so the same model and data give the same interval).
SEED = 0
# Draw counts held at once (resamples x queries): 32 MB of float64.
_CHUNK_ELEMENTS = 1 << 22


def describe_bootstrap(resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> dict[str, object]:
    """How the intervals were computed, for the JSON beside them."""
    return {"method": "percentile bootstrap over queries", "level": level, "resamples": resamples, "seed": seed}


def bootstrap_intervals(
    means: Mapping[str, np.ndarray],
    *,
    medians: Mapping[str, np.ndarray] | None = None,
    ratios: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of statistics of per-query values, all on the same resamples.

    Args:
        means: Metric -> ``[Q]`` per-query values; the metric is their mean.
        medians: Metric -> ``[Q]`` per-query values; the metric is their median.
        ratios: Metric -> ``([Q] numerators, [Q] denominators)``; the metric is
            ``sum(numerators) / sum(denominators)`` (e.g. a mean over pairs, not over queries).
        resamples: Number of bootstrap resamples.
        level: Coverage of the interval, e.g. 0.95 for the 2.5th-97.5th percentiles.
        seed: Seed of the NumPy generator that draws the resamples.

    Returns:
        Metric -> ``[low, high]`` as Python floats, in the order given (means, medians, ratios).

    Raises:
        ValueError: If there are no queries, the vectors differ in length, or an argument is out of range.
    """
    medians, ratios = medians or {}, ratios or {}
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    vectors = [np.asarray(v, dtype=np.float64) for v in (*means.values(), *medians.values(),
                                                         *(part for pair in ratios.values() for part in pair))]
    lengths = {v.shape for v in vectors}
    if len(lengths) != 1 or lengths.pop()[0] == 0:
        raise ValueError(f"per-query vectors must be non-empty and of one length, got {[v.shape for v in vectors]}")
    n_queries = len(vectors[0])
    mean_rows = np.stack(vectors[: len(means)]) if means else np.zeros((0, n_queries))
    ratio_rows = np.stack(vectors[len(means) + len(medians):]) if ratios else np.zeros((0, n_queries))
    sorted_medians = [(np.sort(v), np.argsort(v, kind="stable")) for v in vectors[len(means): len(means) + len(medians)]]
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // n_queries)
    parts: list[np.ndarray] = []  # [chunk, statistics] per chunk of resamples
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        # A resample as how often it draws each query: the statistics become matrix products.
        draws = rng.integers(0, n_queries, size=(rows, n_queries), dtype=np.int64)
        draws += np.arange(rows)[:, None] * n_queries  # row r's draws counted in bins r*Q .. r*Q+Q-1
        counts = np.bincount(draws.ravel(), minlength=rows * n_queries).reshape(rows, n_queries).astype(np.float64)
        stats = [counts @ mean_rows.T / n_queries]
        for values, order in sorted_medians:
            stats.append(_resampled_median(counts[:, order], values)[:, None])
        sums = counts @ ratio_rows.T
        with np.errstate(divide="ignore", invalid="ignore"):
            stats.append(sums[:, 0::2] / sums[:, 1::2])
        parts.append(np.concatenate(stats, axis=1))
    found = np.concatenate(parts)  # [resamples, statistics]
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(found, [tail, 100 - tail], axis=0)
    names = [*means, *medians, *ratios]
    return {name: [float(lo), float(hi)] for name, lo, hi in zip(names, low, high)}


def _resampled_median(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``np.median`` of each resample, from its draw counts in ascending order of ``values``.

    The resample's k-th smallest value (0-based) is the first sorted value whose running
    count exceeds k; with Q draws the median is the mean of the ``(Q-1)//2``-th and ``Q//2``-th.
    """
    n = values.shape[0]
    running = counts.cumsum(axis=1)
    low = values[(running <= (n - 1) // 2).sum(axis=1)]
    high = values[(running <= n // 2).sum(axis=1)]
    return (low + high) / 2
