"""Curriculum wired through a real stage run, the score/report commands, and the saved table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.data.manifest import read_manifest
from oneencoder.training.curriculum.difficulty import DifficultyTable, difficulty_path
from oneencoder.training.curriculum.scorers import list_scorers
from oneencoder.training.pairs import stage_difficulty
from oneencoder.training.stage import run_stage

runner = CliRunner()


@pytest.mark.parametrize("curriculum, loss", [
    ({"pacer": "self_paced", "hard_negatives": 0.5}, {}),
    ({"pacer": "phases", "hard_negatives": 0.3, "hn_source": "model"}, {"name": "hnnce", "beta": 0.5}),
    ({"pacer": "root"}, {"name": "margin", "max_margin": 0.2}),
])
def test_curriculum_stage_trains_and_evaluates(curriculum, loss, small_manifest, small_cache, make_config,
                                               tmp_path: Path) -> None:
    config = make_config(small_manifest, small_cache, epochs=2, sections={"curriculum": curriculum, "loss": loss})
    summary = run_stage(config, tmp_path / "model", progress=False)
    assert summary["steps"] == 2 * (summary["steps"] // 2) > 0
    i2t = summary["test"]["directions"]["image→text"]
    assert 0.0 <= i2t["metrics"]["R@1"] <= 1.0 and i2t["chance"]["R@1"] > 0
    meta = json.loads((tmp_path / "model" / "oneencoder.json").read_text())
    assert meta["stages"][-1]["config"]["curriculum"]["pacer"] == curriculum["pacer"]


def test_difficulty_table_is_stored_next_to_the_cache_and_reused(small_manifest, small_cache, make_config) -> None:
    config = make_config(small_manifest, small_cache)
    records = read_manifest(small_manifest)
    table, path = stage_difficulty(config, records, force=True)
    assert path == difficulty_path(small_cache, tuple(config.modalities)) and path.is_file()
    assert set(table.scores) == set(list_scorers())
    assert set(table.ids) == {r["id"] for r in records if r["split"] == "train"}
    before = path.stat().st_mtime_ns
    again, _ = stage_difficulty(config, records)
    assert path.stat().st_mtime_ns == before  # reused, not recomputed
    assert again == DifficultyTable.load(path)


def test_score_and_report_commands_write_a_page_with_its_figures(small_manifest, small_cache, tmp_path: Path) -> None:
    common = ["--manifest", str(small_manifest), "--cache-dir", str(small_cache)]
    result = runner.invoke(app, ["curriculum", "score", "--stage", "image_text", *common])
    assert result.exit_code == 0, result.output
    assert "scored" in result.output and "of the pairs look wrong" in result.output
    out = tmp_path / "report"
    result = runner.invoke(app, ["curriculum", "report", "--stage", "image_text", "--out", str(out), *common])
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text(encoding="utf-8")
    for png in ("difficulty_distribution", "scorer_correlations", "pacing_schedule", "easiest", "hardest",
                "suspects"):
        assert f'src="{png}.png"' in page
        data = (out / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert page.count("<tr><td>") == 36  # 12 easiest + 12 hardest + 12 most suspect rows


def test_unknown_pacer_is_a_one_line_error(small_manifest, small_cache, tmp_path: Path) -> None:
    stage = tmp_path / "bad.toml"
    text = (Path(__file__).resolve().parent.parent / "stages" / "image_text.toml").read_text()
    stage.write_text(text.replace('pacer = "random"', 'pacer = "sideways"'))
    result = runner.invoke(app, ["train", "--stage", str(stage), "--model", str(tmp_path / "m"),
                                 "--manifest", str(small_manifest), "--cache-dir", str(small_cache)])
    assert result.exit_code == 2
    assert "sideways" in result.output and "Traceback" not in result.output
