"""Search on 10^6 vectors: the IVF (ANN) index against exact search and the raw matmul, in one run.

The vectors are synthetic (no 10^6-item data set is installed here), with the structure of
real oneencoder embeddings: a shared mean direction, a low-rank spectrum and overlapping
clusters, unit norm. On a 949-vector sample its mean cosine (0.51) and effective
dimensionality (36) are close to the demo model's image index (0.53, 41), its neighbours
less similar (1st/10th neighbour cosine 0.74/0.68 against 0.88/0.76): a harder case for an
ANN index than the real one (``--real-index DIR`` prints both; ``--spread 0.15`` makes
tight clusters, where one list per query already finds 0.98 of the neighbours). Queries
are fresh points of the same distribution, not indexed vectors.

Printed, side by side: build time; queries/s of the raw matmul (``Q @ X.T`` only), exact
search (the index's blocked matmul + top-k), and the ANN index (faiss IVF-PQ, candidates
re-ranked exactly) at its tuned ``nprobe`` (and at half and twice it), batched and one query
at a time; recall@10 of each ANN setting against exact search. Run: ``.venv/bin/python benchmarks/bench_search.py`` (about 3-5 minutes, 6 GB RAM).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import OtherLoad, load_note  # noqa: E402

from oneencoder.apps.index import VectorIndex, exact_topk, load_index  # noqa: E402


class Synthetic:
    """Mean direction + rank-``rank`` clustered part with a ``i^-decay`` spectrum + isotropic noise."""

    def __init__(self, dim: int, seed: int = 0, rank: int = 128, clusters: int = 2000, mean_norm: float = 4.2,
                 spread: float = 1.0, noise: float = 0.01, decay: float = 0.4) -> None:
        g = torch.Generator().manual_seed(seed)
        self.basis = torch.linalg.qr(torch.randn(dim, rank, generator=g))[0] * torch.arange(1, rank + 1).float() ** -decay
        self.centres = torch.randn(clusters, rank, generator=g)
        self.mean = F.normalize(torch.randn(dim, generator=g), dim=0) * mean_norm
        self.spread, self.noise = spread, noise

    def sample(self, n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
        g = torch.Generator().manual_seed(seed)
        out = np.empty((n, self.mean.shape[0]), dtype=np.float32)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            z = self.centres[torch.randint(0, len(self.centres), (m,), generator=g)]
            z = z + self.spread * torch.randn(m, z.shape[1], generator=g)
            x = self.mean + z @ self.basis.T + self.noise * torch.randn(m, self.mean.shape[0], generator=g)
            out[start : start + m] = F.normalize(x, dim=1).numpy()
        return out


def structure(x: np.ndarray) -> str:
    """Mean cosine, mean 1st/10th-neighbour cosine and effective dimensionality of a sample."""
    s = x @ x.T
    np.fill_diagonal(s, -2)
    nn = np.sort(s, axis=1)[:, ::-1]
    ev = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    ev /= ev.sum()
    return (f"mean cos {s[s > -2].mean():.2f}, nn1 cos {nn[:, 0].mean():.2f}, nn10 cos {nn[:, 9].mean():.2f}, "
            f"effective dim {1 / (ev ** 2).sum():.0f}")


def qps(fn, n_queries: int, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n_queries / best


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="indexed vectors")
    p.add_argument("--dim", type=int, default=640, help="width (the demo model's embed_dim)")
    p.add_argument("--queries", type=int, default=200, help="queries (exact search is the slow arm)")
    p.add_argument("--single", type=int, default=50, help="queries timed one at a time")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--spread", type=float, default=1.0,
                   help="cluster spread in the low-rank space (0.15: tight clusters, an easy case for IVF)")
    p.add_argument("--real-index", type=Path, help="an index whose structure to print beside the synthetic one")
    args = p.parse_args()
    load = OtherLoad().start()
    print(f"torch threads {torch.get_num_threads()}; N = {args.n:,} synthetic vectors, d = {args.dim}, "
          f"{args.queries} fresh queries, k = {args.k}")

    gen = Synthetic(args.dim, spread=args.spread)
    t = time.perf_counter()
    x = gen.sample(args.n, seed=1)
    q = gen.sample(args.queries, seed=2)
    print(f"generated in {time.perf_counter() - t:.1f} s; structure of a 949-vector sample: {structure(x[:949])}")
    if args.real_index:
        print(f"  real index {args.real_index} ({len(load_index(args.real_index))} vectors): "
              f"{structure(load_index(args.real_index).vectors[:949])}")

    t = time.perf_counter()
    index = VectorIndex(x, [{"id": str(i)} for i in range(args.n)], "image", {}, kind="ivf")
    build = time.perf_counter() - t
    info = index.ann_info
    print(f"ANN build, faiss {info['type']} (k-means + PQ on {min(args.n, 48 * info['nlist']):,} vectors, add, "
          f"tune nprobe): {build:.1f} s; tuned nprobe {info['nprobe']} of {info['nlist']} lists, top "
          f"{args.k * info['refine']} re-ranked exactly (recall@10 {info['tuned_recall@10']:.3f} on "
          f"{info['tune_queries']} held-out indexed vectors)")

    qt, xt = torch.from_numpy(q), torch.from_numpy(x)
    raw = qps(lambda: qt @ xt.T, args.queries)
    exact_rows: list[torch.Tensor] = []
    exact = qps(lambda: exact_rows.append(exact_topk(qt, xt, args.k)[1]), args.queries)
    truth = exact_rows[-1].numpy()
    one = qt[: args.single]
    exact_single = qps(lambda: [exact_topk(one[i : i + 1], xt, args.k) for i in range(len(one))], len(one))

    print(f"\n{'method':34s} {'queries/s':>10s} {'one at a time':>14s} {'recall@10':>10s} {'vs exact':>9s}")
    print(f"{'raw matmul Q @ X.T (no top-k)':34s} {raw:10.1f} {'':>14s} {'':>10s} {raw / exact:8.2f}x")
    print(f"{'exact (blocked matmul + top-k)':34s} {exact:10.1f} {exact_single:14.1f} {1.0:10.3f} {1.0:8.2f}x")
    tuned = int(info["nprobe"])
    for nprobe in sorted({max(1, tuned // 2), tuned, min(info["nlist"], tuned * 2)}):
        found: list[np.ndarray] = []
        batched = qps(lambda: found.append(index.search(q, args.k, nprobe=nprobe).rows), args.queries, repeat=3)
        single = qps(lambda: [index.search(q[i : i + 1], args.k, nprobe=nprobe) for i in range(args.single)],
                     args.single)
        label = f"ANN (IVF-PQ) nprobe {nprobe}" + (" (tuned)" if nprobe == tuned else "")
        print(f"{label:34s} {batched:10.1f} {single:14.1f} {recall(found[-1], truth):10.3f} {batched / exact:8.1f}x")
    note = load_note("during the run", load.cores())
    if note:
        print("\n" + note)


if __name__ == "__main__":
    main()
