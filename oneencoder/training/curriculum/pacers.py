"""Pacing functions: which slice of the easy→hard order is available at each moment.

A pacer maps training progress ``t ∈ [0, 1]`` to a window ``(lo, hi)`` of difficulty
*quantiles*: with the samples sorted easy→hard, the sampler may draw from positions
``[lo·N, hi·N)``. Cumulative pacers keep ``lo = 0`` and only grow ``hi``. Every pacer
opens the whole set by ``full_at`` (so ``window(1) == (0, 1)``): a curriculum decides
the *order* in which data arrives, never which data is dropped.

``order`` tells the sampler which ranking the window applies to:

* ``"static"``: the precomputed difficulty, easy→hard;
* ``"reverse"``: the same, hard→easy (anti-curriculum);
* ``"online"``: the current per-sample loss tracked during training (self-paced);
* ``"none"``: no ranking at all (the window is always everything).

The order is the pacer's declaration of what it needs, which the training plan reads:
every order but ``"none"`` needs the difficulty table (``"online"`` ranks samples it has
not yet seen by it), and ``"online"`` needs the per-pair losses of each step.

Example:
    >>> pacer = create_pacer("root", start=0.2, full_at=0.8)
    >>> pacer(0.0)
    (0.0, 0.2)
    >>> schedule(pacer, total_steps=100).shape
    (100, 2)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from ...errors import ConfigError
from ...registry import Registry

ORDERS = ("static", "reverse", "online", "none")


class Pacer:
    """Base class: subclasses set ``name`` (and maybe ``order``/``cumulative``) and implement ``window``.

    Args:
        start: Fraction of the (easiest) data available at ``t = 0``.
        full_at: Progress at which every sample is available.
    """

    name: ClassVar[str] = ""
    #: Which ranking the window applies to (see module docstring).
    order: ClassVar[str] = "static"
    #: ``lo`` stays 0 and ``hi`` never shrinks.
    cumulative: ClassVar[bool] = True
    #: Follow from ``order`` (set for every subclass): the difficulty table is read ...
    needs_difficulty: ClassVar[bool] = True
    #: ... and each step's per-pair losses are observed (the trainer reports them).
    needs_per_pair_losses: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Derived, never set by hand, so the declaration cannot contradict the order.
        cls.needs_difficulty = cls.order != "none"
        cls.needs_per_pair_losses = cls.order == "online"

    def __init__(self, start: float = 0.25, full_at: float = 0.8) -> None:
        if not 0.0 < start <= 1.0:
            raise ConfigError(f"pacer {self.name!r}: start = {start} must be in (0, 1]")
        if not 0.0 < full_at <= 1.0:
            raise ConfigError(f"pacer {self.name!r}: full_at = {full_at} must be in (0, 1]")
        self.start = float(start)
        self.full_at = float(full_at)

    def progress(self, t: float) -> float:
        """Fraction of the pacing phase done at ``t``: 0 at the start, 1 from ``full_at`` on."""
        return min(1.0, max(0.0, t) / self.full_at)

    def window(self, t: float) -> tuple[float, float]:
        """``(lo, hi)`` quantiles available at progress ``t`` (already clamped to [0, 1])."""
        raise NotImplementedError

    def __call__(self, t: float) -> tuple[float, float]:
        lo, hi = self.window(min(1.0, max(0.0, float(t))))
        return float(lo), float(hi)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(start={self.start}, full_at={self.full_at})"


def _check_pacer(cls: type) -> None:
    if cls.order not in ORDERS:
        raise ValueError(f"{cls.__qualname__}.order = {cls.order!r}; use one of {ORDERS}")


PACERS: Registry[Pacer] = Registry("pacer", check=_check_pacer)
register_pacer = PACERS.register


def list_pacers() -> list[str]:
    """Names of every registered pacer."""
    return PACERS.names()


def create_pacer(name: str, **options: Any) -> Pacer:
    """Instantiate a registered pacer; unknown names or options raise ``ConfigError``."""
    return PACERS.create(name, **options)


def schedule(pacer: Pacer, total_steps: int) -> np.ndarray:
    """``[total_steps, 2]`` array of ``(lo, hi)`` per step, with ``t = step / (total_steps - 1)``."""
    steps = np.arange(total_steps)
    return np.array([pacer(s / max(1, total_steps - 1)) for s in steps], dtype=np.float64).reshape(-1, 2)


# ----- competence curves ------------------------------------------------------------


class _Competence(Pacer):
    """Cumulative pacer whose window is ``(0, c(t))`` for a competence curve ``c``."""

    def competence(self, p: float) -> float:
        """Competence at pacing progress ``p ∈ [0, 1]``; must give ``start`` at 0 and 1 at 1."""
        raise NotImplementedError

    def window(self, t: float) -> tuple[float, float]:
        p = self.progress(t)
        # p == 1 is pinned to 1 so float round-off can never leave the hardest sample out.
        return 0.0, 1.0 if p >= 1.0 else min(1.0, self.competence(p))


@register_pacer
class LinearPacer(_Competence):
    """Competence grows linearly from ``start`` to 1 at ``full_at``."""

    name = "linear"

    def competence(self, p: float) -> float:
        return self.start + (1.0 - self.start) * p


@register_pacer
class RootPacer(_Competence):
    """Square-root competence (Platanios et al., 2019): ``sqrt(p·(1 - c0²) + c0²)``.

    Grows fast early, when there are few samples and each new one matters most.
    """

    name = "root"

    def competence(self, p: float) -> float:
        return math.sqrt(p * (1.0 - self.start**2) + self.start**2)


@register_pacer
class GeometricPacer(_Competence):
    """Competence multiplies by a constant factor per unit progress: ``c0^(1 - p)``."""

    name = "geometric"

    def competence(self, p: float) -> float:
        return self.start ** (1.0 - p)


@register_pacer
class PhasesPacer(Pacer):
    """Block pacing (baby steps): the data is cut into ``blocks`` difficulty blocks.

    The first phase holds ``round(start · blocks)`` blocks (at least one); each later
    phase adds the next block and keeps the earlier ones. The partial phases share
    ``[0, full_at)`` equally, so the last block arrives exactly at ``full_at``.

    Args:
        blocks: Number of difficulty blocks (4 = quartiles).
    """

    name = "phases"

    def __init__(self, start: float = 0.25, full_at: float = 0.8, blocks: int = 4) -> None:
        super().__init__(start, full_at)
        if blocks < 1:
            raise ConfigError(f"pacer 'phases': blocks = {blocks} must be >= 1")
        self.blocks = int(blocks)
        self.first = min(self.blocks, max(1, round(self.start * self.blocks)))

    def window(self, t: float) -> tuple[float, float]:
        added = self.blocks - self.first  # blocks still to add after the first phase
        if added == 0:
            return 0.0, 1.0
        return 0.0, (self.first + min(added, int(self.progress(t) * added))) / self.blocks


@register_pacer
class WindowsPacer(Pacer):
    """Two stages: a sliding window, then everything.

    Until ``full_at`` a window of ``width`` slides from ``[0, width]`` to
    ``[1 - width, 1]`` (consecutive windows overlap, so the union is [0, 1]);
    from ``full_at`` on the whole set is available. ``start`` is unused (the
    window's size is ``width``).

    Args:
        width: Fraction of the data inside the sliding window.
    """

    name = "windows"
    cumulative = False

    def __init__(self, start: float = 0.25, full_at: float = 0.8, width: float = 0.5) -> None:
        super().__init__(start, full_at)
        if not 0.0 < width <= 1.0:
            raise ConfigError(f"pacer 'windows': width = {width} must be in (0, 1]")
        self.width = float(width)

    def window(self, t: float) -> tuple[float, float]:
        if t >= self.full_at:
            return 0.0, 1.0
        lo = (1.0 - self.width) * self.progress(t)
        return lo, min(1.0, lo + self.width)


@register_pacer
class SelfPacedPacer(LinearPacer):
    """Self-paced threshold: admit the samples whose *current* loss is below a rising quantile.

    The window is ``linear``'s ``(0, c(t))`` but applied to the order of the online
    difficulty (per-sample loss EMA) that the sampler tracks through ``observe``.
    """

    name = "self_paced"
    order = "online"


@register_pacer
class RandomPacer(Pacer):
    """No curriculum: every sample is always available and no order is used."""

    name = "random"
    order = "none"

    def window(self, t: float) -> tuple[float, float]:
        return 0.0, 1.0


@register_pacer
class AntiPacer(LinearPacer):
    """Anti-curriculum: ``linear``'s competence over the hard→easy order."""

    name = "anti"
    order = "reverse"
