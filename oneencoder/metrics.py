"""Retrieval metrics for cross-modal evaluation, and their values under chance.

Every query may have several relevant gallery items (e.g. an image with five
captions), so all metrics take a boolean relevance matrix rather than assuming
that item ``i`` matches item ``i``.

Ranking and ties:
    Each query's gallery is ranked by ``torch.sort(descending=True,
    stable=True)``, so among equal scores the item with the lower gallery index
    ranks first. A model that outputs constant scores therefore gets the
    gallery order as its ranking instead of having every tied relevant item
    count as rank 1 (a "free lunch"), and results are deterministic.

Example:
    >>> m = retrieval_metrics(img @ txt.T, relevant)
    >>> c = chance_metrics(relevant)
    >>> print(format_table([("image→text", m, c)]))
"""

from __future__ import annotations

import torch

# NDCG is reported at this cutoff (clipped to the gallery size).
_NDCG_K = 10
# Rows of a [Q, G] problem processed at once, so that Q = G = 5000 stays well
# under a gigabyte of temporaries.
_CHUNK_ELEMENTS = 1 << 22


def _check_relevant(relevant: torch.Tensor) -> torch.Tensor:
    """Return `relevant` as a bool [Q, G] tensor; raise if a query has no positive."""
    if relevant.dim() != 2 or relevant.shape[0] == 0 or relevant.shape[1] == 0:
        raise ValueError(f"relevant must be a non-empty [Q, G] matrix, got shape {tuple(relevant.shape)}")
    relevant = relevant.bool()
    missing = int((~relevant.any(dim=1)).sum())
    if missing:
        raise ValueError(f"{missing} of {relevant.shape[0]} queries have no relevant gallery item")
    return relevant


def _check_ks(ks: tuple[int, ...]) -> tuple[int, ...]:
    """Reject empty or non-positive cutoffs early, before any sorting."""
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty tuple of positive integers, got {ks!r}")
    return tuple(int(k) for k in ks)


def _per_query(scores: torch.Tensor, relevant: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-query first rank, AP, NDCG@10 and R-Precision (inputs already validated)."""
    n_queries, n_gallery = relevant.shape
    device = scores.device
    positions = torch.arange(1, n_gallery + 1, dtype=torch.float64, device=device)
    ndcg_k = min(_NDCG_K, n_gallery)
    discounts = 1.0 / torch.log2(torch.arange(2, ndcg_k + 2, dtype=torch.float64, device=device))
    ideal_dcg = discounts.cumsum(0)  # ideal_dcg[n - 1] = best DCG with n relevant items

    parts: dict[str, list[torch.Tensor]] = {"first_rank": [], "ap": [], "ndcg": [], "rprec": []}
    chunk = max(1, _CHUNK_ELEMENTS // n_gallery)
    for start in range(0, n_queries, chunk):
        s = scores[start : start + chunk]
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        hits = relevant[start : start + chunk].gather(1, order)  # [q, G] bool, in rank order
        n_rel = hits.sum(dim=1)
        cum = hits.cumsum(dim=1, dtype=torch.float64)  # relevant items within top k
        # argmax returns the first maximum, i.e. the first relevant position.
        parts["first_rank"].append(hits.to(torch.uint8).argmax(dim=1) + 1)
        parts["ap"].append((cum / positions * hits).sum(dim=1) / n_rel)
        dcg = (hits[:, :ndcg_k] * discounts).sum(dim=1)
        parts["ndcg"].append(dcg / ideal_dcg[n_rel.clamp(max=ndcg_k) - 1])
        parts["rprec"].append(cum.gather(1, (n_rel - 1).unsqueeze(1)).squeeze(1) / n_rel)
    return {name: torch.cat(values) for name, values in parts.items()}


def _aggregate(per_query: dict[str, torch.Tensor], ks: tuple[int, ...], n_gallery: int) -> dict[str, float]:
    """Average per-query values into the public metric dictionary."""
    first_rank = per_query["first_rank"]
    out = {f"R@{k}": (first_rank <= min(k, n_gallery)).double().mean().item() for k in ks}
    out["mAP"] = per_query["ap"].mean().item()
    out[f"NDCG@{_NDCG_K}"] = per_query["ndcg"].mean().item()
    out["R-Precision"] = per_query["rprec"].mean().item()
    out["MRR"] = (1.0 / first_rank.double()).mean().item()
    # quantile interpolates, so an even number of queries gives the usual mean of the middle two.
    out["median_rank"] = torch.quantile(first_rank.double(), 0.5).item()
    out["n_queries"] = float(first_rank.numel())
    out["n_gallery"] = float(n_gallery)
    return out


def retrieval_metrics(
    scores: torch.Tensor, relevant: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Ranking metrics of a query-by-gallery score matrix.

    Ties are broken by a stable descending sort: among equal scores the lower
    gallery index ranks first (see the module docstring).

    Args:
        scores: [Q, G] similarities, higher means more similar. Must not contain NaN.
        relevant: [Q, G] bool, True where the gallery item is relevant to the query.
            A query may have several relevant items; each must have at least one.
        ks: Cutoffs for ``R@K``; a K larger than G is clipped to G.

    Returns:
        ``R@K`` for each K (fraction of queries with any relevant item in the top K),
        ``mAP``, ``NDCG@10`` (binary gains, ideal DCG from the number of relevant
        items), ``R-Precision`` (precision at R = number of relevant items),
        ``MRR`` and ``median_rank`` (of the first relevant item, 1-based), plus
        ``n_queries`` and ``n_gallery``. All values are Python floats.

    Raises:
        ValueError: If shapes differ or are not 2-D, scores contain NaN, ks is
            invalid, or some queries have no relevant item (the message says how many).
    """
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and relevant {tuple(relevant.shape)} differ in shape")
    ks = _check_ks(ks)
    relevant = _check_relevant(relevant).to(scores.device)
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN; their ranking is undefined")
    return _aggregate(_per_query(scores, relevant), ks, relevant.shape[1])


def _first_rank_distribution(r: int, n_gallery: int) -> torch.Tensor:
    """P(first relevant item at rank k), k = 1..G, for r relevant items under a random ranking.

    ``miss[j] = C(G-r, j) / C(G, j)`` is the chance that the top j hold none of them, built
    as a running product so nothing overflows; the first hit is at rank k with probability
    ``miss[k-1] * r / (G-k+1)``.
    """
    i = torch.arange(n_gallery, dtype=torch.float64)
    factors = ((n_gallery - r - i) / (n_gallery - i)).clamp(min=0.0)
    miss = torch.cat([torch.ones(1, dtype=torch.float64), factors.cumprod(0)])
    return miss[:-1] * r / (n_gallery - i)


def _exact_chance_for(r: int, n_gallery: int, ks: tuple[int, ...], p_first: torch.Tensor) -> dict[str, float]:
    """Expected R@K, MRR, AP, NDCG@10 and R-Precision of one query with r relevant items."""
    g = n_gallery
    ranks = torch.arange(1, g + 1, dtype=torch.float64)
    cdf = p_first.cumsum(0)
    out = {f"R@{k}": min(1.0, cdf[min(k, g) - 1].item()) for k in ks}
    out["MRR"] = (p_first / ranks).sum().item()
    # E[AP] = (1/r) sum_k E[rel_k * hits_in_top_k] / k, with P(rel_k) = r/G and
    # P(rel_j, rel_k) = r(r-1) / (G(G-1)) for j != k.
    harmonic = (1.0 / ranks).sum().item()
    pair = (r - 1) / (g - 1) if g > 1 else 0.0
    out["mAP"] = harmonic / g + pair * (g - harmonic) / g
    # Every rank holds a relevant item with probability r/G.
    discounts = 1.0 / torch.log2(torch.arange(2, min(_NDCG_K, g) + 2, dtype=torch.float64))
    out[f"NDCG@{_NDCG_K}"] = (r / g) * discounts.sum().item() / discounts[: min(r, len(discounts))].sum().item()
    out["R-Precision"] = r / g
    return out


def chance_metrics(
    relevant: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10), trials: int = 100, seed: int = 0
) -> dict[str, float]:
    """Expected value of each :func:`retrieval_metrics` metric under random ranking.

    ``R@K``, ``MRR``, ``mAP``, ``NDCG@10`` and ``R-Precision`` are exact: per query from
    its number of relevant items, then averaged. ``median_rank`` (a median over queries)
    has no simple closed form: it is averaged over `trials` draws of every query's first
    relevant rank from its exact distribution, with a CPU ``torch.Generator`` seeded with
    `seed`, so results are reproducible. Milliseconds even at Q = G = 5000.

    Args:
        relevant: [Q, G] bool relevance matrix, as for :func:`retrieval_metrics`.
        ks: Cutoffs for ``R@K``; a K larger than G is clipped to G.
        trials: Number of draws for ``median_rank``.
        seed: Seed of the random generator.

    Returns:
        The same keys as :func:`retrieval_metrics`, including ``n_queries`` and
        ``n_gallery``, so a result and its chance level can be indexed alike.

    Raises:
        ValueError: If relevant is not a non-empty 2-D matrix, ks or trials is
            invalid, or some queries have no relevant item.
    """
    ks = _check_ks(ks)
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    relevant = _check_relevant(relevant).cpu()
    n_queries, n_gallery = relevant.shape
    # Queries sharing a relevant count share every probability; there are few distinct counts.
    counts, inverse = torch.unique(relevant.sum(dim=1), return_inverse=True)
    generator = torch.Generator().manual_seed(seed)
    per_count: dict[str, list[float]] = {}
    first_ranks = torch.empty(trials, n_queries, dtype=torch.float64)
    for index, r in enumerate(counts.tolist()):
        p_first = _first_rank_distribution(r, n_gallery)
        for name, value in _exact_chance_for(r, n_gallery, ks, p_first).items():
            per_count.setdefault(name, []).append(value)
        queries = (inverse == index).nonzero().squeeze(1)
        draws = torch.multinomial(p_first.clamp(min=0.0), trials * len(queries), replacement=True, generator=generator)
        first_ranks[:, queries] = (draws + 1).view(trials, len(queries)).double()
    out = {name: torch.tensor(values, dtype=torch.float64)[inverse].mean().item() for name, values in per_count.items()}
    out["median_rank"] = torch.quantile(first_ranks, 0.5, dim=1).mean().item()
    out["n_queries"] = float(n_queries)
    out["n_gallery"] = float(n_gallery)
    return {name: out[name] for name in (*(f"R@{k}" for k in ks), "mAP", f"NDCG@{_NDCG_K}", "R-Precision", "MRR",
                                         "median_rank", "n_queries", "n_gallery")}


def format_table(
    rows: list[tuple[str, dict[str, float], dict[str, float]]], keys: tuple[str, ...] = ("R@1", "R@5", "R@10")
) -> str:
    """Render results as a plain-text table, one row per retrieval direction.

    Args:
        rows: ``(direction, metrics, chance)`` triples, e.g. ``("image→text", m, c)``.
        keys: Metric names to show as columns, in order.

    Returns:
        Lines joined by newlines: a header, a rule, then cells such as
        ``0.312 (chance 0.006)``. No trailing newline.

    Raises:
        KeyError: If a row's metrics or chance lack one of `keys`.
    """
    header = ["direction", *keys]
    body = [
        [label, *(f"{metrics[k]:.3f} (chance {chance[k]:.3f})" for k in keys)] for label, metrics, chance in rows
    ]
    widths = [max(len(line[col]) for line in [header, *body]) for col in range(len(header))]

    def _line(cells: list[str]) -> str:
        # Label left-aligned, numbers right-aligned so their decimals line up.
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:]))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([_line(header), rule, *(_line(cells) for cells in body)])
