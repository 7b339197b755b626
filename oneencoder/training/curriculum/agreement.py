"""Is a pair *correct*? Agreement of the two sides in frozen feature spaces, calibrated
against pairs known to be wrong.

Noisy pairs (a caption that belongs to another image, a template title, junk) are
not merely hard: they teach the wrong thing. The ``pair_agreement`` scorer estimates,
for every training pair, how well its two sides agree and the probability that the
pair is correct, without training the model:

* **frozen**: where both modalities bring a vector in the text backbone's sentence space
  (an image's ImageNet label semantics, the caption's sentence embedding), their
  agreement there;
* **probe**: a ridge map from one side's pooled frozen features to the other's,
  *cross-fitted* (each pair is scored by a map fitted on the other folds, so no pair
  grades itself). A wrong caption carries no signal the map could learn, so it only
  adds variance; the map keeps pointing the right way even at 50 % noise.

Agreement is CSLS (Lample et al., 2018): ``2·cos(a_i, b_i) - r(a_i) - r(b_i)``, with ``r``
the mean cosine to the ``k`` nearest items of the other side, so a hub that is close to
everything does not look like a match. The same statistic on deliberately mismatched
pairs ``(a_i, b_j)`` is a *null* sample: what a wrong pair looks like on this data. From
the two, Efron's two-group model gives each pair's local false discovery rate; its
complement is ``clean_probability``. Everything is label-free: the corruption markers
the noise tools write are never read.

Example:
    >>> result = create_scorer("pair_agreement")(ctx)
    >>> result.measurements["clean_probability"]       # [N] in [0, 1]
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import ConfigError
from .scorers import Scorer, ScorerResult, ScoringContext, register_scorer

_RIDGE_GRID = (0.2, 2.0, 20.0, 200.0)  # penalty per training sample (features standardised)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _top_mean(sim: np.ndarray, k: int) -> np.ndarray:
    """Mean of each row's ``k`` largest values."""
    k = max(1, min(k, sim.shape[1]))
    return np.partition(sim, sim.shape[1] - k, axis=1)[:, sim.shape[1] - k :].mean(1)


def csls(a: np.ndarray, b: np.ndarray, k: int = 10, reference: int = 4096, null_draws: int = 2,
         seed: int = 0, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """CSLS agreement of pairs ``(a_i, b_i)`` and of mismatched pairs ``(a_i, b_j)``, ``j != i``.

    Args:
        a, b: ``[N, D]`` vectors of the two sides (row i of each is a pair; cosine, so scale is free).
        k: Neighbours behind each item's hubness ``r``.
        reference: Items of the other side ``r`` is measured against (a seeded subset when
            N is larger, so the cost grows as N·reference, not N²).
        null_draws: Mismatched partners per item in the null sample.
        seed: Seed of the reference subset and the mismatched partners.
        block: Rows per similarity block.

    Returns:
        ``(observed [N], null [N · null_draws])``.
    """
    a, b = _unit(a), _unit(b)
    n = a.shape[0]
    if n < 2:
        raise ConfigError(f"agreement needs at least 2 pairs, got {n}")
    rng = np.random.default_rng(seed)
    ref = np.arange(n) if n <= reference else np.sort(rng.choice(n, reference, replace=False))
    r_a = np.concatenate([_top_mean(a[s : s + block] @ b[ref].T, k) for s in range(0, n, block)])
    r_b = np.concatenate([_top_mean(b[s : s + block] @ a[ref].T, k) for s in range(0, n, block)])
    observed = 2 * np.einsum("ij,ij->i", a, b) - r_a - r_b
    partner = (np.arange(n)[None, :] + rng.integers(1, n, size=(null_draws, n))) % n  # never j == i
    null = np.concatenate([2 * np.einsum("ij,ij->i", a, b[j]) - r_a - r_b[j] for j in partner])
    return observed, null


def cross_fit_probe(x: np.ndarray, y: np.ndarray, folds: int = 5, ridge: float | None = None,
                    seed: int = 0, **csls_options: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Held-out predictions of ``y`` from ``x`` by ridge regression, scored by CSLS.

    ``x`` is standardised per dimension and ``y`` L2-normalised. The penalty is
    ``ridge`` times the number of fitted samples; by default it is chosen from
    ``_RIDGE_GRID`` as the one whose observed agreement stands furthest above its null
    (in null standard deviations): a label-free criterion.

    Returns:
        ``(observed [N], null, penalty per sample)``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = _unit(y)
    n = x.shape[0]
    if n < 2 * folds:
        raise ConfigError(f"the agreement probe needs at least {2 * folds} pairs for {folds} folds, got {n}")
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    fold = np.random.default_rng(seed).permutation(n) % folds
    grid = _RIDGE_GRID if ridge is None else (float(ridge),)
    predicted = {alpha: np.empty_like(y) for alpha in grid}
    gram_all = x.T @ x
    for f in range(folds):  # one Gram matrix per fold, shared by every penalty
        fit, held = fold != f, fold == f
        gram = gram_all - x[held].T @ x[held]
        cross = x[fit].T @ y[fit]
        for alpha in grid:
            predicted[alpha][held] = x[held] @ np.linalg.solve(gram + alpha * fit.sum() * np.eye(x.shape[1]), cross)
    best: tuple[float, np.ndarray, np.ndarray, float] | None = None
    for alpha in grid:
        observed, null = csls(predicted[alpha], y, seed=seed, **csls_options)
        separation = (observed.mean() - null.mean()) / max(null.std(), 1e-12)
        if best is None or separation > best[0]:
            best = (separation, observed, null, alpha)
    assert best is not None
    return best[1], best[2], best[3]


def clean_probability(observed: np.ndarray, null: np.ndarray) -> tuple[np.ndarray, float]:
    """Probability that each pair is correct, from its agreement and a sample of wrong pairs.

    Efron's two-group model: ``f = π0·f0 + (1 - π0)·f1``, with ``f0`` the null density.
    ``π0`` (the share of wrong pairs) is estimated from the mass below the null's median,
    where correct pairs are rare: ``π0 = min(1, 2·P(x <= median0))``. Densities are
    Gaussian kernel estimates (Silverman's bandwidth); the local false discovery rate
    ``π0·f0(x)/f(x)`` is clipped to [0, 1] and fitted non-increasing in ``x`` by isotonic
    regression (more agreement is never more suspect; kernel ratios in the tails are noisy).

    Returns:
        ``(clean probability [N], π0)``.
    """
    observed = np.asarray(observed, dtype=np.float64)
    null = np.asarray(null, dtype=np.float64)
    pi0 = float(min(1.0, 2.0 * np.mean(observed <= np.median(null))))
    lfdr = np.clip(pi0 * _kde(null, observed) / np.maximum(_kde(observed, observed), 1e-300), 0.0, 1.0)
    order = np.argsort(observed, kind="stable")
    lfdr[order] = -_isotonic_increasing(-lfdr[order])  # lowest agreement first: lfdr may only fall
    return 1.0 - lfdr, pi0


def _isotonic_increasing(y: np.ndarray) -> np.ndarray:
    """Least-squares non-decreasing fit of ``y`` (pool adjacent violators)."""
    means, sizes = [], []
    for value in y:
        means.append(float(value))
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:  # merge blocks that violate the order
            size = sizes[-2] + sizes[-1]
            means[-2] = (means[-2] * sizes[-2] + means[-1] * sizes[-1]) / size
            sizes[-2] = size
            means.pop()
            sizes.pop()
    return np.repeat(means, sizes)


def _kde(points: np.ndarray, at: np.ndarray, block: int = 4096) -> np.ndarray:
    """Gaussian kernel density of ``points`` evaluated ``at`` (Silverman's rule of thumb)."""
    h = 1.06 * max(float(points.std()), 1e-12) * len(points) ** -0.2
    if len(points) > 20000:  # the density is smooth; a fixed subsample keeps this O(N)
        points = np.random.default_rng(0).choice(points, 20000, replace=False)
    out = np.concatenate([np.exp(-0.5 * ((at[s : s + block, None] - points[None, :]) / h) ** 2).sum(1)
                          for s in range(0, len(at), block)])
    return out / (len(points) * h * math.sqrt(2 * math.pi))


@register_scorer
class PairAgreement(Scorer):
    """Suspicion that a pair is wrong: low agreement of its two sides (see the module docstring).

    The score is minus the summed agreement (each statistic in standard deviations of
    its null), so the least agreeing pairs are the "hardest" and a pacer over this order
    admits trusted pairs first. Measurements: ``frozen_csls`` (where both sides have a
    sentence-space vector), ``probe_csls``, ``agreement`` and ``clean_probability``,
    which the ``trust`` weighting uses as per-pair loss weights.

    Options:
        use: Statistics to combine, of ``("frozen", "probe")``; those that do not apply
            (no sentence-space vectors) are skipped unless they are the only ones.
        k: Neighbours of the CSLS hubness correction.
        folds: Cross-fitting folds of the probe.
        ridge: Probe penalty per sample; None = chosen label-free from a grid.
        seed: Seed of folds, reference subsets and mismatched partners.
    """

    name = "pair_agreement"
    provides_trust = "clean_probability"
    default_options = {"use": ("frozen", "probe"), "k": 10, "folds": 5, "ridge": None, "seed": 0}

    def __call__(self, ctx: ScoringContext) -> ScorerResult:
        names = list(ctx.features)
        if len(names) != 2:
            raise ConfigError(f"difficulty scorer {self.name!r} needs the features of exactly two modalities, "
                              f"got {names}")
        use = set(self.options["use"])
        if not use or use - {"frozen", "probe"}:
            raise ConfigError(f"difficulty scorer {self.name!r}: use = {self.options['use']!r}; "
                              "choose from 'frozen' and 'probe'")
        k, seed = int(self.options["k"]), int(self.options["seed"])
        stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if "frozen" in use and all(n in ctx.language for n in names):
            stats["frozen_csls"] = csls(ctx.language[names[0]], ctx.language[names[1]], k=k, seed=seed)
        if "probe" in use:
            a, b = (ctx.feature(n, self.name) for n in names)
            wide, narrow = (a, b) if a.shape[1] >= b.shape[1] else (b, a)  # predict the narrower side
            observed, null, _ = cross_fit_probe(wide, narrow, int(self.options["folds"]), self.options["ridge"],
                                                seed, k=k)
            stats["probe_csls"] = (observed, null)
        if not stats:
            raise ConfigError(f"difficulty scorer {self.name!r}: 'frozen' needs sentence-space vectors on both "
                              f"sides ({names}); add 'probe' to use")
        # In null standard deviations, so the statistics add on one scale; the null of the sum
        # pairs up each statistic's null draws (the same seeded partners).
        z = {s: ((o - nl.mean()) / max(nl.std(), 1e-12), (nl - nl.mean()) / max(nl.std(), 1e-12))
             for s, (o, nl) in stats.items()}
        agreement = sum(o for o, _ in z.values())
        null = sum(nl for _, nl in z.values())
        clean, _ = clean_probability(agreement, null)
        measurements = {s: o for s, (o, _) in stats.items()}
        measurements.update(agreement=agreement, clean_probability=clean)
        return ScorerResult(-agreement, measurements)
