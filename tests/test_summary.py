"""Held-out subsets in evaluation, and the one results table (text, JSON, PNG) of a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from oneencoder.evaluation.retrieval import evaluate_samples
from oneencoder.evaluation.summary import format_results, model_results, write_results
from oneencoder.model.checkpoint import load_model


def test_subsets_are_scored_on_their_own(trained_model: dict[str, Any], small_records: list[dict],
                                         small_cache: Path, stage_modalities) -> None:
    # Mark test samples by group parity, as a dataset marks held-out objects vs poses.
    groups = sorted({r["group"] for r in small_records if r["split"] == "test"})
    marked = [{**r, "heldout": ("odd" if groups.index(r["group"]) % 2 else "even")} if r["split"] == "test" else r
              for r in small_records]
    model, _ = load_model(trained_model["dir"])
    results = evaluate_samples(model, stage_modalities, marked, small_cache, "test")
    assert set(results["subsets"]) == {"even", "odd"}
    total = results["directions"]["image→text"]
    parts = [results["subsets"][s]["image→text"] for s in ("even", "odd")]
    assert sum(p["n_query_samples"] for p in parts) == total["n_query_samples"]
    for part in parts:  # a smaller gallery: chance goes up
        assert part["chance"]["R@1"] > total["chance"]["R@1"]
    # Without the field, nothing changes and there are no subsets.
    plain = evaluate_samples(model, stage_modalities, small_records, small_cache, "test")
    assert "subsets" not in plain
    assert plain["directions"]["image→text"]["metrics"] == pytest.approx(total["metrics"])


def test_results_table_json_and_png(trained_model: dict[str, Any], tmp_path: Path) -> None:
    rows = model_results(trained_model["dir"])
    assert {r["direction"] for r in rows} == {"image→text", "text→image"}
    assert {r["kind"] for r in rows} == {"trained"} and {r["subset"] for r in rows} == {"all"}
    summary = trained_model["summary"]["test"]["directions"]
    for row in rows:
        assert row["R@1"] == pytest.approx(summary[row["direction"]]["metrics"]["R@1"])
        assert row["chance_R@1"] == pytest.approx(summary[row["direction"]]["chance"]["R@1"])
    text = format_results(rows)
    assert "image→text" in text and "chance" in text
    rows2, json_path, png_path = write_results(trained_model["dir"], tmp_path / "report")
    assert json.loads(json_path.read_text())["rows"] == json.loads(json.dumps(rows2))
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 5000
