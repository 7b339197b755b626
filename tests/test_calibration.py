"""The modality gap measured and a calibrated match probability: fitted on validation when a
stage ends, stored in the model with per-modality means, checked on test, used by search."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import oneencoder
from oneencoder.cli.main import app
from oneencoder.evaluation.calibration import (MatchCalibration, best_f1_threshold, fit_platt, pair_sample,
                                               stored_calibrations)
from oneencoder.evaluation.validation_fit import fit_on_validation
from oneencoder.features.cache import build_cache
from oneencoder.fileio import sha256_file, write_jsonl_atomic
from oneencoder.model.checkpoint import MEANS, load_model, read_meta
from oneencoder.training.stage import run_stage

runner = CliRunner()


def _invoke(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


# ----- the fitter, on synthetic cosines whose true logistic is known ----------------------


def test_platt_fit_recovers_a_known_logistic() -> None:
    rng = np.random.default_rng(0)
    cos = rng.uniform(-1, 1, 200_000)
    labels = rng.random(cos.size) < 1 / (1 + np.exp(-(8.0 * cos - 3.0)))
    a, b = fit_platt(cos, labels)
    assert a == pytest.approx(8.0, abs=0.15) and b == pytest.approx(-3.0, abs=0.1)
    assert fit_platt(cos, labels) == (a, b)  # deterministic


def test_weighted_negative_sample_fits_as_all_pairs_do() -> None:
    """Keeping 1 negative in 10 with weight 10 leaves the fit where all pairs put it."""
    rng = np.random.default_rng(1)
    cos = rng.uniform(-1, 1, 300_000)
    labels = rng.random(cos.size) < 1 / (1 + np.exp(-(10.0 * cos - 6.0)))
    keep = labels | (rng.random(cos.size) < 0.1)
    weights = np.where(labels, 1.0, 10.0)[keep]
    full, sampled = fit_platt(cos, labels), fit_platt(cos[keep], labels[keep], weights)
    assert sampled == pytest.approx(full, abs=0.25)


def test_separable_pairs_give_a_finite_slope_and_the_f1_threshold_splits_them() -> None:
    cos = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.0, -0.1])
    labels = np.array([True, True, True, False, False, False, False])
    a, _ = fit_platt(cos, labels)
    assert np.isfinite(a) and a > 0
    assert best_f1_threshold(cos, labels) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="matching and non-matching"):
        fit_platt(cos, np.ones(7, dtype=bool))


def test_pair_sample_keeps_every_match_and_weights_sampled_negatives() -> None:
    g = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=1)
    gallery = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    qc, gc = torch.arange(60) % 50, torch.arange(50)
    scores, labels, weights = pair_sample(queries, gallery, qc, gc)
    assert len(scores) == 60 * 50 and labels.sum() == 60 and (weights == 1).all()
    scores, labels, weights = pair_sample(queries, gallery, qc, gc, max_negatives=600)
    assert labels.sum() == 60 and weights[~labels] == pytest.approx(2940 / 600)
    assert 400 < (~labels).sum() < 800  # about 600 of the 2940 negatives, seeded
    again = pair_sample(queries, gallery, qc, gc, max_negatives=600)
    assert np.array_equal(again[0], scores)


def test_precision_prediction_follows_the_share_of_matches() -> None:
    cal = MatchCalibration(a=10.0, b=-5.0, threshold=0.4, val_precision=0.5, val_recall=0.5,
                           val_false_positive_rate=0.01, n_val_pairs=10_000, n_val_positives=100, n_val_queries=100)
    assert cal.predicted_precision(cal.val_base_rate) == pytest.approx(0.5 * 0.01 / (0.5 * 0.01 + 0.01 * 0.99))
    assert cal.predicted_precision(0.001) < cal.predicted_precision(0.01)  # a bigger gallery: lower precision
    p_val, p_big = cal.probability(0.5), cal.in_gallery(1000)(0.5)
    assert 0 < p_big < p_val < 1  # ten times the gallery: less likely to be the match
    assert MatchCalibration.from_dict(cal.to_dict()) == cal
    assert MatchCalibration.from_dict({"a": "x"}) is None


# ----- a real trained model: the stage stored its calibration and means ---------------------


def test_the_stage_stores_calibration_means_and_checks_them_on_test(trained_model) -> None:
    model_dir = Path(trained_model["dir"])
    meta = read_meta(model_dir)
    stored = stored_calibrations(meta)
    assert set(stored) == {"image→text", "text→image"}
    for direction, cal in stored.items():
        assert cal.stage == "image_text" and cal.n_val_positives >= 10 and 0 < cal.val_precision <= 1
        cosines = np.linspace(-1, 1, 41)
        p = cal.probability(cosines)
        assert ((p >= 0) & (p <= 1)).all() and (np.diff(p) > 0).all()  # monotone in the cosine
        test = trained_model["summary"]["test"]["directions"][direction]
        assert test["calibration"]["threshold"] == cal.threshold
        assert 0 <= test["calibration"]["predicted_precision"] <= 1 and test["calibration"]["n_positives"] > 0
        gap = test["gap"]
        assert -1 <= gap["mean_neg_cos"] < gap["mean_pos_cos"] <= 1  # trained: matches score higher
    # test.json holds the same, so the check "precision on test vs validation's prediction" is on disk.
    saved = json.loads((model_dir / "runs" / "image_text" / "test.json").read_text())
    assert saved["test"]["directions"]["image→text"]["calibration"]["threshold"] == stored["image→text"].threshold
    # The means: a checksummed file, one [d] vector per modality, exposed by the API.
    assert MEANS in meta["files"] and meta["files"][MEANS] == sha256_file(model_dir / MEANS)
    m = oneencoder.load(model_dir)
    for name in ("image", "text"):
        mean = m.modality_mean(name)
        assert mean.shape == (m.model.embed_dim,) and 0 < float(mean.norm()) <= 1
        assert meta["means"][name] == {"split": "val", "n": 14, "stage": "image_text"}


def test_search_json_gives_calibrated_probabilities_and_says_when_it_cannot(
        trained_model, small_records, tmp_path: Path) -> None:
    model_dir = trained_model["dir"]
    m = oneencoder.load(model_dir)
    images = [r["image"] for r in small_records if r["split"] == "test"]
    index = m.index("image", images)
    index.save(tmp_path / "ix")
    result = m.search(index, "text", [small_records[0]["caption"]], k=5)
    assert result.match_probability.shape == (1, 5)
    probs = [h["match_probability"] for h in result.hits[0]]
    assert all(0 <= p <= 1 for p in probs) and probs == sorted(probs, reverse=True)  # best hit most likely
    assert m.match_probability("image", "image", [0.5]) is None  # no such direction was fitted

    out = _invoke("search", "--index", tmp_path / "ix", "--model", model_dir, "--text", "A badger.", "-k", "4",
                  "--json")
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    hits = payload["results"][0]["hits"]
    assert len(hits) == 4 and all(0 <= h["match_probability"] <= 1 for h in hits)
    assert payload["results"][0]["match_calibration"]["fitted_on"] == "validation split of stage image_text"
    assert "note" not in payload

    composed = _invoke("search", "--index", tmp_path / "ix", "--model", model_dir, "--text", "A badger.",
                       "--text", "An animal.", "-k", "2", "--json")
    payload = json.loads(composed.output)
    assert all(h["match_probability"] is None for h in payload["results"][0]["hits"])
    assert "composed query has no calibration" in payload["note"]


def test_eval_json_reports_negative_cosine_threshold_and_test_precision(
        trained_model, small_manifest, small_cache, tmp_path: Path) -> None:
    out = _invoke("eval", "--model", trained_model["dir"], "--manifest", small_manifest, "--cache-dir", small_cache,
                  "--out", tmp_path / "e.json", "--json")
    assert out.exit_code == 0, out.output
    printed = json.loads(next(line for line in out.output.splitlines() if line.startswith("{")))
    assert printed == json.loads((tmp_path / "e.json").read_text())
    direction = printed["directions"]["text→image"]
    assert set(direction["gap"]) == {"centroid_distance", "mean_pos_cos", "mean_neg_cos"}
    cal = direction["calibration"]
    assert {"threshold", "val_precision", "precision", "predicted_precision", "a", "b"} <= set(cal)
    table = _invoke("eval", "--model", trained_model["dir"], "--manifest", small_manifest, "--cache-dir",
                    small_cache, "--out", tmp_path / "e2.json")
    assert "match threshold" in table.output and "neg cos" in table.output


def test_a_model_without_calibration_says_none_stored(trained_model, small_manifest, small_cache,
                                                      tmp_path: Path) -> None:
    """An older model (no calibration, no means): eval says so, calibrate adds both, weights untouched."""
    model_dir = tmp_path / "old"
    shutil.copytree(trained_model["dir"], model_dir, ignore=shutil.ignore_patterns("runs"))
    meta = read_meta(model_dir)
    del meta["match_calibration"], meta["means"], meta["files"][MEANS]
    (model_dir / MEANS).unlink()
    (model_dir / "oneencoder.json").write_text(json.dumps(meta, indent=2))
    table = _invoke("eval", "--model", model_dir, "--manifest", small_manifest, "--cache-dir", small_cache)
    assert table.exit_code == 0, table.output
    assert "none stored" in table.output
    with pytest.raises(oneencoder.OneEncoderError, match="stores no mean of 'text'"):
        oneencoder.load(model_dir).modality_mean("text")

    weights = sha256_file(model_dir / "projection.safetensors")
    done = _invoke("calibrate", "--model", model_dir, "--manifest", small_manifest, "--cache-dir", small_cache)
    assert done.exit_code == 0, done.output
    assert "calibrated image→text, text→image" in done.output and "precision (predicted)" in done.output
    assert sha256_file(model_dir / "projection.safetensors") == weights
    assert set(stored_calibrations(read_meta(model_dir))) == {"image→text", "text→image"}
    load_model(model_dir)  # every checksum, means.safetensors included, verifies


# ----- the near-chance warning ---------------------------------------------------------


def test_near_chance_warning_fires_for_a_stage_that_cannot_learn(
        trained_model, small_records, small_cache, stage_modalities, make_config, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    """Images re-aligned to the frozen text on pairs whose captions were shifted by one within
    each split (every pair wrong) end near chance on validation, and the stage says so in one
    line; the trained fixture's check stays silent."""
    shifted = [dict(r) for r in small_records]
    for split in ("train", "val", "test"):
        at = [i for i, r in enumerate(small_records) if r["split"] == split]
        for i, j in zip(at, at[1:] + at[:1]):
            shifted[i]["caption"], shifted[i]["group"] = small_records[j]["caption"], small_records[j]["group"]
    manifest, cache = tmp_path / "shifted.jsonl", tmp_path / "cache"
    write_jsonl_atomic(manifest, shifted)
    shutil.copytree(small_cache / "image", cache / "image")  # the images are the same samples
    build_cache(stage_modalities["text"], shifted, cache, batch_size=32, num_workers=0, progress=False)
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model["dir"], model_dir, ignore=shutil.ignore_patterns("runs"))
    config = make_config(manifest, cache, epochs=1, sections={"stage": {
        "name": "add_image", "modalities": ["image", "text"], "trainable": ["image"]}})
    capsys.readouterr()
    run_stage(config, model_dir, replace=True, progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if "near chance" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: image ended near chance against text on validation (R@1")
    # The fixture learned: the same check on its validation split stays silent.
    learned, _ = load_model(trained_model["dir"])
    fit = fit_on_validation(learned, stage_modalities, small_records, small_cache, trained=["image"])
    assert fit.near_chance("image", "text") is None
    # The retrained adapter's calibration replaced the old one; the text side's mean was kept.
    meta = read_meta(model_dir)
    assert meta["match_calibration"]["image→text"]["stage"] == "add_image"
    assert meta["means"]["text"]["stage"] == "image_text" and meta["means"]["image"]["stage"] == "add_image"
