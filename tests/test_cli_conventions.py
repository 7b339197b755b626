"""Habits from every other CLI: --version, --quiet, --no-progress, --json, logs without carriage returns."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

import oneencoder
from oneencoder.cli.main import app
from oneencoder.evaluation.metrics import format_number
from oneencoder.progress import LogLinesBar, configure, progress_bar, status

runner = CliRunner()
CLI = [sys.executable, "-m", "oneencoder.cli.main"]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def _switches_back():
    yield
    configure()  # what one test's --quiet set must not reach the next


def test_version_names_the_installed_distribution() -> None:
    result = invoke("--version")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"oneencoder {metadata.version('oneencoder')} (torch ")
    assert oneencoder.__version__ == metadata.version("oneencoder")


# ----- progress off a terminal ---------------------------------------------------------------


def test_log_bar_writes_whole_lines_and_a_last_one() -> None:
    log = io.StringIO()
    with LogLinesBar(total=5, desc="train", unit="step", file=log, interval=0.0) as bar:
        for i in range(5):
            bar.update(1)
            bar.set_postfix(loss=f"{i:.3f}")
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("train:   0% 0/5") and lines[-1].startswith("train: 100% 5/5")
    assert lines[-1].endswith("loss=4.000]") and all(line.startswith("train: ") for line in lines)


def test_log_bar_keeps_to_its_interval_but_always_says_where_it_ended() -> None:
    log = io.StringIO()
    with LogLinesBar(total=1000, desc="cache image", unit="sample", file=log, interval=3600.0) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2, lines  # the start, then the end: nothing in between within the hour
    assert "0/1000" in lines[0] and "1000/1000" in lines[1]


def test_status_lines_and_bars_follow_the_switches(capsys) -> None:
    configure(quiet=True)
    status("resuming from step 4")
    assert progress_bar(total=3, desc="x", file=io.StringIO()).disable
    configure(progress=False)
    status("resuming from step 5")
    assert progress_bar(total=3, desc="x", file=io.StringIO()).disable
    configure()
    assert not progress_bar(total=3, desc="x", file=io.StringIO()).disable
    assert progress_bar(total=3, desc="x", file=io.StringIO(), enabled=None).disable  # only on a terminal
    assert capsys.readouterr().err == "resuming from step 5\n"


def test_piped_train_log_has_no_carriage_returns(small_manifest, small_cache, tmp_path: Path) -> None:
    """The issue's probe: a piped `train` gave 362 '\\r' updates; now plain lines only."""
    model = tmp_path / "model"
    env = {**os.environ, "ONEENCODER_PROGRESS_INTERVAL": "0"}
    run = subprocess.run([*CLI, "train", "--stage", "image_text", "--model", str(model), "--manifest",
                          str(small_manifest), "--cache-dir", str(small_cache), "--epochs", "2", "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=600)
    log = run.stdout.decode()
    assert run.returncode == 0, log
    assert "\r" not in log and "\x1b" not in log
    steps = [line for line in log.splitlines() if line.startswith("train: ")]
    assert len(steps) >= 3 and steps[-1].startswith("train: 100% "), steps
    assert "held-out test split" in log

    # --quiet: the results alone; --no-progress: the status lines stay.
    again = ["train", "--stage", "image_text", "--model", model, "--manifest", small_manifest,
             "--cache-dir", small_cache, "--epochs", 2, "--device", "cpu"]
    quiet = invoke("--quiet", *again)
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "" and "held-out test split" in quiet.stdout
    plain = invoke("--no-progress", *again)
    assert plain.exit_code == 0, plain.output
    assert "resuming image_text" in plain.stderr and "train: " not in plain.stderr


# ----- --json and one way of rounding ----------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(trained_model, small_manifest, small_cache, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("eval") / "eval.json"
    result = invoke("eval", "--model", trained_model["dir"], "--manifest", small_manifest, "--cache-dir", small_cache,
                    "--split", "test", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    return {"stdout": result.stdout, "stderr": result.stderr, "file": out}


def test_eval_json_is_the_results_file(evaluated) -> None:
    printed = json.loads(evaluated["stdout"])
    assert printed == json.loads(evaluated["file"].read_text())
    assert set(printed["directions"]) == {"image→text", "text→image"}
    assert f"wrote {evaluated['file']}" in evaluated["stderr"]


def test_info_json_holds_the_record_and_each_backbone(trained_model) -> None:
    result = invoke("info", trained_model["dir"], "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["checksums"] == "OK" and set(record["modalities"]) == {"image", "text"}
    assert record["backbones"] == {"image": "backbone present, checksum OK", "text": "backbone present, checksum OK"}
    assert record["stages"][0]["test"]["image→text"]["R@1"] == pytest.approx(
        trained_model["summary"]["test"]["directions"]["image→text"]["metrics"]["R@1"], abs=1e-12)


def test_info_and_eval_show_the_same_digits(trained_model, small_manifest, small_cache, evaluated) -> None:
    """`info` once showed R@5 0.559 where `eval` showed 0.560: a value rounded twice."""
    info = invoke("info", trained_model["dir"]).stdout
    info_row = info.split("test image→text:")[1].splitlines()[0]
    from_info = dict(re.findall(r"(R@1|R@5|R@10|MRR)=([0-9.]+)", info_row))
    table = invoke("eval", "--model", trained_model["dir"], "--manifest", small_manifest, "--cache-dir", small_cache,
                   "--split", "test", "--out", evaluated["file"])
    assert table.exit_code == 0, table.output
    header = next(line for line in table.stdout.splitlines() if line.startswith("direction"))
    row = next(line for line in table.stdout.splitlines() if line.startswith("image→text"))
    from_eval = dict(zip(header.split()[1:], re.findall(r"([0-9.]+) \(chance", row)))
    metrics = json.loads(evaluated["stdout"])["directions"]["image→text"]["metrics"]
    assert from_info == from_eval == {k: format_number(metrics[k]) for k in ("R@1", "R@5", "R@10", "MRR")}
