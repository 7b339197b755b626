"""Names that become paths, and one writer per model directory (issue 26, items 1 and 5).

A stage name, a modality name or a journal entry never leads a command out of the folder
it owns; a second ``train`` or ``add-modality`` on a model directory stops at once with
one line and leaves the directory byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.errors import ConfigError, OneEncoderError
from oneencoder.features.cache import cache_lock
from oneencoder.model.transaction import JOURNAL, PENDING, recover
from oneencoder.names import path_inside, remove_tree_inside, safe_name
from oneencoder.training.add_modality import add_modality
from oneencoder.training.config import parse_stage
from oneencoder.training.runs import model_writer
from oneencoder.training.stage import run_stage

REPO = Path(__file__).resolve().parent.parent
STAGE_TEXT = (REPO / "stages" / "image_text.toml").read_text(encoding="utf-8")
HOSTILE = ["../..", "../../../x", "", 5, "/abs", "a\x00b", "..", ".hidden", "a/b", "a\\b", "x" * 101, ["a"]]

runner = CliRunner()


def invoke(*args: Any):
    return runner.invoke(app, [str(a) for a in args])


def _assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    text = result.output.strip()
    assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text, text
    for fragment in fragments:
        assert fragment in text, text
    return text


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (the sentinel's parent included when asked)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _stage_with(**stage: Any) -> dict[str, Any]:
    raw = tomllib.loads(STAGE_TEXT)
    raw["stage"].update(stage)
    return raw


# ----- one helper for every name --------------------------------------------------------


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
def test_hostile_stage_names_are_refused_in_one_line(name: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_stage(_stage_with(name=name), "hostile.toml")
    message = str(info.value)
    assert message.startswith("hostile.toml: [stage] name") and "\n" not in message and len(message) < 400


@pytest.mark.parametrize("name", ["../x", "/etc", "", "a\x00b"], ids=repr)
def test_hostile_modality_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=r"\[stage\] modalities"):
        parse_stage(_stage_with(modalities=["image", name], trainable=["projection", "image"]), "hostile.toml")


def test_safe_names_pass_unchanged() -> None:
    for name in ("image_text", "add_audio", "v1.2-final", "A", "x" * 100):
        assert safe_name(name, "name") == name


def test_a_config_built_in_code_is_checked_too(tmp_path: Path) -> None:
    """``run_stage`` on a StageConfig made without parse_stage (the API) checks its names itself."""
    config = parse_stage(_stage_with(name="ok"), "ok.toml")
    config.name = "../.."
    with pytest.raises(ConfigError, match="stage name"):
        run_stage(config, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []  # not even the model folder or its lock was made


@pytest.mark.parametrize("parts", [("..",), ("a", ".."), ("/etc",), ("a/../../x",), ("a\x00",), ()], ids=repr)
def test_path_inside_refuses_paths_that_leave(tmp_path: Path, parts: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError):
        path_inside(tmp_path / "owned", *parts)
    assert path_inside(tmp_path / "owned", "runs", "x") == (tmp_path / "owned" / "runs" / "x").resolve()


def test_remove_tree_inside_unlinks_a_link_without_following_it(tmp_path: Path) -> None:
    owned, outside = tmp_path / "owned", tmp_path / "outside"
    (owned / "runs").mkdir(parents=True)
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    (owned / "runs" / "x").symlink_to(outside, target_is_directory=True)
    remove_tree_inside(owned, "runs", "x")
    assert not (owned / "runs" / "x").exists() and (outside / "keep.txt").read_text() == "precious"
    # A folder on the way that is a link out is refused, not followed.
    (owned / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match="would leave"):
        remove_tree_inside(owned, "escape", "keep.txt")
    assert (outside / "keep.txt").exists()


def test_a_journal_naming_files_outside_moves_nothing(tmp_path: Path) -> None:
    """An edited model directory whose commit journal points outside it: recovery moves nothing there."""
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "victim").write_text("original")
    (tmp_path / f"victim{PENDING}").write_text("planted")
    (model / JOURNAL).write_text(json.dumps({"files": ["../victim"]}))
    recover(model)
    assert (tmp_path / "victim").read_text() == "original"
    assert (tmp_path / f"victim{PENDING}").read_text() == "planted"


# ----- the probe's case: a stage named "../.." deletes nothing ---------------------------


def test_stage_named_dotdot_is_refused_and_the_parent_survives(trained_model: dict, tmp_path: Path) -> None:
    parent = tmp_path / "outputs" / "x"
    model = parent / "model"
    shutil.copytree(trained_model["dir"], model)
    sentinel = parent / "sentinel.txt"
    sentinel.write_text("still here")
    stage = tmp_path / "hostile.toml"
    stage.write_text(STAGE_TEXT.replace('name = "image_text"', 'name = "../.."', 1), encoding="utf-8")
    assert 'name = "../.."' in stage.read_text()
    before = _digests(tmp_path)
    result = invoke("train", "--stage", stage, "--model", model, "--overwrite", "--no-resume", "--device", "cpu")
    _assert_one_line_error(result, "[stage] name", "'../..'")
    assert sentinel.read_text() == "still here"
    assert _digests(tmp_path) == before  # nothing anywhere was written or removed


def test_add_modality_with_a_hostile_name_is_refused(trained_model: dict, small_manifest: Path,
                                                     tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(trained_model["dir"], model)
    before = _digests(tmp_path)
    for name in ("../../x", "/etc/passwd", ""):
        with pytest.raises(ConfigError, match="modality"):
            add_modality(name, model, small_manifest, anchor="text")
    result = invoke("add-modality", "../image_text", "--model", model, "--data", small_manifest, "--anchor", "text")
    _assert_one_line_error(result, "modality", "'../image_text'")
    result = invoke("add-modality", "audio", "--model", model, "--data", small_manifest, "--anchor", "../text")
    _assert_one_line_error(result, "--anchor")
    assert _digests(tmp_path) == before


# ----- one writer per model directory ----------------------------------------------------


def test_a_second_writer_stops_at_once_and_touches_nothing(trained_model: dict, small_manifest: Path,
                                                           small_cache: Path, tmp_path: Path) -> None:
    """While another process holds the model's lock, ``train`` and ``add-modality`` each refuse
    in one line naming the directory and the holder, and every file stays byte-identical."""
    model = tmp_path / "model"
    shutil.copytree(trained_model["dir"], model)
    before = _digests(tmp_path)
    with cache_lock(model):  # the lock a running `train` holds: <model>.lock beside the directory
        locked = _digests(tmp_path)
        result = invoke("train", "--stage", "image_text", "--model", model, "--manifest", small_manifest,
                        "--cache-dir", small_cache, "--epochs", 1, "--device", "cpu", "--overwrite", "--no-resume")
        _assert_one_line_error(result, f"{model} is being written by another oneencoder process "
                                       f"(pid {os.getpid()})", "--model")
        result = invoke("add-modality", "audio", "--model", model, "--data", small_manifest, "--anchor", "text",
                        "--cache-dir", small_cache, "--replace")
        _assert_one_line_error(result, f"{model} is being written", f"(pid {os.getpid()})")
        assert _digests(tmp_path) == locked  # nothing written, removed, or cached
    assert {k: v for k, v in _digests(tmp_path).items() if k != "model.lock"} == before
    assert (tmp_path / "model.lock").read_bytes() == b""  # no stale holder left to name


def test_the_writer_lock_is_reentrant_and_rank_0_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model"
    with model_writer(model):
        with model_writer(model):  # add_modality holds it around run_stage
            pass
        with pytest.raises(OneEncoderError, match="another"), cache_lock(model):
            pass  # while this process writes, nobody else gets it
    with cache_lock(model):  # now another writer holds it
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
        with model_writer(model):  # rank 1 never writes, so it needs no lock
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(OneEncoderError, match="is being written"), model_writer(model):
            pass


def test_a_stage_file_nested_too_deep_is_one_line(tmp_path: Path) -> None:
    """Python's TOML reader recurses per level; 100,000 levels used to end in a RecursionError."""
    deep = "[" * 100_000 + "1" + "]" * 100_000
    stage = tmp_path / "deep.toml"
    stage.write_text(f'[stage]\nname = "deep"\nmodalities = ["image", "text"]\ntrainable = ["projection"]\n'
                     f"x = {deep}\n")
    result = invoke("train", "--stage", str(stage), "--model", str(tmp_path / "model"))
    _assert_one_line_error(result, f"{stage}:5: TOML nested deeper than 64 levels")
    assert not (tmp_path / "model").exists()
