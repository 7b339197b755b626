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


def _exact_chance(n_rel: torch.Tensor, n_gallery: int, ks: tuple[int, ...]) -> dict[str, float]:
    """Exact expected R@K and MRR under a uniformly random ranking.

    With r relevant items among G, ``miss[j] = C(G-r, j) / C(G, j)`` is the chance
    that the top j hold none of them, built as a running product so nothing
    overflows. Then ``R@K = 1 - miss[K]`` and the first relevant item sits at
    rank k with probability ``miss[k-1] * r / (G-k+1)``.
    """
    values, inverse = torch.unique(n_rel, return_inverse=True)
    i = torch.arange(n_gallery, dtype=torch.float64)
    ranks = i + 1
    per_value: dict[str, list[float]] = {**{f"R@{k}": [] for k in ks}, "MRR": []}
    # Queries sharing a relevant count share every probability; there are few distinct counts.
    for r in values.tolist():
        factors = ((n_gallery - r - i) / (n_gallery - i)).clamp(min=0.0)
        miss = torch.cat([torch.ones(1, dtype=torch.float64), factors.cumprod(0)])
        for k in ks:
            per_value[f"R@{k}"].append(1.0 - miss[min(k, n_gallery)].item())
        p_first = miss[:-1] * r / (n_gallery - i)
        per_value["MRR"].append((p_first / ranks).sum().item())
    return {
        name: torch.tensor(vals, dtype=torch.float64)[inverse].mean().item() for name, vals in per_value.items()
    }


def chance_metrics(
    relevant: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10), trials: int = 100, seed: int = 0
) -> dict[str, float]:
    """Expected value of each :func:`retrieval_metrics` metric under random ranking.

    ``R@K`` and ``MRR`` are exact (per query, from its number of relevant items,
    then averaged). ``mAP``, ``NDCG@10``, ``R-Precision`` and ``median_rank`` are
    Monte Carlo averages over `trials` uniform random score matrices drawn from a
    CPU ``torch.Generator`` seeded with `seed`, so results are reproducible.
    Each trial costs one :func:`retrieval_metrics` call (1-2 s on CPU
    at Q = G = 5000), so lower `trials` for large problems.

    Args:
        relevant: [Q, G] bool relevance matrix, as for :func:`retrieval_metrics`.
        ks: Cutoffs for ``R@K``; a K larger than G is clipped to G.
        trials: Number of random score matrices for the Monte Carlo metrics.
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

    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    for _ in range(trials):
        # float64 so that tied random scores (which the stable sort would break by index) are negligible.
        scores = torch.rand(n_queries, n_gallery, generator=generator, dtype=torch.float64)
        for name, value in _aggregate(_per_query(scores, relevant), ks, n_gallery).items():
            totals[name] = totals.get(name, 0.0) + value
    out = {name: total / trials for name, total in totals.items()}
    out.update(_exact_chance(relevant.sum(dim=1), n_gallery, ks))
    return out


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
