"""The ``oneencoder`` command line, driven in-process with typer's CliRunner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.data.manifest import read_manifest
from oneencoder.fileio import write_jsonl_atomic

runner = CliRunner()


def _leaf_commands(command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    # typer >= 0.20 ships its own click copy, so duck-type groups rather than isinstance(click.Group).
    if getattr(command, "commands", None):
        out = []
        for name, sub in command.commands.items():
            out += _leaf_commands(sub, (*prefix, name))
        return out
    return [prefix]


LEAVES = _leaf_commands(typer.main.get_command(app))


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _assert_user_error(result) -> None:
    """Exit code 2, one ``error:`` line, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    text = result.output.strip()
    assert text.startswith("error: "), text
    assert "\n" not in text, text
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_all_commands_are_found() -> None:
    assert {("data", "tuxpaint"), ("data", "tuxpaint-audio"), ("data", "chemicals"), ("data", "pybullet-rgbd"),
            ("data", "pybullet-video"), ("data", "openclipart"), ("data", "corrupt"), ("cache", "build"), ("train",),
            ("eval",), ("embed",), ("info",),
            ("add-modality",), ("demo",), ("demo-all",)} <= set(LEAVES)


def test_top_level_help_lists_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("data", "cache", "train", "eval", "embed", "info", "demo"):
        assert name in result.output


@pytest.mark.parametrize("path", LEAVES, ids=[" ".join(p) for p in LEAVES])
def test_every_command_help_has_an_example(path: tuple[str, ...]) -> None:
    result = invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert "oneencoder " + " ".join(path) in " ".join(result.output.split())


def test_data_tuxpaint_writes_a_manifest(tmp_path: Path, stamps) -> None:
    out = tmp_path / "sub" / "manifest.jsonl"
    result = invoke("data", "tuxpaint", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and f"stamps={len(stamps)}" in result.output
    assert read_manifest(out) == stamps


def test_data_tuxpaint_audio_sound_only(tmp_path: Path, stamps) -> None:
    out = tmp_path / "audio.jsonl"
    result = invoke("data", "tuxpaint-audio", "--out", out, "--sound-only", "--augment", "0")
    assert result.exit_code == 0, result.output
    assert read_manifest(out) == [r for r in stamps if r["sound"]]


def test_data_pybullet_rgbd_writes_renders_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "rgbd" / "manifest.jsonl"
    result = invoke("data", "pybullet-rgbd", "--out", out, "--renders", "1")
    assert result.exit_code == 0, result.output
    records = read_manifest(out)
    assert len(records) == 17 and {r["heldout"] for r in records if r["split"] == "test"} <= {"pose", "object"}
    assert all(Path(r["depth"]).is_file() and Path(r["image"]).is_file() for r in records)
    again = invoke("data", "pybullet-rgbd", "--out", out, "--renders", "1")
    assert again.exit_code == 0 and read_manifest(out) == records


def test_pybullet_import_banner_stays_off_stdout() -> None:
    import subprocess
    import sys

    code = "from oneencoder.data.sources.pybullet_scenes import pybullet_module; pybullet_module(); print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stdout


def test_data_command_bad_option_is_a_clear_error(tmp_path: Path) -> None:
    result = invoke("data", "pybullet-video", "--out", tmp_path / "v.jsonl", "--clips", "0")
    assert result.exit_code == 2 and "--clips" in result.output


def test_cache_build_command(tmp_path: Path, small_records) -> None:
    rows = [dict(small_records[0]), dict(small_records[1]), {**small_records[2], "caption": ""}]
    manifest = tmp_path / "m.jsonl"
    write_jsonl_atomic(manifest, rows)
    result = invoke("cache", "build", "--manifest", manifest, "--cache-dir", tmp_path / "cache",
                    "--workers", 0, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "image: 3 samples, 0 already cached, 3 encoded, 0 rejected" in result.output
    assert "text: 3 samples, 0 already cached, 2 encoded, 1 rejected" in result.output
    assert str(tmp_path / "cache" / "text.rejects.jsonl") in result.output


def test_info_lists_modalities(trained_model) -> None:
    result = invoke("info", trained_model["dir"])
    assert result.exit_code == 0, result.output
    assert "checksums OK" in result.output
    lines = result.output.splitlines()
    assert any(line.split()[:1] == ["image"] and "efficientnet_lite0" in line for line in lines)
    assert any(line.split()[:1] == ["text"] and "minilm" in line.lower() for line in lines)
    assert "image_text" in result.output and "test image→text" in result.output


def test_info_says_whether_each_backbone_is_present_and_unchanged(trained_model, tmp_path: Path) -> None:
    result = invoke("info", trained_model["dir"])
    assert result.output.count("backbone present, checksum OK") == 2, result.output
    assert "class=oneencoder.modalities.text:TextModality from oneencoder" in result.output
    model = tmp_path / "model"
    shutil.copytree(trained_model["dir"], model)
    meta = json.loads((model / "oneencoder.json").read_text())
    meta["modalities"]["text"]["weights_sha256"] = "0" * 64  # as if other weights were installed now
    meta["modalities"]["image"]["options"]["weights"] = str(tmp_path / "gone.pth")
    (model / "oneencoder.json").write_text(json.dumps(meta))
    result = invoke("info", model)
    assert result.exit_code == 0, result.output
    assert "backbone changed: installed weights sha256" in result.output
    assert "backbone missing: image backbone weights not found" in result.output


def test_train_says_which_split_is_missing(small_records, small_cache, tmp_path: Path) -> None:
    """Without val rows the error names the split and how to assign one, not `cache build`."""
    manifest = tmp_path / "no-val.jsonl"
    write_jsonl_atomic(manifest, [{**r, "split": "train" if r["split"] == "val" else r["split"]} for r in small_records])
    result = invoke("train", "--stage", "image_text", "--manifest", manifest, "--cache-dir", small_cache,
                    "--model", tmp_path / "m", "--epochs", "1")
    _assert_user_error(result)
    assert "need at least 1 cached val pair; the manifest has no 'val' rows" in result.output
    assert "--val" in result.output


def test_eval_prints_recall_and_chance(trained_model, small_manifest, small_cache, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    result = invoke("eval", "--model", trained_model["dir"], "--manifest", small_manifest,
                    "--cache-dir", small_cache, "--split", "test", "--out", out)
    assert result.exit_code == 0, result.output
    assert "R@1" in result.output and "chance" in result.output
    assert "image→text" in result.output and "text→image" in result.output
    saved = json.loads(out.read_text())
    assert saved["split"] == "test"
    # Same model, same data: the numbers the stage reported at the end of training.
    for direction, r in trained_model["summary"]["test"]["directions"].items():
        assert saved["directions"][direction]["metrics"] == pytest.approx(r["metrics"])
        assert saved["directions"][direction]["chance"] == pytest.approx(r["chance"])
        assert 0 < saved["directions"][direction]["gap"]["centroid_distance"] < 2  # unit vectors' centres
    gap = result.output.split("modality gap (cosines) and match threshold", 1)[1]
    assert "centre dist" in gap and "image→text" in gap and "text→image" in gap


def _embed_dim(trained_model) -> int:
    """Output width recorded in the model directory (d_model, plus the language prior if blended)."""
    return json.loads((Path(trained_model["dir"]) / "oneencoder.json").read_text())["embed_dim"]


def test_embed_writes_an_array(trained_model, tmp_path: Path) -> None:
    out = tmp_path / "x.npy"
    result = invoke("embed", "text", "A badger.", "A red apple.", "--model", trained_model["dir"], "--out", out,
                    "--query", "A badger.")
    assert result.exit_code == 0, result.output
    arr = np.load(out)
    d = _embed_dim(trained_model)
    assert arr.shape == (2, d) and arr.dtype == np.float32
    assert np.allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-5)
    assert json.loads((tmp_path / "x.npy.json").read_text()) == {"modality": "text",
                                                                  "inputs": ["A badger.", "A red apple."]}
    ranked = [line for line in result.output.splitlines() if line.strip().startswith(("1.", "2."))]
    assert ranked[0].rstrip().endswith("A badger.")  # the query itself ranks first


def test_embed_from_file(trained_model, small_records, tmp_path: Path) -> None:
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(r["image"] for r in small_records[:2]) + "\n\n")
    out = tmp_path / "img.npy"
    result = invoke("embed", "image", "--from-file", listing, "--model", trained_model["dir"], "--out", out)
    assert result.exit_code == 0, result.output
    assert np.load(out).shape == (2, _embed_dim(trained_model))


def test_train_command(small_manifest, small_cache, tmp_path: Path) -> None:
    model = tmp_path / "model"
    result = invoke("train", "--stage", "image_text", "--model", model, "--manifest", small_manifest,
                    "--cache-dir", small_cache, "--epochs", 1, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "stage image_text: best epoch 1 of 1" in result.output
    assert "held-out test split" in result.output
    assert (model / "oneencoder.json").is_file()
    # Training again into the same directory without --overwrite resumes the finished run.
    again = invoke("train", "--stage", "image_text", "--model", model, "--manifest", small_manifest,
                   "--cache-dir", small_cache, "--epochs", 1, "--device", "cpu")
    assert again.exit_code == 0 and "resuming image_text" in again.output
    # ...but not a run made with other settings: that needs --overwrite.
    changed = invoke("train", "--stage", "image_text", "--model", model, "--manifest", small_manifest,
                     "--cache-dir", small_cache, "--epochs", 2, "--device", "cpu")
    _assert_user_error(changed)
    assert "changed: stage.train.epochs" in changed.output and "--overwrite" in changed.output


# ----- user errors -----------------------------------------------------------------------


def test_nonexistent_model_dir(tmp_path: Path, small_manifest, small_cache) -> None:
    missing = tmp_path / "no-model"
    _assert_user_error(invoke("info", missing))
    _assert_user_error(invoke("embed", "text", "A badger.", "--model", missing, "--out", tmp_path / "x.npy"))
    _assert_user_error(invoke("eval", "--model", missing, "--manifest", small_manifest, "--cache-dir",
                              small_cache, "--out", tmp_path / "e.json"))
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("command", [["train", "--stage", "image_text"], ["add-modality", "audio"]])
def test_commands_that_write_a_model_need_it_named(command: list[str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where outputs/demo/model used to be the silent default
    result = invoke(*command)
    assert result.exit_code == 2 and "--model" in result.output, result.output
    assert not (tmp_path / "outputs").exists()


def test_bad_stage_path(tmp_path: Path) -> None:
    result = invoke("train", "--stage", tmp_path / "nope.toml", "--model", tmp_path / "m")
    _assert_user_error(result)
    assert "nope.toml" in result.output
    _assert_user_error(invoke("cache", "build", "--stage", tmp_path / "nope.toml"))


def test_manifest_with_invalid_json_line(tmp_path: Path, small_records, trained_model) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(small_records[0]) + "\n{not json\n", encoding="utf-8")
    result = invoke("cache", "build", "--manifest", bad, "--cache-dir", tmp_path / "cache", "--workers", 0)
    _assert_user_error(result)
    assert f"{bad}:2" in result.output
    result = invoke("eval", "--model", trained_model["dir"], "--manifest", bad, "--cache-dir",
                    tmp_path / "cache", "--out", tmp_path / "e.json")
    _assert_user_error(result)
    assert not (tmp_path / "cache").exists()  # nothing built from a broken manifest


def test_embed_without_inputs(trained_model, tmp_path: Path) -> None:
    _assert_user_error(invoke("embed", "text", "--model", trained_model["dir"], "--out", tmp_path / "x.npy"))


def test_embed_unreadable_image(trained_model, tmp_path: Path) -> None:
    result = invoke("embed", "image", tmp_path / "missing.png", "--model", trained_model["dir"],
                    "--out", tmp_path / "x.npy")
    _assert_user_error(result)
    assert "missing.png" in result.output


def test_tampered_model_is_a_user_error(trained_model, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(trained_model["dir"], model)
    (model / "projection.safetensors").write_bytes(b"broken")
    result = invoke("info", model)
    _assert_user_error(result)
    assert "projection.safetensors" in result.output


def test_invalid_pool_is_a_user_error(small_manifest, small_cache, tmp_path: Path) -> None:
    stage = tmp_path / "pool.toml"
    text = (Path(__file__).resolve().parent.parent / "stages" / "image_text.toml").read_text()
    stage.write_text(text.replace('pool = "mean"', 'pool = "max"'))
    result = invoke("train", "--stage", stage, "--model", tmp_path / "m", "--manifest", small_manifest,
                    "--cache-dir", small_cache, "--epochs", 1, "--device", "cpu")
    _assert_user_error(result)
