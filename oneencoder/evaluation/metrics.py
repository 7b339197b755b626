"""Retrieval metrics for cross-modal evaluation, and their values under chance.

Every query may have several relevant gallery items (e.g. an image with five
captions), so no metric assumes that item ``i`` matches item ``i``. Relevance comes
in one of two forms:

* a boolean ``[Q, G]`` matrix with a score matrix (:func:`retrieval_metrics`,
  :func:`chance_metrics`), for small problems and hand-made examples;
* group codes, one integer per query and per gallery item, relevant when equal,
  with the embeddings themselves (:func:`retrieval_metrics_by_group`,
  :func:`chance_metrics_from_counts`). This is the streaming form evaluation uses:
  queries are scored in blocks against the gallery and no ``[Q, G]`` matrix, of
  scores or of relevance, is ever built (100k x 100k would be 40 GB of scores).
  Both forms give the same values.

Ranking and ties:
    Each query's gallery is ranked as by ``torch.sort(descending=True,
    stable=True)``, so among equal scores the item with the lower gallery index
    ranks first. A model that outputs constant scores therefore gets the
    gallery order as its ranking instead of having every tied relevant item
    count as rank 1 (a "free lunch"), and results are deterministic.

Example:
    >>> m = retrieval_metrics(img @ txt.T, relevant)
    >>> c = chance_metrics(relevant)
    >>> print(format_table([("image→text", m, c)]))
    >>> m = retrieval_metrics_by_group(img, txt, img_groups, txt_groups)  # same numbers, streamed
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bootstrap import LEVEL, RESAMPLES, SEED, bootstrap_intervals
from .topk import block_rows, score_blocks

# NDCG is reported at this cutoff (clipped to the gallery size).
_NDCG_K = 10
# Decimals of every number shown as text (tables, info, search, classify).
DECIMALS = 3
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


def _ranks_from_hits(hits: torch.Tensor, width: int) -> torch.Tensor:
    """1-based ranks of each row's relevant items, ascending, from ``hits`` (bool, in rank order).

    Returns ``[rows, width]`` long, padded with ``G + 1`` past each row's relevant count.
    """
    rows, n_gallery = hits.shape
    row, position = hits.nonzero(as_tuple=True)  # row-major: positions ascend within a row
    n_rel = hits.sum(dim=1)
    slot = torch.arange(row.numel(), device=hits.device) - (n_rel.cumsum(0) - n_rel)[row]
    ranks = torch.full((rows, width), n_gallery + 1, dtype=torch.long, device=hits.device)
    ranks[row, slot] = position + 1
    return ranks


def _per_query(ranks: torch.Tensor, n_rel: torch.Tensor, n_gallery: int) -> dict[str, torch.Tensor]:
    """Per-query first rank, AP, NDCG@10 and R-Precision from the ranks of the relevant items.

    Args:
        ranks: ``[q, m]`` 1-based ranks, ascending per row, padded past ``n_rel`` (ignored there).
        n_rel: ``[q]`` number of relevant items, at least 1.
        n_gallery: Gallery size G.
    """
    device = ranks.device
    ndcg_k = min(_NDCG_K, n_gallery)
    discounts = 1.0 / torch.log2(torch.arange(2, ndcg_k + 2, dtype=torch.float64, device=device))
    ideal_dcg = discounts.cumsum(0)  # ideal_dcg[n - 1] = best DCG with n relevant items
    slots = torch.arange(1, ranks.shape[1] + 1, dtype=torch.float64, device=device)
    valid = slots <= n_rel[:, None]
    r = ranks.double()
    n = n_rel.double()
    # The i-th relevant item at rank p contributes precision i / p to AP.
    ap = torch.where(valid, slots / r, 0.0).sum(dim=1) / n
    gains = torch.where(valid & (ranks <= ndcg_k), 1.0 / torch.log2(r + 1), 0.0)
    return {
        "first_rank": ranks[:, 0],
        "ap": ap,
        "ndcg": gains.sum(dim=1) / ideal_dcg[n_rel.clamp(max=ndcg_k) - 1],
        "rprec": (valid & (ranks <= n_rel[:, None])).sum(dim=1) / n,
    }


def _dense_per_query(scores: torch.Tensor, relevant: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-query values of a score matrix, ranked in row chunks (inputs already validated)."""
    n_queries, n_gallery = relevant.shape
    parts: dict[str, list[torch.Tensor]] = {}
    chunk = max(1, _CHUNK_ELEMENTS // n_gallery)
    for start in range(0, n_queries, chunk):
        order = torch.sort(scores[start : start + chunk], dim=1, descending=True, stable=True).indices
        hits = relevant[start : start + chunk].gather(1, order)  # [q, G] bool, in rank order
        n_rel = hits.sum(dim=1)
        ranks = _ranks_from_hits(hits, int(n_rel.max()))
        for name, value in _per_query(ranks, n_rel, n_gallery).items():
            parts.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


@dataclass(frozen=True)
class PerQuery:
    """Per-query values of one ranking problem, from which every metric is computed once.

    Each metric of :func:`retrieval_metrics` is the mean of its vector in :meth:`values`,
    except ``median_rank`` (the median of ``first_rank``) and ``mean_pos_cos`` (the
    relevant pairs' mean score: ``pos_sum.sum() / n_relevant.sum()``). Bootstrap
    intervals (:meth:`intervals`) resample these same vectors, so a metric and its
    interval can never come from two code paths.

    Attributes:
        ranked: ``first_rank`` (1-based, long), ``ap``, ``ndcg`` and ``rprec``, each ``[Q]``.
        ks: Cutoffs of ``R@K``.
        n_gallery: Gallery size G.
        pos_sum: ``[Q]`` sum of each query's relevant scores (streamed form only), else None.
        n_relevant: ``[Q]`` relevant items per query, with ``pos_sum``.
    """

    ranked: dict[str, torch.Tensor]
    ks: tuple[int, ...]
    n_gallery: int
    pos_sum: torch.Tensor | None = None
    n_relevant: torch.Tensor | None = None

    def values(self) -> dict[str, torch.Tensor]:
        """Metric -> ``[Q]`` float64 per-query values whose mean is the metric."""
        first_rank = self.ranked["first_rank"]
        out = {f"R@{k}": (first_rank <= min(k, self.n_gallery)).double() for k in self.ks}
        out["mAP"] = self.ranked["ap"]
        out[f"NDCG@{_NDCG_K}"] = self.ranked["ndcg"]
        out["R-Precision"] = self.ranked["rprec"]
        out["MRR"] = 1.0 / first_rank.double()
        return out

    def metrics(self) -> dict[str, float]:
        """The public metric dictionary (see :func:`retrieval_metrics` for the keys)."""
        first_rank = self.ranked["first_rank"]
        out = {name: value.mean().item() for name, value in self.values().items()}
        # quantile interpolates, so an even number of queries gives the usual mean of the middle two.
        out["median_rank"] = torch.quantile(first_rank.double(), 0.5).item()
        out["n_queries"] = float(first_rank.numel())
        out["n_gallery"] = float(self.n_gallery)
        if self.pos_sum is not None and self.n_relevant is not None:
            out["mean_pos_cos"] = (self.pos_sum.sum() / self.n_relevant.sum()).item()
        return out

    def intervals(self, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> dict[str, list[float]]:
        """``[low, high]`` percentile bootstrap interval over queries of every metric but the counts."""
        ratios = {}
        if self.pos_sum is not None and self.n_relevant is not None:
            ratios["mean_pos_cos"] = (self.pos_sum.cpu().numpy(), self.n_relevant.double().cpu().numpy())
        means = {name: value.cpu().numpy() for name, value in self.values().items()}
        found = bootstrap_intervals(means, medians={"median_rank": self.ranked["first_rank"].double().cpu().numpy()},
                                    ratios=ratios, resamples=resamples, level=level, seed=seed)
        return {name: found[name] for name in self.metrics() if name in found}  # the metrics' order


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
    return PerQuery(_dense_per_query(scores, relevant), ks, relevant.shape[1]).metrics()


# ----- streaming: relevance as group codes, queries scored in blocks -----------------

# Above this many relevant items per query, a block is ranked by sorting its rows (cost
# ~log G passes) instead of counting, per relevant item, the items that outrank it (2 passes each).
_COUNT_LIMIT = 24
_COUNT_COLUMNS = 8192  # gallery columns counted at once: a [block, 8192] slice stays in cache


def _group_members(query_codes: torch.Tensor, gallery_codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each query's relevant gallery items without a ``[Q, G]`` matrix.

    Returns ``(members, first, count, q_code, g_code)``: ``members`` lists gallery
    indices grouped by code (ascending within a code), and query i's relevant items are
    ``members[first[i] : first[i] + count[i]]``; ``q_code``/``g_code`` are the codes
    renumbered 0..K-1.
    """
    n_gallery = gallery_codes.numel()
    _, inverse = torch.unique(torch.cat([gallery_codes, query_codes.to(gallery_codes.device)]), return_inverse=True)
    g_code, q_code = inverse[:n_gallery], inverse[n_gallery:]
    per_code = torch.bincount(g_code, minlength=int(inverse.max()) + 1)
    starts = per_code.cumsum(0) - per_code
    members = torch.argsort(g_code, stable=True)
    return members, starts[q_code], per_code[q_code], q_code, g_code


def _check_codes(query_codes: torch.Tensor, gallery_codes: torch.Tensor, n_queries: int, n_gallery: int) -> None:
    if query_codes.shape != (n_queries,) or gallery_codes.shape != (n_gallery,):
        raise ValueError(f"group codes must be [Q] = [{n_queries}] and [G] = [{n_gallery}], got "
                         f"{tuple(query_codes.shape)} and {tuple(gallery_codes.shape)}")
    if query_codes.is_floating_point() or gallery_codes.is_floating_point():
        raise ValueError("group codes must be integers")


def relevant_counts(query_codes: torch.Tensor, gallery_codes: torch.Tensor) -> torch.Tensor:
    """``[Q]`` number of gallery items that share each query's group code."""
    if query_codes.dim() != 1 or gallery_codes.dim() != 1:
        raise ValueError("group codes must be 1-D")
    if gallery_codes.numel() == 0:
        return torch.zeros(query_codes.numel(), dtype=torch.long, device=query_codes.device)
    return _group_members(query_codes, gallery_codes)[2].to(query_codes.device)


def _counted_ranks(scores: torch.Tensor, relevant: torch.Tensor, n_rel: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Ranks of each row's relevant items by counting the items that outrank each one.

    Item j (score s) is outranked by every item with a higher score and by every
    item with score s and a lower index: exactly its position in the stable sort.

    Args:
        scores: ``[b, G]`` block of scores.
        relevant: ``[b, m]`` gallery indices of each row's relevant items (any value past ``n_rel``).
        n_rel: ``[b]`` relevant items per row.

    Returns:
        ``(ranks [b, m] ascending, padded with G + 1; scores of the relevant items [b, m])``.
    """
    rows, n_gallery = scores.shape
    device = scores.device
    valid = torch.arange(relevant.shape[1], device=device) < n_rel[:, None]
    target = scores.gather(1, relevant)
    # Counting through a float buffer is several times faster than summing a bool tensor
    # (float32 counts are exact below 2**24); columns go in slices that stay in cache.
    buffer = torch.empty(rows, min(n_gallery, _COUNT_COLUMNS), device=device,
                         dtype=torch.float32 if n_gallery < 1 << 24 else torch.float64)
    before = torch.zeros(relevant.shape, dtype=buffer.dtype, device=device)
    for start in range(0, n_gallery, _COUNT_COLUMNS):
        part = scores[:, start : start + _COUNT_COLUMNS]
        out = buffer[:, : part.shape[1]]
        for j in range(relevant.shape[1]):
            threshold = target[:, j : j + 1]
            torch.gt(part, threshold, out=out)
            before[:, j] += out.sum(dim=1)
            torch.eq(part, threshold, out=out)
            equal = out.sum(dim=1)
            own = (relevant[:, j] >= start) & (relevant[:, j] < start + part.shape[1])
            tied = equal > own.to(equal.dtype)  # an item other than j itself has exactly its score
            if bool(tied.any()):
                at = tied.nonzero().squeeze(1)
                lower = torch.arange(start, start + part.shape[1], device=device)[None, :] < relevant[at, j : j + 1]
                before[at, j] += (out[at] * lower).sum(dim=1)
    ranks = torch.where(valid, before.long() + 1, n_gallery + 1)
    return ranks.sort(dim=1).values, torch.where(valid, target, 0)


def retrieval_metrics_by_group(
    queries: torch.Tensor, gallery: torch.Tensor, query_codes: torch.Tensor, gallery_codes: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10), block: int | None = None,
) -> dict[str, float]:
    """:func:`retrieval_metrics` of ``queries @ gallery.T``, streamed: no ``[Q, G]`` matrix is built.

    Queries are scored in blocks against the whole gallery (:func:`oneencoder.evaluation.topk.score_blocks`),
    and each relevant item's rank is counted within its block, so memory grows with G,
    not Q x G. Queries are taken in order of their relevant count, so blocks pad little.
    Works on CPU and CUDA tensors alike (the device of ``queries``).

    Args:
        queries: ``[Q, d]`` query embeddings.
        gallery: ``[G, d]`` gallery embeddings, same device.
        query_codes: ``[Q]`` integer group codes; a gallery item is relevant to a query
            when their codes are equal. Every query needs at least one.
        gallery_codes: ``[G]`` integer group codes.
        ks: Cutoffs for ``R@K``; a K larger than G is clipped to G.
        block: Queries scored at once (default: as many as fit ``search.BLOCK_ELEMENTS`` scores).

    Returns:
        The keys of :func:`retrieval_metrics`, same values and tie-break, plus
        ``mean_pos_cos``: the mean score of the relevant pairs (their cosine, for unit vectors).

    Raises:
        ValueError: If shapes disagree, ks is invalid, scores contain NaN, or some queries
            have no relevant item (the message says how many).
    """
    return retrieval_per_query_by_group(queries, gallery, query_codes, gallery_codes, ks, block).metrics()


def retrieval_per_query_by_group(
    queries: torch.Tensor, gallery: torch.Tensor, query_codes: torch.Tensor, gallery_codes: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10), block: int | None = None,
) -> PerQuery:
    """The per-query values behind :func:`retrieval_metrics_by_group` (same arguments), in query order:
    ``.metrics()`` gives its result, ``.intervals()`` bootstrap intervals of each metric."""
    ks = _check_ks(ks)
    n_queries, n_gallery = queries.shape[0], gallery.shape[0]
    if n_queries == 0 or n_gallery == 0:
        raise ValueError(f"need at least one query and one gallery item, got {n_queries} and {n_gallery}")
    _check_codes(query_codes, gallery_codes, n_queries, n_gallery)
    device = queries.device
    members, first, count, q_code, g_code = _group_members(query_codes.to(device), gallery_codes.to(device))
    missing = int((count == 0).sum())
    if missing:
        raise ValueError(f"{missing} of {n_queries} queries have no relevant gallery item")
    order = torch.argsort(count, stable=True)
    rows = block_rows(n_gallery, block)
    per_query = {name: torch.empty(n_queries, dtype=torch.float64, device=device) for name in ("ap", "ndcg", "rprec")}
    per_query["first_rank"] = torch.empty(n_queries, dtype=torch.long, device=device)
    pos_sum = torch.empty(n_queries, dtype=torch.float64, device=device)
    for start, scores in score_blocks(queries[order], gallery, rows):
        at = order[start : start + rows]
        n_rel = count[at]
        width = int(n_rel.max())
        if width <= _COUNT_LIMIT:
            slots = (first[at, None] + torch.arange(width, device=device)).clamp(max=n_gallery - 1)
            ranks, target = _counted_ranks(scores, members[slots], n_rel)
            pos_sum[at] = target.double().sum(dim=1)
        else:
            relevant = q_code[at, None] == g_code[None, :]
            ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices
            ranks = _ranks_from_hits(relevant.gather(1, ranked), width)
            pos_sum[at] = torch.where(relevant, scores, 0).double().sum(dim=1)
        for name, value in _per_query(ranks, n_rel, n_gallery).items():
            per_query[name][at] = value  # back in query order, so averages match the dense path
    return PerQuery(per_query, ks, n_gallery, pos_sum=pos_sum, n_relevant=count)


def mean_pair_score(queries: torch.Tensor, gallery: torch.Tensor) -> float:
    """Mean of ``queries @ gallery.T`` over all pairs, from the two sums: no ``[Q, G]`` matrix.

    For unit vectors this is the mean cosine of all pairs, the chance level of ``mean_pos_cos``.
    """
    return float(queries.double().sum(0) @ gallery.double().sum(0)) / (queries.shape[0] * gallery.shape[0])


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

    Only each query's number of relevant items matters: this is
    :func:`chance_metrics_from_counts` of ``relevant.sum(1)``.

    Args:
        relevant: [Q, G] bool relevance matrix, as for :func:`retrieval_metrics`.
        ks: Cutoffs for ``R@K``; a K larger than G is clipped to G.
        trials: Number of draws for ``median_rank``.
        seed: Seed of the random generator.

    Raises:
        ValueError: If relevant is not a non-empty 2-D matrix, ks or trials is
            invalid, or some queries have no relevant item.
    """
    relevant = _check_relevant(relevant)
    return chance_metrics_from_counts(relevant.sum(dim=1), relevant.shape[1], ks, trials, seed)


def chance_metrics_from_counts(
    counts: torch.Tensor, n_gallery: int, ks: tuple[int, ...] = (1, 5, 10), trials: int = 100, seed: int = 0
) -> dict[str, float]:
    """Expected value of each retrieval metric under random ranking, from relevant counts.

    ``R@K``, ``MRR``, ``mAP``, ``NDCG@10`` and ``R-Precision`` are exact: per query from
    its number of relevant items, then averaged. ``median_rank`` (a median over queries)
    has no simple closed form: it is averaged over `trials` draws of every query's first
    relevant rank from its exact distribution, with a CPU ``torch.Generator`` seeded with
    `seed`, so results are reproducible. Milliseconds even at Q = G = 5000.

    Args:
        counts: ``[Q]`` number of relevant gallery items of each query (e.g.
            :func:`relevant_counts` of group codes), each in 1..G.
        n_gallery: Gallery size G.
        ks: Cutoffs for ``R@K``; a K larger than G is clipped to G.
        trials: Number of draws for ``median_rank``.
        seed: Seed of the random generator.

    Returns:
        The same keys as :func:`retrieval_metrics`, including ``n_queries`` and
        ``n_gallery``, so a result and its chance level can be indexed alike.

    Raises:
        ValueError: If counts is empty or out of 1..G, or ks or trials is invalid.
    """
    ks = _check_ks(ks)
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    counts = torch.as_tensor(counts).long().cpu()
    if counts.dim() != 1 or counts.numel() == 0 or n_gallery < 1:
        raise ValueError(f"counts must be a non-empty [Q] vector and G >= 1, got {tuple(counts.shape)} and {n_gallery}")
    missing = int((counts < 1).sum())
    if missing:
        raise ValueError(f"{missing} of {counts.numel()} queries have no relevant gallery item")
    if int(counts.max()) > n_gallery:
        raise ValueError(f"a query has {int(counts.max())} relevant items but the gallery only {n_gallery}")
    n_queries = counts.numel()
    # Queries sharing a relevant count share every probability; there are few distinct counts.
    distinct, inverse = torch.unique(counts, return_inverse=True)
    generator = torch.Generator().manual_seed(seed)
    per_count: dict[str, list[float]] = {}
    first_ranks = torch.empty(trials, n_queries, dtype=torch.float64)
    for index, r in enumerate(distinct.tolist()):
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


#: Below this many queries a split cannot rank two runs: one query moves R@1 by over 1 point.
MIN_RANKING_QUERIES = 100


def small_split_warning(split: str, n_queries: int) -> str | None:
    """A one-line warning when ``split`` is too small to tell two runs apart, else None."""
    if n_queries >= MIN_RANKING_QUERIES:
        return None
    return (f"warning: the {split} split has {n_queries} queries (under {MIN_RANKING_QUERIES}): each one moves R@1 by "
            f"{100 / max(n_queries, 1):.1f} points, so two runs this close are within noise; compare seeds "
            "(benchmarks/stage_seeds.py) or add data")


def format_number(value: float, signed: bool = False) -> str:
    """How every metric and score is shown in text: 3 decimals (JSON output keeps full precision)."""
    return f"{value:+.{DECIMALS}f}" if signed else f"{value:.{DECIMALS}f}"


def format_interval(bounds: list[float] | tuple[float, float]) -> str:
    """A 95 % interval as shown in text: ``[0.236, 0.375]``."""
    return f"[{format_number(bounds[0])}, {format_number(bounds[1])}]"


def format_table(
    rows: list[tuple[str, dict[str, float], dict[str, float]]], keys: tuple[str, ...] = ("R@1", "R@5", "R@10"),
    intervals: list[dict[str, list[float]] | None] | None = None,
) -> str:
    """Render results as a plain-text table, one row per retrieval direction.

    Args:
        rows: ``(direction, metrics, chance)`` triples, e.g. ``("image→text", m, c)``.
        keys: Metric names to show as columns, in order.
        intervals: Per row, metric -> ``[low, high]`` (or None): shown on a line of its own
            under the row, each interval under its value, so the table stays as narrow.

    Returns:
        Lines joined by newlines: a header, a rule, then cells such as
        ``0.312 (chance 0.006)``, each followed by its intervals line if given. No trailing newline.

    Raises:
        KeyError: If a row's metrics or chance lack one of `keys`.
    """
    header = ["direction", *keys]
    body = []
    for index, (label, metrics, chance) in enumerate(rows):
        cells = [f"{format_number(metrics[k])} (chance {format_number(chance[k])})" for k in keys]
        body.append([label, *cells])
        bounds = intervals[index] if intervals and index < len(intervals) else None
        if bounds:  # left-aligned within the value's width: the interval starts under its value
            body.append(["", *((format_interval(bounds[k]) if k in bounds else "").ljust(len(cell))
                               for k, cell in zip(keys, cells))])
    widths = [max(len(line[col]) for line in [header, *body]) for col in range(len(header))]

    def _line(cells: list[str]) -> str:
        # Label left-aligned, numbers right-aligned so their decimals line up.
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:]))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([_line(header), rule, *(_line(cells) for cells in body)])
