"""Training you can watch: TensorBoard events, the curve PNG, ``runs list`` and ``runs compare``."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.errors import ConfigError
from oneencoder.evaluation.metrics import format_number
from oneencoder.training.config import parse_stage
from oneencoder.training.curves import CURVES, write_run_curves
from oneencoder.training.report import METRICS, TENSORBOARD_DIR, TensorBoardReporter, make_reporters, read_metrics
from oneencoder.training.stage import run_stage

runner = CliRunner()
LR = 2e-3  # the watched run's; the session's trained_model ran at the stage file's 1e-3


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _scalars(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events


def _is_png(path: Path) -> bool:
    with Image.open(path) as im:
        im.verify()
        return im.format == "PNG" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def watched(small_manifest, small_cache, make_config, tmp_path_factory) -> dict[str, Any]:
    """A 2-epoch Stage 1 that reports to TensorBoard, with mined hard negatives (a curriculum sampler)."""
    config = make_config(small_manifest, small_cache, epochs=2, log_every=1, lr=LR,
                         report_to=["jsonl", "tensorboard"], sections={"curriculum": {"hard_negatives": 0.25}})
    model_dir = tmp_path_factory.mktemp("watched") / "model"
    summary = run_stage(config, model_dir, progress=False)
    return {"dir": model_dir, "run": model_dir / "runs" / config.name, "summary": summary}


def test_tensorboard_events_hold_every_logged_scalar(watched: dict[str, Any]) -> None:
    run = watched["run"]
    steps, vals = read_metrics(run / METRICS)
    assert steps and len(vals) == 2
    events = _scalars(run / TENSORBOARD_DIR)
    tags = set(events.Tags()["scalars"])
    val_tags = {k for k in vals[0] if k.startswith("val/")}
    assert {"val/image→text/R@1", "val/text→image/R@10", "val/score"} <= val_tags
    assert {"train/loss", "train/lr", "train/logit_scale", "train/temperature", "curriculum/pool",
            "curriculum/hard_share", "curriculum/mined", "val/epoch"} | val_tags <= tags
    # The same numbers as metrics.jsonl, at the same steps (event files keep float32).
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert loss == pytest.approx({r["step"]: r["loss"] for r in steps}, rel=1e-6)
    assert all(e.value == pytest.approx(1 / s.value, rel=1e-5)
               for e, s in zip(events.Scalars("train/temperature"), events.Scalars("train/logit_scale")))
    assert [e.value for e in events.Scalars("curriculum/pool")] == [1.0] * len(steps)  # random pacer: all data
    score = {e.step: e.value for e in events.Scalars("val/score")}
    assert score == pytest.approx({r["step"]: r["val/score"] for r in vals}, rel=1e-6)
    assert [e.value for e in events.Scalars("val/epoch")] == [1, 2]


def test_curve_png_is_written_and_redrawn_from_metrics(watched: dict[str, Any], tmp_path: Path) -> None:
    assert _is_png(watched["run"] / CURVES)
    old = tmp_path / "old-run"  # a run from before curves: only its metrics.jsonl
    old.mkdir()
    shutil.copy(watched["run"] / METRICS, old / METRICS)
    assert write_run_curves(old) == old / CURVES and _is_png(old / CURVES)
    assert write_run_curves(tmp_path / "never-ran") is None


def test_resumed_reporter_replaces_the_steps_it_logs_again(tmp_path: Path) -> None:
    first = TensorBoardReporter(tmp_path, 0)
    for step in range(1, 5):
        first.step({"step": step, "epoch": 1, "loss": float(step)})
    first.close()
    resumed = TensorBoardReporter(tmp_path, 2)  # killed after step 4, resumed from the state at step 2
    for step in (3, 4):
        resumed.step({"step": step, "epoch": 1, "loss": 10.0 + step})
    resumed.close()
    loss = [(e.step, e.value) for e in _scalars(tmp_path / TENSORBOARD_DIR).Scalars("train/loss")]
    assert loss == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]


def test_missing_tensorboard_is_one_hint_and_training_keeps_jsonl(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as when tensorboard is not installed
    reporters = make_reporters(["jsonl", "tensorboard"], tmp_path)
    assert [type(r).__name__ for r in reporters] == ["JsonlReporter"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install tensorboard" in err and "metrics.jsonl" in err


@pytest.mark.parametrize("value", [["wandb"], "tensorboard", [1]])
def test_report_to_names_only_known_reporters(stage_raw: dict, value: Any) -> None:
    raw = json.loads(json.dumps(stage_raw))
    raw["train"]["report_to"] = value
    with pytest.raises(ConfigError, match=r"\[train\] report_to must"):
        parse_stage(raw, "stage.toml")


def test_runs_list_shows_every_run(watched: dict[str, Any]) -> None:
    result = invoke("runs", "list", watched["dir"])
    assert result.exit_code == 0, result.output
    header, row = result.output.strip().splitlines()
    assert header.split("  ")[0] == "run" and "best val score" in header and "test R@1" in header
    _, vals = read_metrics(watched["run"] / METRICS)
    best = max(vals, key=lambda r: r["val/score"])
    cells = row.split()
    assert cells[:4] == ["image_text", "2", str(best["epoch"]), format_number(best["val/score"])]
    r1 = watched["summary"]["test"]["directions"]["image→text"]["metrics"]["R@1"]
    assert f"image→text {format_number(r1)}" in row
    as_json = json.loads(invoke("runs", "list", watched["dir"], "--json").stdout)
    assert [r["name"] for r in as_json["runs"]] == ["image_text"] and as_json["runs"][0]["epochs"] == 2


def test_runs_compare_prints_the_settings_that_differ(watched: dict[str, Any], trained_model: dict[str, Any],
                                                      tmp_path: Path) -> None:
    png = tmp_path / "both.png"
    result = invoke("runs", "compare", trained_model["dir"], watched["run"], "--png", png)
    assert result.exit_code == 0, result.output
    out = result.output
    settings = out.split("settings that differ (settings.json):\n")[1].split("\n\n")[0].splitlines()
    changed = {line.split()[0]: line.split()[1:] for line in settings[1:]}
    assert changed == {"stage.curriculum.hard_negatives": ["0.0", "0.25"], "stage.train.epochs": ["3", "2"],
                       "stage.train.lr": ["0.001", str(LR)]}
    assert "metrics:" in out and "best val/score" in out and "test image→text R@1" in out
    assert _is_png(png) and f"wrote {png}" in out


def test_runs_compare_refuses_what_is_not_a_run(watched: dict[str, Any], tmp_path: Path) -> None:
    for args, expected in [((tmp_path, watched["run"]), "is neither a run folder"),
                           ((watched["dir"], watched["dir"], "--stage", "nope"), "has no run of stage 'nope'"),
                           ((watched["run"], watched["run"], "--png", tmp_path / "x.jpg"), "--png"),
                           ((tmp_path / "missing",), None)]:
        result = invoke("runs", "compare", *args) if expected else invoke("runs", "list", *args)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
        assert expected is None or expected in result.output
