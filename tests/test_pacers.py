"""Pacing functions: windows over the easy→hard order (pure functions, no data)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from oneencoder.errors import ConfigError
from oneencoder.training.curriculum import pacers as pacers_module
from oneencoder.training.curriculum.pacers import Pacer, create_pacer, list_pacers, register_pacer, schedule

BUILTINS = ["anti", "geometric", "linear", "phases", "random", "root", "self_paced", "windows"]
CUMULATIVE = [n for n in BUILTINS if n != "windows"]
T = 501


def test_every_builtin_is_registered() -> None:
    assert set(BUILTINS) <= set(list_pacers())


@pytest.mark.parametrize("name", BUILTINS)
def test_schedule_is_a_valid_window_that_ends_with_everything(name: str) -> None:
    pacer = create_pacer(name)
    sched = schedule(pacer, T)
    assert sched.shape == (T, 2) and sched.dtype == np.float64
    lo, hi = sched[:, 0], sched[:, 1]
    assert ((0 <= lo) & (lo < hi) & (hi <= 1)).all()
    assert pacer(1.0) == (0.0, 1.0)  # every sample available by the end
    assert pacer(pacer.full_at) == (0.0, 1.0)  # ... already from full_at on
    assert (sched[-1] == [0.0, 1.0]).all()
    # Progress outside [0, 1] is clamped, never extrapolated.
    assert pacer(-3.0) == pacer(0.0) and pacer(7.0) == pacer(1.0)


@pytest.mark.parametrize("name", CUMULATIVE)
def test_cumulative_pacers_only_grow(name: str) -> None:
    pacer = create_pacer(name)
    assert pacer.cumulative
    sched = schedule(pacer, T)
    assert (sched[:, 0] == 0).all()
    assert (np.diff(sched[:, 1]) >= 0).all()


@pytest.mark.parametrize("name", ["linear", "root", "geometric", "phases", "self_paced", "anti"])
def test_competence_starts_at_start_and_is_full_at_full_at(name: str) -> None:
    pacer = create_pacer(name, start=0.25, full_at=0.5)  # 0.25: a whole block for `phases`
    assert pacer(0.0)[1] == pytest.approx(0.25)
    assert pacer(0.49)[1] < 1.0
    assert pacer(0.5) == (0.0, 1.0)


def test_linear_root_and_geometric_follow_their_formulas() -> None:
    c0, full = 0.1, 0.8
    lin, root, geo = (create_pacer(n, start=c0, full_at=full) for n in ("linear", "root", "geometric"))
    for t in np.linspace(0, 0.79, 9):
        p = t / full
        assert lin(t)[1] == pytest.approx(c0 + (1 - c0) * p)
        assert root(t)[1] == pytest.approx(math.sqrt(p * (1 - c0**2) + c0**2))  # Platanios et al. 2019
        assert geo(t)[1] == pytest.approx(c0 ** (1 - p))
    # Geometric: a constant growth factor per equal step of progress.
    ratios = [geo(t + 0.1)[1] / geo(t)[1] for t in (0.0, 0.2, 0.4, 0.6)]
    assert np.allclose(ratios, ratios[0])
    # Root front-loads: it is ahead of linear everywhere inside the pacing phase.
    assert all(root(t)[1] > lin(t)[1] for t in np.linspace(0.05, 0.75, 8))


def test_phases_add_one_quartile_at_a_time() -> None:
    pacer = create_pacer("phases")  # blocks=4, start=0.25, full_at=0.8
    sched = schedule(pacer, 1001)
    levels = sorted(set(sched[:, 1]))
    assert levels == [0.25, 0.5, 0.75, 1.0]
    # Each partial phase lasts a third of [0, full_at); the last block arrives at full_at.
    for k, level in enumerate(levels[:-1]):
        share = float((sched[:, 1] == level).mean())
        assert share == pytest.approx(0.8 / 3, abs=0.01), (k, share)
    assert pacer(0.7999)[1] == 0.75 and pacer(0.8)[1] == 1.0
    assert create_pacer("phases", blocks=3, start=0.34)(0.0)[1] == pytest.approx(1 / 3)
    assert create_pacer("phases", blocks=8, start=0.5)(0.0)[1] == 0.5


def test_windows_slide_with_overlap_and_cover_everything() -> None:
    pacer = create_pacer("windows", width=0.5, full_at=0.8)
    assert not pacer.cumulative
    sched = schedule(pacer, T)
    sliding = sched[np.arange(T) / (T - 1) < 0.8]
    assert np.allclose(sliding[:, 1] - sliding[:, 0], 0.5)  # a window of fixed width ...
    assert (np.diff(sliding[:, 0]) >= 0).all()  # ... moving from easy to hard
    assert sliding[0, 0] == 0.0 and sliding[-1, 1] > 0.99
    assert (sliding[1:, 0] < sliding[:-1, 1]).all()  # consecutive windows overlap
    # The union of the sliding windows alone already covers [0, 1] (to the grid's resolution).
    grid = np.linspace(0, 0.995, 200)
    assert all(((sliding[:, 0] <= x) & (x < sliding[:, 1])).any() for x in grid)
    assert pacer(0.8) == (0.0, 1.0)


def test_orders_of_the_special_pacers() -> None:
    assert create_pacer("random").order == "none"
    assert (schedule(create_pacer("random"), 20) == [0.0, 1.0]).all()
    anti, linear = create_pacer("anti"), create_pacer("linear")
    assert anti.order == "reverse" and linear.order == "static"
    assert (schedule(anti, 50) == schedule(linear, 50)).all()  # same competence, reversed order
    selfp = create_pacer("self_paced")
    assert selfp.order == "online" and (schedule(selfp, 50) == schedule(linear, 50)).all()


def test_schedule_of_one_step_and_of_two() -> None:
    pacer = create_pacer("linear")
    assert schedule(pacer, 1).tolist() == [[0.0, 0.25]]
    assert schedule(pacer, 2).tolist() == [[0.0, 0.25], [0.0, 1.0]]
    assert schedule(pacer, 0).shape == (0, 2)


def test_bad_names_and_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown pacer 'nope'.*linear"):
        create_pacer("nope")
    with pytest.raises(ConfigError, match="unknown option.*'widht'"):
        create_pacer("windows", widht=0.3)
    with pytest.raises(ConfigError, match="blocks"):
        create_pacer("linear", blocks=4)  # an option of another pacer
    for bad in ({"start": 0.0}, {"start": 1.5}, {"full_at": 0.0}, {"full_at": 1.2}):
        with pytest.raises(ConfigError):
            create_pacer("root", **bad)
    with pytest.raises(ConfigError, match="width"):
        create_pacer("windows", width=0.0)
    with pytest.raises(ConfigError, match="blocks"):
        create_pacer("phases", blocks=0)


def test_register_a_custom_pacer() -> None:
    @register_pacer
    class Step(Pacer):
        name = "test_step"

        def window(self, t: float) -> tuple[float, float]:
            return 0.0, self.start if t < self.full_at else 1.0

    try:
        assert "test_step" in list_pacers()
        assert create_pacer("test_step", start=0.5)(0.1) == (0.0, 0.5)
        with pytest.raises(ValueError, match="already registered"):
            register_pacer(type("Other", (Pacer,), {"name": "test_step"}))
        with pytest.raises(ValueError, match="order"):
            register_pacer(type("Bad", (Pacer,), {"name": "test_bad", "order": "sideways"}))
    finally:
        pacers_module.PACERS.unregister("test_step")
