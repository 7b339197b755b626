"""Zero-shot retrieval evaluation between every pair of modalities a model holds."""

from __future__ import annotations

from itertools import permutations
from pathlib import Path
from typing import Any

import torch

from ..errors import OneEncoderError
from ..features.bank import FeatureBank
from ..features.cache import FeatureCache, cache_dir_for
from ..modality import Modality
from ..model.parts import OneEncoderModel
from ..progress import status
from .bootstrap import describe_bootstrap
from .calibration import MatchCalibration, pair_sample
from .metrics import (chance_metrics_from_counts, mean_pair_score, relevant_counts, retrieval_per_query_by_group,
                      small_split_warning)


@torch.no_grad()
def embed_bank(model: OneEncoderModel, modality: str, bank: FeatureBank, batch_size: int = 256) -> torch.Tensor:
    """Embed every sample of a bank: ``[N, d]``, unit norm."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(bank), batch_size):
        index = torch.arange(start, min(start + batch_size, len(bank)))
        tokens, mask = bank.gather(index)
        out.append(model(modality, tokens.to(device), mask.to(device)).float())
    return torch.cat(out)


def _first_of_each_group(groups: list[str]) -> list[int]:
    seen: set[str] = set()
    keep = []
    for i, g in enumerate(groups):
        if g not in seen:
            seen.add(g)
            keep.append(i)
    return keep


def _rows(emb: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``emb[index]``, without a copy when ``index`` takes every row in order (big galleries)."""
    if index.numel() == emb.shape[0] and bool((index == torch.arange(emb.shape[0])).all()):
        return emb
    return emb[index.to(emb.device)]


def paired_rows(
    emb_q: torch.Tensor, groups_q: list[str], emb_g: torch.Tensor, groups_g: list[str],
    dedupe_q: bool = False, dedupe_g: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ranking problem every metric of a direction reads: ``(queries, gallery, query codes,
    gallery codes, relevant count per query)``.

    With ``dedupe_*``, identical items (e.g. one caption shared by many coins) count once;
    queries without any relevant gallery item are left out. Items of one group (the same
    code) are relevant to each other, never each other's negatives.
    """
    qi = _first_of_each_group(groups_q) if dedupe_q else list(range(len(groups_q)))
    gi = _first_of_each_group(groups_g) if dedupe_g else list(range(len(groups_g)))
    gq, gg = [groups_q[i] for i in qi], [groups_g[i] for i in gi]
    codes = {g: n for n, g in enumerate(sorted(set(gq) | set(gg)))}
    cq = torch.tensor([codes[g] for g in gq], dtype=torch.long)
    cg = torch.tensor([codes[g] for g in gg], dtype=torch.long)
    counts = relevant_counts(cq, cg)
    has = (counts > 0).nonzero().squeeze(1)
    if has.numel() == 0:
        raise OneEncoderError("no query has a relevant gallery item; are both modalities from the same samples?")
    queries = _rows(emb_q, torch.tensor(qi, dtype=torch.long)[has])
    gallery = _rows(emb_g, torch.tensor(gi, dtype=torch.long))
    return queries, gallery, cq[has], cg, counts[has]


def retrieval_between(
    emb_q: torch.Tensor, groups_q: list[str], emb_g: torch.Tensor, groups_g: list[str],
    dedupe_q: bool = False, dedupe_g: bool = False, intervals: bool = False,
) -> dict[str, dict[str, float]]:
    """Rank gallery for each query; items of the same group are all relevant.

    Streamed (:func:`oneencoder.evaluation.metrics.retrieval_metrics_by_group`): memory grows with
    the gallery, never with queries x gallery. Queries without any relevant gallery item
    are left out. With ``dedupe_*``, identical items (e.g. one caption shared by many
    coins) count once. With ``intervals``, the result also holds each metric's seeded
    bootstrap 95 % interval over queries (``intervals``: metric -> ``[low, high]``);
    validation, which runs every epoch and only compares, leaves them out.

    ``gap`` measures the modality gap: ``centroid_distance`` between the two clouds' centres,
    and the mean cosine of the matching (``mean_pos_cos``) and non-matching (``mean_neg_cos``) pairs.
    """
    queries, gallery, cq, cg, counts = paired_rows(emb_q, groups_q, emb_g, groups_g, dedupe_q, dedupe_g)
    per_query = retrieval_per_query_by_group(queries, gallery, cq, cg)
    metrics = per_query.metrics()
    chance = chance_metrics_from_counts(counts, gallery.shape[0])
    # Cosine of true pairs; its "chance" is the mean cosine of all pairs.
    all_pairs = mean_pair_score(queries, gallery)
    chance["mean_pos_cos"] = all_pairs
    # The modality gap (Liang et al., 2022): how far apart the two clouds' centres lie.
    gap = float((queries.double().mean(0) - gallery.double().mean(0)).norm())
    # Non-matching pairs from the two sums, without a [Q, G] matrix: all pairs less the matching ones.
    n_all, n_pos = queries.shape[0] * gallery.shape[0], int(counts.sum())
    pos_sum = metrics["mean_pos_cos"] * n_pos
    neg = (all_pairs * n_all - pos_sum) / (n_all - n_pos) if n_all > n_pos else float("nan")
    out = {"metrics": metrics, "chance": chance,
           "gap": {"centroid_distance": gap, "mean_pos_cos": metrics["mean_pos_cos"], "mean_neg_cos": neg}}
    if intervals:
        out["intervals"] = per_query.intervals()
    return out


def embed_split(model: OneEncoderModel, modalities: dict[str, Modality], records: list[dict],
                cache_root: str | Path, split: str,
                batch_size: int = 256) -> dict[str, tuple[torch.Tensor, list[str], list[str]]]:
    """``{modality: (embeddings [N, d], groups, ids)}`` of one split's cached samples.

    Samples missing from a modality's cache (rejected, or without that field) are left out
    of that modality only; a modality with none of the split's samples is left out.

    Raises:
        OneEncoderError: The manifest has no sample of ``split``.
    """
    rows = [r for r in records if r.get("split") == split]
    if not rows:
        raise OneEncoderError(f"the manifest has no {split!r} samples")
    embedded: dict[str, tuple[torch.Tensor, list[str], list[str]]] = {}
    for name, modality in modalities.items():
        path = cache_dir_for(cache_root, name)
        with FeatureCache(path, modality.fingerprint(), readonly=True) as cache:
            have = cache.ids()
            kept = [r for r in rows if r["id"] in have]
            if not kept:
                continue
            bank = FeatureBank.from_cache(cache, [r["id"] for r in kept])
        embedded[name] = (embed_bank(model, name, bank, batch_size), [r.get("group", r["id"]) for r in kept],
                          [r["id"] for r in kept])
    return embedded


def evaluate_samples(
    model: OneEncoderModel,
    modalities: dict[str, Modality],
    records: list[dict],
    cache_root: str | Path,
    split: str = "test",
    batch_size: int = 256,
    subset_key: str = "heldout",
    calibration: dict[str, MatchCalibration] | None = None,
) -> dict[str, Any]:
    """Retrieval in every direction between the given modalities on one split.

    Samples missing from a modality's cache (rejected, or without that field) are
    left out of the pairs involving that modality only. Every direction holds its
    metrics, their chance levels and their bootstrap 95 % intervals over queries
    (``bootstrap`` says how they were drawn). If records carry
    ``subset_key`` (e.g. ``heldout: "object"`` vs ``"pose"``), each subset is also
    scored on its own, queries and gallery both restricted to it, under ``subsets``.

    With ``calibration`` (direction -> the match calibration fitted on validation), every
    direction also holds ``calibration``: its threshold, the precision validation predicted
    and the precision measured on this split (None for a direction without one).
    """
    embedded = embed_split(model, modalities, records, cache_root, split, batch_size)
    fewest = min((len(ids) for _, _, ids in embedded.values()), default=0)
    if embedded and (warning := small_split_warning(split, fewest)):
        status(warning)
    results: dict[str, Any] = {"split": split, "directions": _directions(embedded, modalities, calibration),
                               "bootstrap": describe_bootstrap()}
    rows = [r for r in records if r.get("split") == split]
    subsets = sorted({str(r[subset_key]) for r in rows if r.get(subset_key) is not None})
    if subsets:
        results["subsets"] = {}
        for value in subsets:
            ids = {r["id"] for r in rows if str(r.get(subset_key)) == value}
            part = {}
            for name, (emb, groups, kept_ids) in embedded.items():
                index = [i for i, sid in enumerate(kept_ids) if sid in ids]
                if index:
                    part[name] = (emb[index], [groups[i] for i in index], [kept_ids[i] for i in index])
            results["subsets"][value] = _directions(part, modalities, calibration)
    return results


def _directions(embedded: dict[str, tuple[torch.Tensor, list[str], list[str]]], modalities: dict[str, Modality],
                calibration: dict[str, MatchCalibration] | None = None) -> dict[str, Any]:
    """Every direction between embedded modalities; pairs with no relevant item are left out."""
    out: dict[str, Any] = {}
    for a, b in permutations(embedded, 2):
        (ea, ga, _), (eb, gb, _) = embedded[a], embedded[b]
        if not set(ga) & set(gb):
            continue  # e.g. a subset holding only one of the two modalities' samples
        dedupe = (modalities[a].spec.dedupe_in_eval, modalities[b].spec.dedupe_in_eval)
        direction = f"{a}→{b}"
        out[direction] = {**retrieval_between(ea, ga, eb, gb, *dedupe, intervals=True), "n_query_samples": len(ga)}
        if calibration is not None:
            fitted = calibration.get(direction)
            out[direction]["calibration"] = (
                None if fitted is None else fitted.report(*pair_sample(*paired_rows(ea, ga, eb, gb, *dedupe)[:4])))
    return out
