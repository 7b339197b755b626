"""Exact similarity search in query blocks: no query × gallery matrix is ever built whole.

Everything here scores a block of queries against the whole gallery at once
(``queries[block] @ gallery.T``), so each score is computed exactly once, by one
matmul, and every decision about it (its rank, whether it makes the top k) sees the
same value. Memory is one ``[block, G]`` score matrix, not ``[Q, G]``.

Ranking convention (shared with :mod:`oneencoder.evaluation.metrics`): higher score first, and
among equal scores the lower gallery index first, exactly the order of
``torch.sort(scores, descending=True, stable=True)``.

Example:
    >>> scores, index = topk_search(text_emb, image_emb, k=10)
    >>> index[0]  # the 10 best images for the first caption, best first
"""

from __future__ import annotations

from typing import Iterator

import torch

# Scores held at once per block: 16M float32 = 64 MB, plus a same-sized work buffer.
BLOCK_ELEMENTS = 1 << 24


def block_rows(n_gallery: int, block: int | None = None) -> int:
    """Queries per block: ``block`` if given, else as many as fit ``BLOCK_ELEMENTS`` scores."""
    if block is not None:
        if block < 1:
            raise ValueError(f"block must be a positive number of queries, got {block}")
        return block
    return max(1, BLOCK_ELEMENTS // max(1, n_gallery))


def score_blocks(queries: torch.Tensor, gallery: torch.Tensor,
                 block: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, queries[start:start+b] @ gallery.T)`` for consecutive query blocks.

    Raises:
        ValueError: If the widths differ, either side is not 2-D, or a block's scores contain NaN.
    """
    if queries.dim() != 2 or gallery.dim() != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and gallery {tuple(gallery.shape)} must be "
                         "[Q, d] and [G, d] with the same d")
    rows = block_rows(gallery.shape[0], block)
    gallery_t = gallery.t()
    for start in range(0, queries.shape[0], rows):
        scores = queries[start : start + rows] @ gallery_t
        # A finite sum rules NaN out at a quarter of the cost of isnan().any().
        if scores.is_floating_point() and not bool(torch.isfinite(scores.sum())) and bool(scores.isnan().any()):
            raise ValueError("scores contain NaN; their ranking is undefined")
        yield start, scores


def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` columns of each row's stable descending sort: ``(values, indices)``.

    ``torch.topk`` leaves the order of equal values unspecified; here the k-th value's
    ties are filled from the lowest index up, then the winners are sorted stably, so
    the result equals ``torch.sort(scores, dim=1, descending=True, stable=True)`` cut to k columns,
    at the cost of one ``topk`` and a few passes over the row.
    """
    rows, n = scores.shape
    k = min(k, n)
    kth = scores.topk(k, dim=1).values[:, -1:]
    take = scores >= kth
    extra = take.sum(dim=1) > k  # rows where the k-th value ties with items that do not fit
    if bool(extra.any()):
        fix = extra.nonzero().squeeze(1)
        sub = scores[fix]
        above = sub > kth[fix]
        room = k - above.sum(dim=1, keepdim=True)
        tied = sub == kth[fix]
        take[fix] = above | (tied & (tied.cumsum(dim=1) <= room))  # lowest indices among the ties
    index = take.nonzero()[:, 1].view(rows, k)  # ascending gallery index within each row
    values = scores.gather(1, index)
    order = values.argsort(dim=1, descending=True, stable=True)  # equal values keep index order
    return values.gather(1, order), index.gather(1, order)


def topk_search(queries: torch.Tensor, gallery: torch.Tensor, k: int,
                block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k gallery items of every query by dot product (cosine for unit vectors).

    Args:
        queries: ``[Q, d]``.
        gallery: ``[G, d]``, on the same device as ``queries`` (CPU or CUDA).
        k: Items per query; clipped to G.
        block: Queries scored at once (default: as many as fit ``BLOCK_ELEMENTS`` scores).

    Returns:
        ``(scores [Q, k], indices [Q, k])``, best first; among equal scores the lower
        gallery index first (the stable order of :mod:`oneencoder.evaluation.metrics`).

    Raises:
        ValueError: If ``k < 1``, the gallery is empty, the widths differ, or scores contain NaN.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if gallery.shape[0] == 0:
        raise ValueError("the gallery is empty")
    k = min(k, gallery.shape[0])
    values, indices = [], []
    for _, scores in score_blocks(queries, gallery, block):
        v, i = stable_topk(scores, k)
        values.append(v)
        indices.append(i)
    if not values:  # no queries
        return queries.new_empty(0, k), torch.empty(0, k, dtype=torch.long, device=queries.device)
    return torch.cat(values), torch.cat(indices)
