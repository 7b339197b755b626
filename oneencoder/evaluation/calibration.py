"""Is this pair a match? A calibrated probability from the cosine, and the modality-gap table.

A cosine alone says little across modality pairs: every direction has its own modality gap,
so a sound and its picture may score 0.2 while an unrelated caption and picture score 0.3.
Each direction (query modality → gallery modality) therefore gets its own calibration:

* **Platt scaling** (Platt, 1999): ``p(match | cos) = sigmoid(a * cos + b)``, fitted by Newton's
  method (float64, deterministic) on every query–gallery pair of the validation split. A pair
  matches when the retrieval metrics say so: same group (caption group, same sample), after the
  same de-duplication. Platt's smoothed targets keep the slope finite when the two classes
  separate. Above :data:`MAX_NEGATIVES` non-matching pairs a seeded sample of them is used,
  each weighted by the inverse of the sampling rate, so the fit is unchanged in expectation.
* **The threshold** is the cosine that maximises F1 on validation (a pair is called a match at
  ``cos >= threshold``), reported with its validation precision. Not ``p = 0.5``: matches are
  rare (about 1 pair in G), so a probability of 0.5 is reached by few pairs or none, and its
  precision would rest on a handful of them.

How likely a pair is to match also depends on how many of the pairs match: in a gallery ten
times the validation one, an item at the same cosine is about ten times less likely to be the
match. So the stored fit is at validation's share of matching pairs, and a search moves its
odds to the index's size (:meth:`MatchCalibration.in_gallery`, assuming each query has as many
matches there as in validation); likewise the precision that validation predicts for another
split uses validation's recall and false-positive rate at that split's share of matches
(:meth:`MatchCalibration.predicted_precision`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..model.checkpoint import MATCH_CALIBRATION
from .metrics import format_number, relevant_counts
from .topk import block_rows, score_blocks

#: Above this many non-matching pairs, a seeded sample of this size is used (weighted).
MAX_NEGATIVES = 1_000_000
SEED = 0
RULE = "max F1 on validation"
_NEWTON_STEPS = 200


def pair_sample(queries: torch.Tensor, gallery: torch.Tensor, query_codes: torch.Tensor,
                gallery_codes: torch.Tensor, max_negatives: int = MAX_NEGATIVES,
                seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosines, labels and weights of the query–gallery pairs of one direction.

    Every matching pair (equal codes) is kept; non-matching ones too, up to ``max_negatives``,
    above which each is kept with probability ``max_negatives / n_negatives`` (a seeded CPU
    generator, so the sample is reproducible) and weighted by the inverse of that rate.

    Returns:
        ``(scores float64 [n], labels bool [n], weights float64 [n])``.
    """
    n_pos = int(relevant_counts(query_codes, gallery_codes).sum())
    n_neg = queries.shape[0] * gallery.shape[0] - n_pos
    rate = 1.0 if n_neg <= max_negatives else max_negatives / n_neg
    generator = torch.Generator().manual_seed(seed)
    scores, labels = [], []
    rows = block_rows(gallery.shape[0])
    for start, block in score_blocks(queries, gallery, rows):
        block = block.float().cpu()
        match = query_codes[start : start + block.shape[0], None].cpu() == gallery_codes[None, :].cpu()
        keep = match | (torch.rand(block.shape, generator=generator) < rate) if rate < 1 else torch.ones_like(match)
        scores.append(block[keep].double().numpy())
        labels.append(match[keep].numpy())
    s, y = np.concatenate(scores), np.concatenate(labels)
    return s, y, np.where(y, 1.0, 1.0 / rate)


def _loss(z: np.ndarray, t: np.ndarray, w: np.ndarray) -> float:
    """Weighted cross-entropy of ``sigmoid(z)`` against targets ``t``, computed stably."""
    return float(np.sum(w * (np.logaddexp(0.0, z) - t * z)))


def fit_platt(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """``(a, b)`` of ``p = sigmoid(a * score + b)``, by Newton's method with step halving.

    Targets are Platt's: ``(N+ + 1) / (N+ + 2)`` for matches, ``1 / (N- + 2)`` otherwise (counts
    weighted), so perfectly separated classes still give a finite slope.

    Raises:
        ValueError: No pairs, or only one class.
    """
    x = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64)
    if x.size == 0 or y.all() or not y.any():
        raise ValueError(f"calibration needs matching and non-matching pairs, got {int(y.sum())} of {x.size}")
    n_pos, n_neg = float(w[y].sum()), float(w[~y].sum())
    t = np.where(y, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    theta = np.array([0.0, math.log((n_pos + 1) / (n_neg + 1))])
    design = np.stack([x, np.ones_like(x)], axis=1)
    loss = _loss(design @ theta, t, w)
    for _ in range(_NEWTON_STEPS):
        p = 1.0 / (1.0 + np.exp(-(design @ theta)))
        gradient = design.T @ (w * (p - t))
        hessian = (design * (w * p * (1 - p))[:, None]).T @ design + 1e-12 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        size = 1.0
        while size > 1e-8:  # halve until the loss does not grow
            candidate = theta - size * step
            new = _loss(design @ candidate, t, w)
            if new <= loss:
                break
            size /= 2
        else:
            break
        theta, loss = candidate, new
        if np.abs(size * step).max() < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def _counts_at(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray,
               threshold: float) -> tuple[float, float, float]:
    """``(true positives, predicted, positives)``, weighted, calling ``score >= threshold`` a match."""
    called = scores >= threshold
    return float(weights[called & labels].sum()), float(weights[called].sum()), float(weights[labels].sum())


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The score that maximises F1 when every pair at or above it is called a match (the highest
    such score on ties, so fewer pairs are called)."""
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(-np.asarray(scores), kind="stable")
    s, y, w = np.asarray(scores)[order], np.asarray(labels, dtype=bool)[order], w[order]
    tp, called = np.cumsum(w * y), np.cumsum(w)
    last = np.r_[s[1:] != s[:-1], True]  # a threshold takes a whole run of tied scores
    f1 = np.where(last, 2 * tp / (called + tp[-1]), -1.0)
    return float(s[int(np.argmax(f1))])


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


@dataclass(frozen=True)
class MatchCalibration:
    """One direction's calibration, as stored in ``oneencoder.json`` under ``match_calibration``.

    Attributes:
        a, b: ``p(match | cos) = sigmoid(a * cos + b)`` at validation's share of matching pairs.
        threshold: Cosine at or above which a pair is called a match (:data:`RULE`).
        val_precision, val_recall, val_false_positive_rate: Of that call on the validation pairs.
        n_val_pairs, n_val_positives, n_val_queries: What it was fitted on (weighted pair counts).
        stage: The stage whose validation split it was fitted on (None: ``oneencoder calibrate``).
    """

    a: float
    b: float
    threshold: float
    val_precision: float
    val_recall: float
    val_false_positive_rate: float
    n_val_pairs: int
    n_val_positives: int
    n_val_queries: int
    stage: str | None = None
    rule: str = RULE

    @classmethod
    def fit(cls, scores: np.ndarray, labels: np.ndarray, weights: np.ndarray, n_queries: int,
            stage: str | None = None) -> "MatchCalibration":
        """Platt scaling and the F1 threshold on validation pairs (see the module docstring)."""
        a, b = fit_platt(scores, labels, weights)
        threshold = best_f1_threshold(scores, labels, weights)
        tp, called, positives = _counts_at(scores, labels, weights, threshold)
        total = float(weights.sum())
        return cls(a, b, threshold, tp / called, tp / positives, (called - tp) / (total - positives),
                   int(round(total)), int(round(positives)), int(n_queries), stage)

    @classmethod
    def from_dict(cls, data: Any) -> "MatchCalibration | None":
        """The stored form back, or None when it is not one (an edited or older file)."""
        numbers = ("a", "b", "threshold", "val_precision", "val_recall", "val_false_positive_rate")
        counts = ("n_val_pairs", "n_val_positives", "n_val_queries")
        if not isinstance(data, dict) or not all(
                isinstance(data.get(k), (int, float)) and not isinstance(data.get(k), bool) and math.isfinite(data[k])
                for k in numbers) or not all(isinstance(data.get(k), int) and data[k] > 0 for k in counts):
            return None
        return cls(*(float(data[k]) for k in numbers), *(data[k] for k in counts), data.get("stage"),
                   str(data.get("rule", RULE)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def val_base_rate(self) -> float:
        """Share of validation pairs that match (about 1 / gallery size)."""
        return self.n_val_positives / self.n_val_pairs

    def gallery_base_rate(self, n_gallery: int) -> float:
        """Share of matching pairs expected in a gallery of ``n_gallery`` items, if each query has as
        many matches in it as in validation."""
        return min(1.0, self.n_val_positives / self.n_val_queries / max(1, n_gallery))

    def probability(self, cosines: Any, base_rate: float | None = None) -> np.ndarray:
        """Calibrated ``p(match)`` of each cosine (float64 array, same shape).

        Args:
            base_rate: Share of matching pairs where the cosines come from (e.g.
                :meth:`gallery_base_rate` of an index); the odds move by its ratio to
                validation's (a bigger gallery makes any one item less likely to be the match).
                None: validation's.
        """
        shift = 0.0 if base_rate is None else _logit(base_rate) - _logit(self.val_base_rate)
        z = self.a * np.asarray(cosines, dtype=np.float64) + self.b + shift
        return np.exp(-np.logaddexp(0.0, -z))  # sigmoid without overflow

    def in_gallery(self, n_gallery: int) -> Callable[[Any], np.ndarray]:
        """:meth:`probability` of cosines against a gallery (an index) of ``n_gallery`` items."""
        rate = self.gallery_base_rate(n_gallery)
        return lambda cosines: self.probability(cosines, rate)

    def predicted_precision(self, base_rate: float) -> float:
        """Precision of the threshold that validation predicts where ``base_rate`` of the pairs
        match: validation's recall and false-positive rate at that share of matches."""
        hits, false = self.val_recall * base_rate, self.val_false_positive_rate * (1 - base_rate)
        return hits / (hits + false) if hits + false > 0 else 0.0

    def report(self, scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> dict[str, Any]:
        """This calibration and how its threshold does on other pairs (e.g. the test split):
        ``precision`` (None if no pair reaches the threshold) beside ``predicted_precision``,
        what validation predicts for pairs with this split's share of matches."""
        tp, called, positives = _counts_at(scores, labels, weights, self.threshold)
        total = float(weights.sum())
        return {**self.to_dict(), "predicted_precision": self.predicted_precision(positives / total),
                "precision": tp / called if called else None, "recall": tp / positives if positives else None,
                "n_pairs": int(round(total)), "n_positives": int(round(positives)), "n_called": int(round(called))}


def stored_calibration(meta: dict[str, Any], query: str, gallery: str) -> MatchCalibration | None:
    """The calibration a model stores for ``query → gallery`` (None: none, or not readable)."""
    stored = meta.get(MATCH_CALIBRATION)
    return MatchCalibration.from_dict(stored.get(f"{query}→{gallery}")) if isinstance(stored, dict) else None


def stored_calibrations(meta: dict[str, Any]) -> dict[str, MatchCalibration]:
    """Every readable calibration a model stores, by direction."""
    stored = meta.get(MATCH_CALIBRATION)
    if not isinstance(stored, dict):
        return {}
    found = {d: MatchCalibration.from_dict(c) for d, c in stored.items()}
    return {d: c for d, c in found.items() if c is not None}


def format_gap_table(directions: dict[str, dict[str, Any]]) -> str:
    """The modality gap and match threshold of each direction, as a plain-text table.

    Columns: the distance between the centres of query and gallery embeddings, the mean cosine
    of matching and of non-matching pairs, the match threshold fitted on validation, and the
    precision of that threshold here with validation's prediction for it in brackets
    (:meth:`MatchCalibration.predicted_precision` at this split's share of matching pairs).
    """
    header = ["direction", "centre dist", "pos cos", "neg cos", "match threshold", "precision (predicted)"]
    body = []
    for direction, result in directions.items():
        gap, cal = result.get("gap", {}), result.get("calibration")
        cells = [direction, *(format_number(gap[k], signed=k != "centroid_distance") if k in gap else "-"
                              for k in ("centroid_distance", "mean_pos_cos", "mean_neg_cos"))]
        if cal:
            here = "-" if cal.get("precision") is None else format_number(cal["precision"])
            cells += [format_number(cal["threshold"], signed=True),
                      f"{here} ({format_number(cal['predicted_precision'])})"]
        else:
            cells += ["none stored", "-"]
        body.append(cells)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))]).rstrip()
             for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
