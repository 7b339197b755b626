"""The data phase of a stage: its modalities, its aligned pairs as feature banks, their difficulty.

A stage's modalities are resolved once, here: the trainable side from the stage
file, and for an add-modality stage the frozen anchor exactly as the model holds it
(same options, same backbone), so caches, difficulty and training all agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, OneEncoderError
from ..features.bank import FeatureBank, load_banks
from ..features.cache import FeatureCache, cache_dir_for
from ..features.views import ViewedBank, load_viewed_bank, offers_views
from ..modality import Modality, create_stage_modalities
from ..model.checkpoint import META, modality_from_meta, read_meta
from .config import StageConfig
from .curriculum.difficulty import DifficultyTable, compute_difficulty, difficulty_path
from .curriculum.samplers import mine_neighbours
from .curriculum.scorers import list_scorers
from .plan import CurriculumPlan


@dataclass
class PairSplit:
    """Aligned samples of one split: row i of both banks is one pair."""

    ids: list[str]
    groups: list[str]
    banks: dict[str, FeatureBank | ViewedBank]

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's augmented view of every sample (banks without views ignore it)."""
        for bank in self.banks.values():
            if isinstance(bank, ViewedBank):
                bank.set_epoch(epoch)

    @property
    def group_codes(self) -> torch.Tensor:
        codes = {g: i for i, g in enumerate(dict.fromkeys(self.groups))}
        return torch.tensor([codes[g] for g in self.groups])


def locked_anchor(config: StageConfig) -> str | None:
    """The already-trained side of an add-modality stage (None when the projection trains)."""
    if "projection" in config.trainable:
        return None
    frozen = [n for n in config.modalities if n not in config.trainable]
    return frozen[0] if len(frozen) == 1 else None


def model_modalities(model_dir: str | Path, records: list[dict], exclude: set[str]) -> dict[str, Modality]:
    """Modalities the model already holds whose inputs the manifest has (for anchors and emergent pairs)."""
    meta = read_meta(model_dir)
    return {n: modality_from_meta(n, info) for n, info in meta["modalities"].items()
            if n not in exclude and any(r.get(info["record_key"]) for r in records)}


def stage_modalities(config: StageConfig, model_dir: str | Path | None = None,
                     records: list[dict] | None = None) -> dict[str, Modality]:
    """The stage's two modalities, in the stage's order, each created once.

    For an add-modality stage (``model_dir`` given) the frozen anchor is the model's own:
    the stage file's options for it are ignored, since the anchor is already trained.
    """
    modalities = create_stage_modalities(config.modality_options, config.modalities)
    anchor = locked_anchor(config)
    if anchor is not None and model_dir is not None and (Path(model_dir) / META).exists():
        meta = read_meta(model_dir)
        if anchor in meta["modalities"]:
            modalities[anchor] = modality_from_meta(anchor, meta["modalities"][anchor])
            for name, modality in modalities.items():  # bound again, to the anchor the model holds
                if name != anchor:
                    modality.bind(modalities)
    return modalities


def viewed_modalities(config: StageConfig, modalities: dict[str, Modality]) -> list[str]:
    """The stage's modalities that train on augmented views: ``[data] views > 1``, not the frozen
    anchor (embedded once), offering views (``Modality.view_recipe``) and, when ``[data]
    view_modalities`` names some, named there.

    Raises:
        ConfigError: ``view_modalities`` names a modality that cannot have views in this stage.
    """
    if config.data.views <= 1:
        return []
    anchor = locked_anchor(config)
    able = [n for n, m in modalities.items() if n != anchor and offers_views(m)]
    wanted = config.data.view_modalities
    for name in wanted:
        if name not in able:
            raise ConfigError(f"[data] view_modalities: {name!r} cannot train on views in this stage (those that "
                              f"can: {', '.join(able) or 'none'})")
    return [n for n in able if not wanted or n in wanted]


def load_pair_split(records: list[dict], split: str, modalities: dict[str, Modality], cache_root: str | Path,
                    device: torch.device | str = "cpu", bank: str = "memory",
                    views: tuple[list[str], int, int] | None = None) -> PairSplit:
    """Samples of ``split`` that are cached (not rejected) for every modality, as banks.

    ``bank``: ``memory``, ``disk`` (a memory map exported beside the cache) or ``auto``
    (disk when the banks would not fit in memory), as ``[train] bank``; see :mod:`oneencoder.features.bank`.
    ``views``: ``(modalities, K, seed)``: those modalities' banks hold K augmented views
    (:class:`ViewedBank`, in memory).
    """
    rows = [r for r in records if r.get("split") == split]
    caches = {n: FeatureCache(cache_dir_for(cache_root, n), m.fingerprint(), readonly=True) for n, m in modalities.items()}
    try:
        for cache in caches.values():
            have = cache.ids()
            rows = [r for r in rows if r["id"] in have]
        ids = [r["id"] for r in rows]
        viewed, count, seed = views if views is not None else ([], 1, 0)
        plain = {n: c for n, c in caches.items() if n not in viewed}
        banks = load_banks(plain, ids, bank, device) if ids and plain else {}
    finally:
        for cache in caches.values():
            cache.close()
    if ids:
        for n in viewed:
            banks[n] = load_viewed_bank(modalities[n], cache_root, ids, count, seed, device)
        banks = {n: banks[n] for n in modalities}  # the stage's order
    return PairSplit(ids, [r.get("group", r["id"]) for r in rows], banks)


def shortfall(records: list[dict], modalities: dict[str, Modality], split: PairSplit, name: str) -> str:
    """Why a split has too few cached pairs, in words: which split, which field, which cache."""
    rows = [r for r in records if r.get("split") == name]
    if not rows:
        splits = sorted({r.get("split") for r in records})
        return (f"the manifest has no {name!r} rows (its splits: {', '.join(splits)}); assign splits, e.g. with "
                "`oneencoder data import ... --val 0.1 --test 0.2`")
    for n, m in modalities.items():
        key = m.spec.record_key
        with_field = [r for r in rows if r.get(key) not in (None, "")]
        if not with_field:
            return f"none of the {len(rows)} {name!r} rows has a {key!r} field ({n})"
    return (f"{len(rows)} {name!r} rows, {len(split.ids)} of them cached for both {' and '.join(modalities)}; "
            "run `oneencoder cache build` for this stage and manifest, and see its rejects files")


def _aligned(values: np.ndarray, table: DifficultyTable, ids: list[str]) -> torch.Tensor:
    """``values`` (one per table row) in the order of ``ids``."""
    where = {sid: i for i, sid in enumerate(table.ids)}
    return torch.tensor([float(values[where[sid]]) for sid in ids], dtype=torch.float32)


def stage_difficulty(config: StageConfig, records: list[dict], modalities: dict[str, Modality] | None = None,
                     scorers: list[str] | None = None, force: bool = False,
                     plan: CurriculumPlan | None = None) -> tuple[DifficultyTable, Path]:
    """Difficulty scores of the stage's training pairs, computed once and stored next to the cache.

    Every registered scorer that applies to the stage's modalities is computed (for
    reports); those the stage needs (``plan.required_scorers``; the plan is resolved from
    ``config`` if not given), or ``scorers`` names, must apply. A stored table is reused
    when it covers the same pairs and every needed scorer.
    """
    modalities = modalities or stage_modalities(config)
    path = difficulty_path(config.data.cache_dir, tuple(config.modalities))
    plan = plan or CurriculumPlan.from_config(config)
    required = set(plan.required_scorers) | set(scorers or [])
    train = [r for r in records if r.get("split") == "train"]
    if path.exists() and not force:
        table = DifficultyTable.load(path)
        cached_ids = set(load_pair_split(records, "train", modalities, config.data.cache_dir).ids)
        same_features = table.meta.get("fingerprints") == {n: m.fingerprint() for n, m in modalities.items()}
        if same_features and set(table.ids) == cached_ids and all(s in table.scores for s in required):
            return table, path
    table = compute_difficulty(train, config.data.cache_dir, modalities, scorers or list_scorers(), required=required)
    table.save(path)
    return table, path


def train_difficulty(config: StageConfig, table: DifficultyTable, train: PairSplit) -> torch.Tensor:
    """``[N]`` combined difficulty in [0, 1] of the training pairs (``stage_difficulty``'s table), in the split's order."""
    return _aligned(table.combined(config.curriculum.scorers), table, train.ids)


def train_trust(table: DifficultyTable, train: PairSplit, source: tuple[str, str]) -> torch.Tensor:
    """``[N]`` probability that each training pair is correct, in the split's order.

    Args:
        source: ``(scorer, measurement)`` holding it (``CurriculumPlan.trust``).
    """
    scorer, measurement = source
    return _aligned(table.measurements[scorer][measurement], table, train.ids)


def pooled_frozen(train: PairSplit) -> torch.Tensor:
    """Both modalities' frozen features, mean-pooled and unit-norm, side by side: ``[N, D_a + D_b]``."""
    parts = []
    for bank in train.banks.values():
        tokens, mask = bank.gather(torch.arange(len(bank)))
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        parts.append(torch.nn.functional.normalize(pooled.float().cpu(), dim=-1))
    return torch.cat(parts, dim=1) / len(parts) ** 0.5


def frozen_neighbours(train: PairSplit, k: int) -> torch.Tensor:
    """Near neighbours in both frozen feature spaces (mean of the two cosines), other groups only."""
    return mine_neighbours(pooled_frozen(train), train.group_codes, k)


def require_pairs(records: list[dict], modalities: dict[str, Modality], train: PairSplit, val: PairSplit,
                  manifest: str) -> None:
    """At least two training pairs and one validation pair, or one line saying what is missing."""
    if len(train.ids) < 2:
        raise OneEncoderError(f"{manifest}: need at least 2 cached train pairs; "
                              f"{shortfall(records, modalities, train, 'train')}")
    if len(val.ids) < 1:
        raise OneEncoderError(f"{manifest}: need at least 1 cached val pair; "
                              f"{shortfall(records, modalities, val, 'val')}")
