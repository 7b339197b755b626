"""Noise-aware curriculum: pair agreement, clean probabilities and per-pair loss weights.

The scorer tests run on the real small Tux Paint cache (frozen EfficientNet + MiniLM
features) with captions shuffled among half of the pairs, as ``data corrupt`` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from oneencoder.errors import ConfigError
from oneencoder.model.losses import create_loss
from oneencoder.training.curriculum.agreement import clean_probability, cross_fit_probe, csls
from oneencoder.training.curriculum.difficulty import _load_context
from oneencoder.training.curriculum.scorers import create_scorer
from oneencoder.training.curriculum.weights import (SampleWeights, build_weights, group_balance_weights, lambert_w0,
                                                    superloss_confidence)


def _roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Brute force: share of (positive, negative) pairs ordered right, ties half."""
    p, n = score[positive], score[~positive]
    return float(((p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()) / (len(p) * len(n)))


def _shuffle_half(ctx, seed: int = 0) -> np.ndarray:
    """Give half of the pairs another pair's caption (no pair keeps its own); returns the mask."""
    rng = np.random.default_rng(seed)
    n = len(ctx)
    chosen = rng.choice(n, n // 2, replace=False)
    perm = np.arange(n)
    perm[chosen] = np.roll(chosen, 1)  # a cycle: every chosen pair gets another one's caption
    ctx.features["text"] = ctx.features["text"][perm]
    ctx.language["text"] = ctx.language["text"][perm]
    wrong = np.zeros(n, dtype=bool)
    wrong[chosen] = True
    return wrong


@pytest.fixture()
def real_ctx(small_records, small_cache, stage_modalities):
    return _load_context(small_records, small_cache, stage_modalities)


def test_context_carries_sentence_space_vectors(real_ctx) -> None:
    # The image's ImageNet label semantics and the caption's sentence embedding share MiniLM's 384 dims.
    assert real_ctx.language["image"].shape == real_ctx.language["text"].shape == (len(real_ctx), 384)


def test_shuffled_pairs_are_more_suspect_than_true_ones(real_ctx) -> None:
    true = create_scorer("pair_agreement")(real_ctx)
    wrong = _shuffle_half(real_ctx)
    noisy = create_scorer("pair_agreement")(real_ctx)
    # The same image with someone else's caption looks more suspect than with its own on most pairs.
    assert np.mean(noisy.score[wrong] > true.score[wrong]) > 0.8
    # And within the noisy set, the shuffled pairs separate from the intact ones.
    assert _roc_auc(noisy.score, wrong) > 0.8
    for key in ("frozen_csls", "probe_csls", "agreement", "clean_probability"):
        assert noisy.measurements[key].shape == (len(real_ctx),), key
    clean = noisy.measurements["clean_probability"]
    assert ((0 <= clean) & (clean <= 1)).all() and clean[~wrong].mean() > clean[wrong].mean() + 0.2


def test_probe_only_works_without_sentence_space_vectors(real_ctx) -> None:
    real_ctx.language.clear()
    result = create_scorer("pair_agreement")(real_ctx)
    assert "frozen_csls" not in result.measurements and "probe_csls" in result.measurements
    with pytest.raises(ConfigError, match="'frozen' needs sentence-space vectors"):
        create_scorer("pair_agreement", use=("frozen",))(real_ctx)
    with pytest.raises(ConfigError, match="choose from"):
        create_scorer("pair_agreement", use=("bogus",))(real_ctx)


def test_csls_null_never_pairs_an_item_with_itself() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    b = a + 0.5 * rng.normal(size=a.shape)
    observed, null = csls(a, b, k=5, null_draws=3)
    assert observed.shape == (400,) and null.shape == (1200,)
    assert observed.mean() > null.mean() + 1.0  # true pairs agree far more than mismatched ones
    # A reference subset caps the cost and keeps the result close.
    sub, _ = csls(a, b, k=5, reference=300)
    assert np.corrcoef(sub, observed)[0, 1] > 0.95


def test_probe_penalty_is_chosen_without_labels_and_recovers_a_linear_map() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 40))
    y = x @ rng.normal(size=(40, 6)) + 0.5 * rng.normal(size=(300, 6))
    y[150:] = y[150:][rng.permutation(150)]  # half the targets belong to another row
    observed, null, alpha = cross_fit_probe(x, y, folds=5, seed=0, k=5)
    assert alpha in (0.2, 2.0, 20.0, 200.0)
    assert _roc_auc(-observed, np.arange(300) >= 150) > 0.85
    with pytest.raises(ConfigError, match="at least 10 pairs"):
        cross_fit_probe(x[:8], y[:8])


def test_clean_probability_estimates_the_wrong_share() -> None:
    rng = np.random.default_rng(2)
    null = rng.normal(size=4000)
    for share in (0.0, 0.3, 0.6):
        k = int(share * 2000)
        observed = np.concatenate([rng.normal(size=k), rng.normal(3.0, 1.0, size=2000 - k)])
        clean, pi0 = clean_probability(observed, null)
        assert abs(pi0 - share) < 0.06, (share, pi0)
        order = np.argsort(observed)
        assert (np.diff(clean[order]) >= -1e-12).all()  # more agreement is never less trusted
        if k:
            assert clean[:k].mean() < 0.35 < 0.8 < clean[k:].mean()


def test_lambert_w_and_superloss_confidence() -> None:
    y = torch.tensor([-1 / np.e, -0.2, 0.0, 1.0, np.e, 50.0], dtype=torch.float64)
    w = lambert_w0(y)
    assert torch.allclose(w * torch.exp(w), y, atol=1e-9)
    assert abs(float(lambert_w0(torch.tensor([1.0]))) - 0.5671432904) < 1e-9  # the omega constant
    conf = superloss_confidence(torch.tensor([0.0, 2.0, 4.0, 8.0]), tau=2.0, lam=1.0)
    assert float(conf[1]) == pytest.approx(1.0)  # at the threshold a pair counts fully
    assert (conf[:-1] > conf[1:]).all()  # higher loss, lower confidence


def test_weighted_loss_is_a_weighted_mean_of_pair_losses() -> None:
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    b = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    for name in ("infonce", "hnnce", "margin"):
        loss = create_loss(name)
        plain = loss(a, b)
        assert "weight_mean" not in plain
        w = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.25])
        out = loss(a, b, weight=w)
        expected = (w * plain["per_sample"]).sum() / w.sum()
        assert torch.allclose(out["loss"], expected, atol=1e-6), name
        assert torch.allclose(out["per_sample"], plain["per_sample"])  # observed losses stay unweighted
        ones = loss(a, b, weight=lambda losses: torch.ones_like(losses))
        assert torch.allclose(ones["loss"], plain["loss"], atol=1e-6)


def test_sample_weights_multiply_trust_and_superloss_with_a_floor() -> None:
    trust = torch.tensor([1.0, 0.5, 0.0, 0.9])
    losses = torch.tensor([1.0, 1.0, 1.0, 1.0])
    only_trust = SampleWeights(fixed=trust, floor=0.1).batch(torch.tensor([0, 2, 1]))(losses[:3])
    assert torch.allclose(only_trust, torch.tensor([1.0, 0.1, 0.5]))
    both = SampleWeights(fixed=trust, superloss=1.0).batch(torch.tensor([0, 1]))(torch.tensor([0.5, 1.5]))
    conf = superloss_confidence(torch.tensor([0.5, 1.5]), 1.0, 1.0)
    assert torch.allclose(both, trust[:2] * conf)
    selected = build_weights("trust", trust, 1.0, 0.05, threshold=0.5).batch(torch.arange(4))(losses)
    assert torch.allclose(selected, torch.tensor([1.0, 1.0, 0.05, 1.0]))  # hard selection, floor below
    assert build_weights("none", None, 1.0, 0.0) is None
    balance = group_balance_weights(torch.tensor([7, 7, 7, 7, 3]), 0.5)  # a template shared by four pairs
    assert torch.allclose(balance, torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0]))
    balanced = build_weights("none", None, 1.0, 0.0, balance=balance).batch(torch.tensor([0, 4]))(losses[:2])
    assert torch.allclose(balanced, torch.tensor([0.5, 1.0]))
    both = build_weights("trust", torch.tensor([1.0, 0.2, 1.0, 1.0, 0.5]), 1.0, 0.0, balance=balance)
    assert torch.allclose(both.batch(torch.tensor([1, 4]))(losses[:2]), torch.tensor([0.1, 0.5]))
    with pytest.raises(ConfigError, match="needs the pair_agreement"):
        build_weights("trust", None, 1.0, 0.0)
    with pytest.raises(ConfigError, match="use one of"):
        build_weights("bogus", None, 1.0, 0.0)
    with pytest.raises(ConfigError, match="must lie in"):
        SampleWeights(fixed=torch.tensor([1.5]))


def test_trust_weighted_stage_runs_end_to_end(small_manifest: Path, small_cache: Path, make_config,
                                               tmp_path: Path) -> None:
    from oneencoder.training.stage import run_stage

    config = make_config(small_manifest, small_cache, epochs=2,
                         log_every=1, sections={"curriculum": {"weighting": "trust+superloss", "weight_floor": 0.05}})
    summary = run_stage(config, tmp_path / "model", progress=False)
    rows = [line for line in (tmp_path / "model" / "runs" / config.name / "metrics.jsonl").read_text().splitlines()
            if '"weight_mean"' in line]
    assert rows, "weighted training logs the batches' mean weight"
    assert summary["test"]["directions"]["image→text"]["metrics"]["R@1"] >= 0


def test_report_shows_the_most_suspect_pairs(small_records, small_cache, stage_modalities, tmp_path: Path) -> None:
    from oneencoder.training.curriculum.difficulty import compute_difficulty
    from oneencoder.training.curriculum.report import write_report

    table = compute_difficulty(small_records, small_cache, stage_modalities, ["text_length", "pair_agreement"],
                               progress=False)
    page = write_report(table, small_records, tmp_path, stage_name="image_text", weights={"text_length": 1.0},
                        pacer="random", pacer_options={}, total_steps=10)
    html = page.read_text()
    assert (tmp_path / "suspects.png").stat().st_size > 10_000
    assert "12 most suspect pairs" in html and "Estimated share of wrong pairs" in html
    most = int(np.argmax(table.scores["pair_agreement"]))
    assert table.ids[most] in html  # the most suspect pair is listed with its measurements


@pytest.mark.parametrize("option, value, message", [
    ("weighting", "bogus", "weighting must be one of .*, got 'bogus'"),
    ("superloss_lambda", 0.0, "superloss_lambda must be > 0"),
    ("weight_floor", 1.0, "weight_floor must be in"),
    ("trust_threshold", -0.1, "trust_threshold must be in"),
    ("group_balance", 1.5, "group_balance must be in"),
])
def test_weighting_options_are_checked(small_manifest, small_cache, make_config, option, value, message) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(small_manifest, small_cache, sections={"curriculum": {option: value}})


def test_a_rescored_table_stops_a_resume(small_manifest: Path, small_cache: Path, make_config, tmp_path: Path) -> None:
    """Trust weights come from the difficulty table; a run must not resume on a different one."""
    import shutil

    from oneencoder.training.curriculum.difficulty import DifficultyTable, difficulty_path
    from oneencoder.errors import OneEncoderError
    from oneencoder.training.stage import run_stage

    cache = tmp_path / "cache"
    shutil.copytree(small_cache, cache)
    config = make_config(small_manifest, cache, epochs=1, sections={"curriculum": {"weighting": "trust"}})
    run_stage(config, tmp_path / "model", progress=False)
    path = difficulty_path(cache, tuple(config.modalities))
    table = DifficultyTable.load(path)
    table.measurements["pair_agreement"]["clean_probability"][:] = 1.0  # as if re-scored differently
    table.save(path)
    assert DifficultyTable.load(path) == table
    with pytest.raises(OneEncoderError, match="changed: difficulty_sha256"):
        run_stage(config, tmp_path / "model", progress=False)
