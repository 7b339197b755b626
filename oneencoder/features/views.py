"""Augmented views: K cached encodings per sample, one of them drawn per sample per epoch.

View 0 is the plain feature cache (``<root>/<modality>/``), untouched, so evaluation and
every cache built before views existed read exactly what they read before. View ``k >= 1``
is a cache of its own under ``<root>/<modality>.views/<k>/``, built by :func:`build_view`
through :class:`AugmentedView`: the modality's ``load``, then its ``augment`` with a
generator seeded by ``(seed, k, input)``, then its ``preprocess``. The same seed gives the
same views on any machine and in any order. The view's fingerprint adds ``view``, ``view_seed``
and the modality's ``view_recipe()``, so a changed augmentation is refused, never mixed.

Training wraps a split's bank in a :class:`ViewedBank`, which gathers row ``i`` from the
view chosen for it this epoch (:meth:`ViewedBank.set_epoch`, deterministic in the seed).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, OneEncoderError
from ..modality import Modality
from ..names import safe_name
from .bank import FeatureBank
from .cache import BuildReport, FeatureCache, build_cache, cache_dir_for


def offers_views(modality: Modality) -> bool:
    return modality.view_recipe() is not None


def view_root(cache_root: str | Path, modality: str, view: int) -> Path:
    """The cache root of view ``view`` (>= 1): ``<root>/<modality>.views/<view>``."""
    return Path(cache_root) / f"{safe_name(modality, 'modality name')}.views" / str(view)


def view_rng(seed: int, view: int, source: Any) -> random.Random:
    """The generator of one view of one input: a function of the seed, the view and the input only."""
    return random.Random(f"{seed}/{view}/{source}")  # str seeds hash with sha512: same on every run


class AugmentedView:
    """A modality seen through view ``view``: ``prepare`` augments, ``fingerprint`` says how.

    Everything else (backbone, encode, collate, spec) is the modality's own, so a cache
    build of the view is an ordinary build with its resume, rejects and stale checks.
    """

    def __init__(self, modality: Modality, view: int, seed: int) -> None:
        if view < 1:
            raise ValueError("view 0 is the plain cache; augmented views start at 1")
        if not offers_views(modality):
            raise ConfigError(f"modality {modality.spec.name!r} offers no augmented views (no view_recipe)")
        self.modality, self.view, self.seed = modality, view, seed

    def __getattr__(self, name: str) -> Any:
        if name == "modality":  # during unpickling, before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.modality, name)

    def fingerprint(self) -> dict[str, Any]:
        return {**self.modality.fingerprint(), "view": self.view, "view_seed": self.seed,
                "augmentation": self.modality.view_recipe()}

    def prepare(self, source: Any) -> tuple[Any, Any]:
        raw = self.modality.augment(self.modality.load(source), view_rng(self.seed, self.view, source))
        return raw, self.modality.preprocess(raw)


def build_view(modality: Modality, records: list[dict], cache_root: str | Path, view: int, seed: int = 0,
               **build_options: Any) -> BuildReport:
    """Build view ``view`` (>= 1) of ``modality``'s training records: view 0 is :func:`build_cache`'s
    own, and evaluation reads only it. Resumable, as any build; the report is named
    ``<modality> view <k>``."""
    train = [r for r in records if r.get("split") == "train"]
    report = build_cache(AugmentedView(modality, view, seed), train, view_root(cache_root, modality.spec.name, view),
                         **build_options)  # type: ignore[arg-type]
    report.modality = f"{modality.spec.name} view {view}"
    return report


class ViewedBank:
    """A bank of ``K`` views of ``N`` samples; :meth:`gather` reads each row's view of this epoch.

    Rows are stored view-major in one padded bank (row ``k * N + i``). Until :meth:`set_epoch`
    is called every row reads view 0, the plain features.
    """

    def __init__(self, views: FeatureBank, n: int, seed: int) -> None:
        if len(views) % n:
            raise ValueError(f"a bank of {len(views)} rows is not K views of {n} samples")
        self.views, self.n, self.seed = views, n, seed
        self.count = len(views) // n
        self.choice = torch.zeros(n, dtype=torch.long, device=views.data.device)

    def __len__(self) -> int:
        return self.n

    @property
    def dim(self) -> int:
        return self.views.dim

    def set_epoch(self, epoch: int) -> None:
        """Draw each sample's view for ``epoch``: uniform over the K views, the same on every rerun."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        self.choice = torch.randint(self.count, (self.n,), generator=generator).to(self.choice.device)

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = index.to(self.choice.device)
        return self.views.gather(self.choice[index] * self.n + index)


def load_viewed_bank(modality: Modality, cache_root: str | Path, ids: list[str], views: int, seed: int,
                     device: str | torch.device = "cpu") -> ViewedBank:
    """The ``views`` views of ``ids`` as one :class:`ViewedBank` in memory.

    A sample missing from a view's cache (its augmentation was rejected) reads its plain
    features in that view.

    Raises:
        OneEncoderError: A view's cache was never built.
    """
    name = modality.spec.name
    with FeatureCache(cache_dir_for(cache_root, name), modality.fingerprint(), readonly=True) as plain:
        base = plain.get_many(ids)
    tokens = list(base)
    for k in range(1, views):
        path = cache_dir_for(view_root(cache_root, name, k), name)
        if not (path / "data.mdb").exists():
            raise OneEncoderError(f"[data] views = {views}, but view {k} of {name!r} is not cached at {path}; "
                                  f"build it with `oneencoder cache build --views {views}`")
        with FeatureCache(path, AugmentedView(modality, k, seed).fingerprint(), readonly=True) as cache:
            have = cache.ids()
            present = [s for s in ids if s in have]
            found = dict(zip(present, cache.get_many(present)))
        tokens.extend(found.get(sid, base[i]) for i, sid in enumerate(ids))
    return ViewedBank(FeatureBank(tokens, device), len(ids), seed)
