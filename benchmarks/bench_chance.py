"""Benchmark: exact chance levels vs ranking random score matrices (Monte Carlo).

Every evaluation prints a chance level beside each metric. ``chance_metrics`` computes
R@K, MRR, mAP, NDCG@10 and R-Precision exactly from each query's number of relevant
items, and samples only the median rank. The alternative (what it replaced) ranks
`trials` uniform random score matrices with :func:`retrieval_metrics` and averages.

Both arms run side by side on the same relevance matrices, shaped like this project's
test splits: the molecule split (2,445 queries, one relevant item each) and a grouped
gallery where several items share a caption (as Tux Paint stamps do). The benchmark
prints each arm's time, the speed ratio, and the largest gap between the two arms'
values (Monte Carlo noise, since the exact arm has none).

Run: ``.venv/bin/python benchmarks/bench_chance.py [--trials 100]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from oneencoder.evaluation.metrics import chance_metrics, retrieval_metrics

EXACT_KEYS = ("R@1", "R@5", "R@10", "mAP", "NDCG@10", "R-Precision", "MRR")


def monte_carlo_chance(relevant: torch.Tensor, trials: int, seed: int = 0) -> dict[str, float]:
    """Average of :func:`retrieval_metrics` over `trials` uniform random score matrices."""
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    for _ in range(trials):
        scores = torch.rand(relevant.shape, generator=generator, dtype=torch.float64)
        for name, value in retrieval_metrics(scores, relevant).items():
            totals[name] = totals.get(name, 0.0) + value / trials
    return totals


def problems() -> dict[str, torch.Tensor]:
    one_each = torch.eye(2445, dtype=torch.bool)
    # 600 queries over a 900-item gallery in groups of 1-5 items sharing a caption.
    generator = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 6, (600,), generator=generator)
    group_of_item = torch.repeat_interleave(torch.arange(600), sizes)[:900]
    grouped = group_of_item.unsqueeze(0) == torch.arange(600).unsqueeze(1)
    grouped = grouped[grouped.any(dim=1)]
    return {"molecule-like 2445 x 2445, 1 relevant": one_each,
            f"grouped {grouped.shape[0]} x {grouped.shape[1]}, 1-5 relevant": grouped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100, help="Random rankings of the Monte Carlo arm.")
    args = parser.parse_args()
    print(f"{'problem':<42} {'exact s':>8} {'MC s':>8} {'speed-up':>9} {'max |exact - MC|':>17}")
    for name, relevant in problems().items():
        tic = time.perf_counter()
        exact = chance_metrics(relevant, trials=args.trials)
        exact_s = time.perf_counter() - tic
        tic = time.perf_counter()
        sampled = monte_carlo_chance(relevant, args.trials)
        mc_s = time.perf_counter() - tic
        gap = max(abs(exact[k] - sampled[k]) for k in EXACT_KEYS)
        print(f"{name:<42} {exact_s:8.3f} {mc_s:8.2f} {mc_s / exact_s:8.0f}x {gap:17.5f}")
        print(f"{'':<42} median rank: sampled {exact['median_rank']:.1f}, Monte Carlo {sampled['median_rank']:.1f}")


if __name__ == "__main__":
    main()
