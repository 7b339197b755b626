"""Curriculum batch samplers, hard-negative mining and the online loss predictor (synthetic data)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from oneencoder.errors import ConfigError
from oneencoder.training.config import CurriculumConfig
from oneencoder.training.curriculum.online import LossPredictor
from oneencoder.training.curriculum.pacers import list_pacers
from oneencoder.training.curriculum.samplers import (CurriculumBatchSampler, RandomBatchSampler, build_sampler,
                                                     mine_neighbours)

N, B = 120, 12


def _difficulty(n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(n)


def _groups(n: int = N, size: int = 4) -> torch.Tensor:
    """Many duplicates: every group holds ``size`` samples, scattered over the index range."""
    return torch.from_numpy(np.random.default_rng(1).permutation(n) % (n // size))


def _features(n: int = N, d: int = 8, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def _run(sampler: CurriculumBatchSampler, total: int, start: int = 0, stop: int | None = None,
         loss_of: np.ndarray | None = None) -> list[torch.Tensor]:
    """Draw steps [start, stop) of a ``total``-step run; observe ``loss_of[index]`` if given."""
    out = []
    for step in range(start, total if stop is None else stop):
        index = sampler.batch(step, total)
        if loss_of is not None:
            sampler.observe(index, torch.from_numpy(loss_of[index.numpy()]).float())
        out.append(index)
    return out


# ----- pools, coverage and order ----------------------------------------------------------


@pytest.mark.parametrize("pacer", sorted(list_pacers()))
@pytest.mark.parametrize("mining", [0.0, 0.5])
def test_every_sample_is_drawn_over_a_run(pacer: str, mining: float) -> None:
    groups = _groups()
    neighbours = mine_neighbours(_features(), groups, 6) if mining else None
    difficulty = _difficulty()
    sampler = CurriculumBatchSampler(difficulty, pacer, B, seed=3, groups=groups, hard_negatives=mining,
                                     neighbours=neighbours)
    total = 40 * sampler.steps_per_epoch
    batches = _run(sampler, total, loss_of=difficulty[::-1].copy())
    drawn = torch.cat(batches)
    assert all(len(b) == B and b.dtype == torch.long and len(set(b.tolist())) == B for b in batches)
    assert set(drawn.tolist()) == set(range(N)), f"{pacer}: never drew {set(range(N)) - set(drawn.tolist())}"


def test_steps_per_epoch_and_batch_cap() -> None:
    assert CurriculumBatchSampler(_difficulty(), "linear", 32).steps_per_epoch == N // 32
    small = CurriculumBatchSampler(_difficulty(5), "linear", 32)
    assert small.batch_size == 5 and small.steps_per_epoch == 1
    assert sorted(small.batch(0, 10).tolist()) == list(range(5))


def test_pool_follows_the_window_of_the_easy_to_hard_order() -> None:
    difficulty = _difficulty()
    rank = np.argsort(np.argsort(difficulty))  # 0 = easiest
    sampler = CurriculumBatchSampler(difficulty, "linear", B, seed=0)
    first = sampler.batch(0, 100).numpy()
    assert (rank[first] < N // 4).all()  # step 0: the easiest quarter only
    assert len(sampler.pool(0.0)) == N // 4
    assert set(sampler.pool(0.0).tolist()) == set(np.flatnonzero(rank < N // 4).tolist())
    assert len(sampler.pool(0.4)) == int(np.ceil((0.25 + 0.75 * 0.5) * N))
    assert len(sampler.pool(0.8)) == N
    # A window narrower than a batch widens toward harder samples.
    narrow = CurriculumBatchSampler(difficulty, "linear", 40)
    assert set(narrow.pool(0.0).tolist()) == set(np.flatnonzero(rank < 40).tolist())
    # A sliding window: the pool is a middle band of the order.
    windows = CurriculumBatchSampler(difficulty, "windows", B)
    lo, hi = windows.pacer(0.4)
    assert set(rank[windows.pool(0.4).numpy()]) == set(range(int(np.floor(lo * N)), int(np.ceil(hi * N))))


def test_random_linear_and_anti_orderings() -> None:
    difficulty = _difficulty()
    rank = np.argsort(np.argsort(difficulty)) / (N - 1)

    def early_mean_rank(pacer: str) -> float:
        sampler = CurriculumBatchSampler(difficulty, pacer, B, seed=5)
        return float(np.mean([rank[b.numpy()].mean() for b in _run(sampler, 200, stop=20)]))

    linear, anti, random = early_mean_rank("linear"), early_mean_rank("anti"), early_mean_rank("random")
    assert linear < 0.2 and anti > 0.8 and 0.35 < random < 0.65
    anti_first = CurriculumBatchSampler(difficulty, "anti", B).batch(0, 100).numpy()
    assert (rank[anti_first] >= 0.74).all()  # anti starts with the hardest quarter


def test_self_paced_follows_the_observed_loss_not_the_static_difficulty() -> None:
    difficulty = _difficulty()
    sampler = CurriculumBatchSampler(difficulty, "self_paced", B, seed=0, stale_after=10_000)
    # Nothing observed yet: unobserved samples fall back to the static order.
    assert torch.equal(sampler.online_order(), sampler.static_order)
    loss = 1.0 - difficulty  # the model finds the statically hardest pairs easiest
    everyone = torch.arange(N)
    sampler.observe(everyone, torch.from_numpy(loss).float())
    pool = sampler.pool(0.0).numpy()
    assert set(pool.tolist()) == set(np.argsort(loss)[: N // 4].tolist())
    # EMA: one very high observation moves an easy sample up, but not all the way.
    easiest = int(np.argmin(loss))
    sampler.observe(torch.tensor([easiest]), torch.tensor([10.0]))
    assert float(sampler.ema[easiest]) == pytest.approx(0.9 * loss[easiest] + 0.1 * 10.0, rel=1e-5)
    assert easiest not in sampler.pool(0.0).tolist()


def test_self_paced_mixes_observed_and_unobserved_by_quantile() -> None:
    difficulty = np.arange(N, dtype=float)  # static order = index order
    sampler = CurriculumBatchSampler(difficulty, "self_paced", B, seed=0)
    half = torch.arange(0, N, 2)  # observed: the even samples, with reversed losses
    sampler.observe(half, torch.linspace(1.0, 0.0, len(half)))
    q = sampler.online_difficulty()
    assert torch.allclose(q[1::2], sampler.static_quantile[1::2])  # unobserved: static quantile
    assert (q[half].diff() < 0).all()  # observed: ranked by their loss
    # Stale observations fall back again.
    sampler.step = sampler.stale_after + 5
    assert torch.allclose(sampler.online_difficulty(), sampler.static_quantile)


# ----- hard negatives -----------------------------------------------------------------------


def test_no_group_twice_in_a_batch_while_mining() -> None:
    groups = _groups(size=6)  # 20 groups of 6
    sampler = CurriculumBatchSampler(_difficulty(), "linear", B, seed=1, groups=groups, hard_negatives=0.5,
                                     neighbours=mine_neighbours(_features(), groups, 8))
    for index in _run(sampler, 200):
        assert len(set(groups[index].tolist())) == B
        assert len(set(index.tolist())) == B


def test_mined_samples_are_neighbours_in_the_pool_and_their_share_rises() -> None:
    groups = _groups()
    neighbours = mine_neighbours(_features(), groups, 5)
    pairs = {(int(i), int(j)) for i in range(N) for j in neighbours[i]}

    def neighbour_share(index: torch.Tensor) -> float:
        """Share of the batch that is a mined-style neighbour of another batch member."""
        members = index.tolist()
        return sum(any((i, j) in pairs for i in members if i != j) for j in members) / len(members)

    def run(hard: float) -> tuple[list[float], list[float]]:
        sampler = CurriculumBatchSampler(_difficulty(), "linear", B, seed=4, groups=groups, hard_negatives=hard,
                                         neighbours=neighbours, hn_start=0.0)
        assert sampler.hard_share(0.0) == 0.0 and sampler.hard_share(1.0) == hard
        shares, mined, total = [], [], 400
        for step in range(total):
            index = sampler.batch(step, total)
            pool = set(sampler.pool(sampler.progress(step, total)).tolist())
            assert set(index.tolist()) <= pool  # mined negatives respect the pacer
            shares.append(neighbour_share(index))
            mined.append(sampler.last_stats["mined"])
        return shares, mined

    shares, mined = run(0.5)
    chance, _ = run(0.0)  # the same curriculum without mining: neighbours only by chance
    early, late, late_chance = np.mean(shares[:40]), np.mean(shares[-40:]), np.mean(chance[-40:])
    assert late > early + 0.3 and late > late_chance + 0.3, (early, late, late_chance)
    assert mined[0] == 0.0 and np.mean(mined[-40:]) >= 0.4
    by_quarter = [np.mean(mined[i : i + 100]) for i in range(0, 400, 100)]
    assert all(a < b for a, b in zip(by_quarter, by_quarter[1:])), by_quarter  # the share rises


def test_all_hard_negatives_keeps_one_random_anchor() -> None:
    groups = torch.arange(N)
    chain = torch.stack([(torch.arange(N) + k) % N for k in range(1, 13)], dim=1)
    sampler = CurriculumBatchSampler(_difficulty(), "random", B, seed=0, groups=groups, hard_negatives=1.0,
                                     hn_start=1.0, neighbours=chain)
    index = sampler.batch(0, 10).tolist()
    assert sampler.last_stats["hard_share"] == sampler.last_stats["mined"] == (B - 1) / B
    assert index == [(index[0] + k) % N for k in range(B)]  # the anchor and its B - 1 nearest


def test_hard_negatives_config_errors() -> None:
    with pytest.raises(ConfigError, match="neighbours"):
        CurriculumBatchSampler(_difficulty(), "linear", B, hard_negatives=0.3)
    with pytest.raises(ConfigError, match="hard_negatives"):
        CurriculumBatchSampler(_difficulty(), "linear", B, hard_negatives=1.5, neighbours=torch.zeros(N, 2).long())
    with pytest.raises(ConfigError, match=r"\[120, K\]"):
        CurriculumBatchSampler(_difficulty(), "linear", B, hard_negatives=0.3, neighbours=torch.zeros(5, 2).long())
    with pytest.raises(ConfigError, match="groups"):
        CurriculumBatchSampler(_difficulty(), "linear", B, groups=torch.arange(7))
    with pytest.raises(ConfigError, match="non-finite"):
        CurriculumBatchSampler(np.array([0.1, np.nan, 0.3]), "linear", 2)


def test_mine_neighbours_excludes_self_and_same_group() -> None:
    features = _features(40, 6)
    groups = torch.arange(40) // 4
    nb = mine_neighbours(features, groups, 5, chunk_size=7)  # chunks must not change the answer
    assert nb.shape == (40, 5) and nb.dtype == torch.long
    assert torch.equal(nb, mine_neighbours(features, groups, 5))
    x = torch.nn.functional.normalize(features, dim=1)
    sims = x @ x.T
    for i in range(40):
        row = nb[i].tolist()
        assert i not in row and all(groups[j] != groups[i] for j in row)
        eligible = [j for j in range(40) if groups[j] != groups[i]]
        best = sorted(eligible, key=lambda j: -float(sims[i, j]))[:5]
        assert row == best  # the true cosine nearest, nearest first


def test_mine_neighbours_pads_when_too_few_are_eligible() -> None:
    groups = torch.tensor([0, 0, 0, 1, 1])
    nb = mine_neighbours(_features(5, 3), groups, 4)
    assert (nb[:3, 2:] == -1).all() and (nb[:3, :2] >= 3).all()  # group 0 sees only group 1's two samples
    assert (nb[3:, 3:] == -1).all() and (nb[3:, :3] < 3).all()


def test_set_neighbours_refreshes_mining() -> None:
    groups = torch.arange(N)
    sampler = CurriculumBatchSampler(_difficulty(), "random", B, seed=0, groups=groups, hard_negatives=0.5,
                                     hn_start=0.5, neighbours=mine_neighbours(_features(), groups, 3))
    chain = torch.stack([(torch.arange(N) + k) % N for k in (1, 2, 3)], dim=1)  # neighbours: the next three
    sampler.set_neighbours(chain)
    index = sampler.batch(0, 10).tolist()
    anchors, mined = index[: B // 2], index[B // 2:]
    expected: list[int] = []
    for k in (1, 2, 3):  # round-robin: every anchor's nearest, then every second nearest, ...
        expected += [(a + k) % N for a in anchors if (a + k) % N not in anchors + expected]
    assert mined == expected[: B // 2]


# ----- resume -------------------------------------------------------------------------------


@pytest.mark.parametrize("pacer", ["linear", "self_paced", "windows"])
def test_state_dict_round_trip_reproduces_batches(pacer: str, tmp_path) -> None:
    groups = _groups()
    features = _features()
    loss = _difficulty(seed=9)

    def make() -> CurriculumBatchSampler:
        return CurriculumBatchSampler(_difficulty(), pacer, B, seed=7, groups=groups, hard_negatives=0.4,
                                      neighbours=mine_neighbours(features, groups, 4), hn_start=0.1,
                                      predictor=LossPredictor(features, seed=0), stale_after=5, refresh_every=3)

    total, cut = 50, 20  # cut % refresh_every != 0: the resumed run must reuse the saved predictions
    remined = mine_neighbours(features + 0.5 * _features(seed=3), groups, 4)
    reference, first = make(), make()
    for sampler in (reference, first):
        _run(sampler, total, stop=cut, loss_of=loss)
        sampler.set_neighbours(remined)  # re-mined mid-run: must survive the resume too
    expected = _run(reference, total, start=cut, loss_of=loss)
    state = first.state_dict()
    assert all(torch.is_tensor(v) for v in state.values())
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "s.safetensors"))  # as the trainer does
    resumed = make()
    resumed.load_state_dict(load_file(str(tmp_path / "s.safetensors")))
    got = _run(resumed, total, start=cut, loss_of=loss)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.allclose(resumed.predictor.predict(), reference.predictor.predict())


# ----- build_sampler ---------------------------------------------------------------------------


def test_build_sampler_random_is_the_unchanged_random_sampler() -> None:
    sampler = build_sampler(CurriculumConfig(), 50, 8, seed=3)  # today's config: only `pacer`
    assert type(sampler) is RandomBatchSampler
    plain = RandomBatchSampler(50, 8, 3)
    assert all(torch.equal(sampler.batch(s, 30), plain.batch(s, 30)) for s in range(30))


def test_build_sampler_curriculum_and_errors() -> None:
    cfg = SimpleNamespace(pacer="root", pacer_options={"start": 0.5, "full_at": 0.6}, hard_negatives=0.0)
    sampler = build_sampler(cfg, N, B, 0, difficulty=_difficulty())
    assert isinstance(sampler, CurriculumBatchSampler) and sampler.pacer.name == "root"
    assert sampler.pacer.start == 0.5 and sampler.pacer.full_at == 0.6
    with pytest.raises(ConfigError, match="'linear'.*difficulty"):
        build_sampler(SimpleNamespace(pacer="linear"), N, B, 0)
    with pytest.raises(ConfigError, match="unknown pacer 'easy'"):
        build_sampler(SimpleNamespace(pacer="easy"), N, B, 0, difficulty=_difficulty())
    with pytest.raises(ConfigError, match="scores for"):
        build_sampler(SimpleNamespace(pacer="linear"), N + 1, B, 0, difficulty=_difficulty())
    with pytest.raises(ConfigError, match="neighbours"):
        build_sampler(SimpleNamespace(pacer="random", hard_negatives=0.3), N, B, 0)
    # Random pacer with mining: a curriculum sampler over the whole set, no difficulty needed.
    groups = _groups()
    mixed = build_sampler(SimpleNamespace(pacer="random", hard_negatives=0.3), N, B, 0, groups=groups,
                          neighbours=mine_neighbours(_features(), groups, 4))
    assert isinstance(mixed, CurriculumBatchSampler) and len(mixed.pool(0.0)) == N


# ----- learned difficulty ----------------------------------------------------------------------


def test_loss_predictor_learns_to_rank_samples() -> None:
    n = 512
    x = _features(n, 10, seed=11)
    true = torch.sin(2 * x[:, 0]) + x[:, 1] ** 2 + 0.5 * x[:, 2] + 3.0  # loss = f(frozen features)
    gen = torch.Generator().manual_seed(0)
    predictor = LossPredictor(x, seed=0)
    assert not predictor.trained
    for _ in range(200):
        index = torch.randperm(n, generator=gen)[:64]
        noisy = true[index] + 0.1 * torch.randn(64, generator=gen)
        predictor.observe(index, noisy)
    pred = predictor.predict()
    assert pred.shape == (n,) and predictor.trained
    assert _spearman(pred.numpy(), true.numpy()) > 0.8
    assert abs(float(pred.mean()) - float(true.mean())) < 0.3  # in loss units, not standardised
    assert torch.allclose(predictor.predict(torch.tensor([5, 1])), pred[[5, 1]])


def test_loss_predictor_is_deterministic_and_leaves_global_rng_alone() -> None:
    x = _features(64, 4)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    one, two = LossPredictor(x, seed=5), LossPredictor(x, seed=5)
    assert torch.equal(torch.rand(1), before)  # construction did not consume the global RNG
    for p in (one, two):
        p.observe(torch.arange(16), torch.arange(16).float())
    assert torch.equal(one.predict(), two.predict())
    assert not torch.equal(LossPredictor(x, seed=6).predict(), LossPredictor(x, seed=5).predict())


def test_self_paced_uses_the_predictor_for_unobserved_samples() -> None:
    x = _features(N, 6)
    true = (x[:, 0] * 2 + x[:, 1]).numpy()
    sampler = CurriculumBatchSampler(_difficulty(), "self_paced", B, seed=0, predictor=LossPredictor(x, seed=0))
    seen = torch.arange(N // 2)  # the model only ever observes half of the samples
    gen = torch.Generator().manual_seed(1)
    for _ in range(150):
        index = seen[torch.randperm(len(seen), generator=gen)[:B]]
        sampler.observe(index, torch.from_numpy(true[index.numpy()]).float())
    score = sampler.online_difficulty().numpy()
    unseen = np.arange(N // 2, N)
    assert _spearman(score[unseen], true[unseen]) > 0.8  # ranked by predicted, not static, difficulty
    assert abs(_spearman(score[unseen], _difficulty()[unseen])) < 0.4
