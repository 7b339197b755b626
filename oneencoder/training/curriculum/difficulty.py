"""Difficulty of every cached pair, computed once and stored next to the feature cache.

``compute_difficulty`` reads the feature caches (pooled frozen features and the
measurements each modality stored at build time), runs the requested scorers
and returns a :class:`DifficultyTable`: one row per pair, one column per scorer,
with the raw measurements kept so reports can explain why a pair is hard.

Example:
    >>> table = compute_difficulty(records, "cache", modalities, list_scorers())
    >>> table.save(difficulty_path("cache", ("image", "text")))
    >>> easy_first = np.argsort(table.combined({"text_nouns": 1.0, "cross_modal_density": 2.0}))
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from ...progress import progress_bar

from ...errors import ConfigError, OneEncoderError
from ...features.cache import FeatureCache, cache_dir_for
from ...fileio import write_json_atomic
from ...modality import Modality
from .scorers import ScoringContext, create_scorer, rank_normalise

FORMAT = "oneencoder-difficulty/1"


@dataclass(eq=False)
class DifficultyTable:
    """Per-pair difficulty: row ``i`` of every array belongs to ``ids[i]``.

    Attributes:
        ids: Sample ids, in row order.
        scores: Scorer name -> ``[N]`` scores (higher = harder).
        measurements: Scorer name -> measurement name -> ``[N]`` raw values.
        meta: Provenance, e.g. the modality fingerprints the features came from.
    """

    ids: list[str]
    scores: dict[str, np.ndarray]
    measurements: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    _ranks: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.ids)
        self.meta = json.loads(json.dumps(self.meta))  # JSON-shaped, so save/load round-trips exactly
        self.scores = {k: np.asarray(v, dtype=np.float64) for k, v in self.scores.items()}
        self.measurements = {s: {k: np.asarray(v, dtype=np.float64) for k, v in m.items()}
                             for s, m in self.measurements.items()}
        for name, arr in [*self.scores.items(),
                          *((f"{s}/{k}", v) for s, m in self.measurements.items() for k, v in m.items())]:
            if arr.shape != (n,):
                raise ValueError(f"difficulty {name!r} has shape {arr.shape}; expected ({n},) for {n} ids")

    def __len__(self) -> int:
        return len(self.ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DifficultyTable):
            return NotImplemented
        return (self.ids == other.ids and self.meta == other.meta and _same(self.scores, other.scores)
                and self.measurements.keys() == other.measurements.keys()
                and all(_same(m, other.measurements[s]) for s, m in self.measurements.items()))

    @property
    def scorers(self) -> list[str]:
        return list(self.scores)

    def ranks(self, scorer: str) -> np.ndarray:
        """``[N]`` percentile ranks in [0, 1] of one scorer's scores (computed once)."""
        self._check_scorers([scorer])
        if scorer not in self._ranks:
            self._ranks[scorer] = rank_normalise(self.scores[scorer])
        return self._ranks[scorer]

    def combined(self, weights: dict[str, float]) -> np.ndarray:
        """Weighted average of the scorers' percentile ranks: ``[N]`` in [0, 1], higher = harder.

        Ranks, not raw scores, so scorers on different scales (noun counts,
        cosine similarities) mix fairly.

        Raises:
            ConfigError: A weight names a scorer the table lacks, is negative, or all are zero.
        """
        if not weights:
            raise ConfigError(f"difficulty weights are empty; give a weight to some of: {', '.join(self.scorers)}")
        self._check_scorers(list(weights))
        bad = {k: w for k, w in weights.items() if not (float(w) >= 0 and math.isfinite(float(w)))}
        if bad:
            raise ConfigError(f"difficulty weights must be finite and >= 0; got {bad}")
        total = sum(float(w) for w in weights.values())
        if total <= 0:
            raise ConfigError(f"difficulty weights {dict(weights)} sum to 0; give at least one a positive weight")
        return sum(float(w) * self.ranks(name) for name, w in weights.items()) / total

    def _check_scorers(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self.scores:
                raise ConfigError(f"difficulty scorer {name!r} is not in this difficulty table; "
                                  f"it has: {', '.join(self.scorers) or 'none'}")

    def explain(self, i: int) -> dict[str, Any]:
        """Everything known about sample ``i``, as one flat row for reports and tables.

        Returns:
            ``{"id": ..., "<scorer>": score, "<scorer>.rank": percentile in [0, 1],
            "<scorer>.<measurement>": raw value, ...}``; unknown (NaN) values are None.
        """
        row: dict[str, Any] = {"id": self.ids[i]}
        for name, score in self.scores.items():
            row[name] = _py(score[i])
            row[f"{name}.rank"] = _py(self.ranks(name)[i])
            for key, values in self.measurements.get(name, {}).items():
                row[f"{name}.{key}"] = _py(values[i])
        return row

    def select(self, ids: list[str]) -> "DifficultyTable":
        """The rows of ``ids``, in that order (e.g. a split's training pairs).

        Raises:
            OneEncoderError: Some ids have no row (the table is older than the cache).
        """
        where = {sid: i for i, sid in enumerate(self.ids)}
        missing = [sid for sid in ids if sid not in where]
        if missing:
            raise OneEncoderError(f"{len(missing)} sample(s) have no difficulty row, e.g. {missing[0]!r}; "
                                  "recompute the difficulty table")
        idx = np.array([where[sid] for sid in ids], dtype=np.int64)
        return DifficultyTable(list(ids), {k: v[idx] for k, v in self.scores.items()},
                               {s: {k: v[idx] for k, v in m.items()} for s, m in self.measurements.items()},
                               dict(self.meta))

    # ----- files ------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the table as JSON, atomically (NaN is stored as null)."""
        write_json_atomic(path, {
            "format": FORMAT,
            "ids": list(self.ids),
            "scores": {k: _to_json(v) for k, v in self.scores.items()},
            "measurements": {s: {k: _to_json(v) for k, v in m.items()} for s, m in self.measurements.items()},
            "meta": self.meta,
        })

    @classmethod
    def load(cls, path: str | Path) -> "DifficultyTable":
        """Read a table written by :meth:`save`.

        Raises:
            OneEncoderError: The file is missing, not JSON, or not a difficulty table.
        """
        path = Path(path)
        if not path.is_file():
            raise OneEncoderError(f"no difficulty table at {path}; compute it with `compute_difficulty`")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OneEncoderError(f"{path}: not valid JSON ({e}); delete it to recompute") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise OneEncoderError(f"{path}: not a difficulty table ({FORMAT}); delete it to recompute")
        try:
            return cls(list(raw["ids"]), {k: _from_json(v) for k, v in raw["scores"].items()},
                       {s: {k: _from_json(v) for k, v in m.items()} for s, m in raw.get("measurements", {}).items()},
                       raw.get("meta", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise OneEncoderError(f"{path}: malformed difficulty table ({e}); delete it to recompute") from None


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def _py(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _to_json(arr: np.ndarray) -> list[float | None]:
    return [_py(x) for x in arr]


def _from_json(values: list[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


# ----- computing ----------------------------------------------------------------------------


def difficulty_path(cache_root: str | Path, pair: tuple[str, str]) -> Path:
    """Where a pair's difficulty table lives: next to its feature caches."""
    a, b = pair
    return Path(cache_root) / f"difficulty-{a}-{b}.json"


def pooled_features(cache: FeatureCache, ids: list[str], chunk: int = 1024) -> np.ndarray:
    """``[N, D]`` float32 mean over each sample's cached (valid) tokens."""
    out = np.empty((len(ids), cache.dim), dtype=np.float32)
    for start in range(0, len(ids), chunk):
        for j, tokens in enumerate(cache.get_many(ids[start : start + chunk])):
            out[start + j] = tokens.float().mean(dim=0).numpy()
    return out


def language_vectors(cache: FeatureCache, ids: list[str], language_slice: tuple[int, int],
                     chunk: int = 1024) -> np.ndarray:
    """``[N, W]`` float32 sentence-space part (``Modality.language_slice``) of each sample's first token."""
    start_dim, end_dim = language_slice
    out = np.empty((len(ids), end_dim - start_dim), dtype=np.float32)
    for start in range(0, len(ids), chunk):
        for j, tokens in enumerate(cache.get_many(ids[start : start + chunk])):
            out[start + j] = tokens[0, start_dim:end_dim].float().numpy()
    return out


def compute_difficulty(
    records: list[dict],
    cache_root: str | Path,
    modalities: dict[str, Modality],
    scorers: list[str],
    progress: bool = True,
    options: dict[str, dict[str, Any]] | None = None,
    corpus: list[str] | None = None,
    required: set[str] | None = None,
) -> DifficultyTable:
    """Score every record that is cached for all ``modalities``.

    Records missing from any cache (rejected or not yet built) are left out, the
    same rule as ``stage.load_pair_split``.

    Args:
        records: Manifest rows, e.g. one split's.
        cache_root: Root of the feature caches (one directory per modality).
        modalities: The stage's modalities; their fingerprints must match the caches.
        scorers: Registered scorer names (see ``list_scorers``).
        progress: Show a progress bar over the scorers.
        options: Scorer name -> options, e.g. ``{"cross_modal_density": {"k": 5}}``.
        corpus: Captions for word statistics (default: the scored records' captions).
        required: Scorers that must apply; others that do not fit these modalities (e.g. an
            image scorer on an audio-text stage) are left out. Default: all of ``scorers``.

    Returns:
        The table, with the modality fingerprints in ``meta``.
    """
    if not scorers:
        raise ConfigError("no difficulty scorers given")
    options = options or {}
    extra = set(options) - set(scorers)
    if extra:
        raise ConfigError(f"difficulty options given for scorer(s) not in use: {sorted(extra)}")
    instances = {name: create_scorer(name, **options.get(name, {})) for name in scorers}  # fail fast
    ctx = _load_context(records, cache_root, modalities)
    ctx.corpus = corpus
    if not ctx.records:
        raise OneEncoderError(f"none of {len(records)} records is cached for all of {sorted(modalities)} "
                              f"under {cache_root}; run `oneencoder cache build`")
    scores, measurements = {}, {}
    required = set(scorers) if required is None else set(required)
    for name, scorer in progress_bar(instances.items(), desc="difficulty", unit="scorer", enabled=progress):
        try:
            result = scorer(ctx)
        except ConfigError:
            if name in required:
                raise
            continue  # does not apply to these modalities
        scores[name] = result.score
        measurements[name] = result.measurements
    ids = [r["id"] for r in ctx.records]
    meta = {"fingerprints": {n: m.fingerprint() for n, m in modalities.items()}, "n_records": len(records)}
    return DifficultyTable(ids, scores, measurements, meta)


def _load_context(records: list[dict], cache_root: str | Path, modalities: dict[str, Modality]) -> ScoringContext:
    caches: dict[str, FeatureCache] = {}
    try:
        for n, m in modalities.items():  # one by one, so a refused cache closes the ones before it
            caches[n] = FeatureCache(cache_dir_for(cache_root, n), m.fingerprint(), readonly=True)
        rows = list(records)
        for cache in caches.values():
            have = cache.ids()
            rows = [r for r in rows if r["id"] in have]
        ids = [r["id"] for r in rows]
        features = {n: pooled_features(c, ids) for n, c in caches.items()}
        measurements = {n: c.measurements(ids) for n, c in caches.items()}
        slices = {n: modalities[n].language_slice() for n in caches}
        language = {n: language_vectors(c, ids, slices[n]) for n, c in caches.items() if slices[n] is not None}
    finally:
        for cache in caches.values():
            cache.close()
    return ScoringContext(rows, features, measurements, language=language)
