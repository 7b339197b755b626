"""Modality plugins: a modality defined in one file outside the package, used as a user would.

The example plugin ``examples/sketch`` (one module, ``oneencoder_sketch.py``) is made
importable the two ways docs/extending.md shows, and every command runs in a fresh
process through the installed ``oneencoder`` script:

* ``PYTHONPATH=examples/sketch`` plus ``--plugin oneencoder_sketch`` (or ``[stage] plugins``)
  for ``add-modality``; then ``eval``, ``embed`` and ``oneencoder.load(dir).encode`` with no
  flag at all, because the model directory records ``oneencoder_sketch:Sketch``;
* an installed distribution: a folder on ``PYTHONPATH`` holding the module and a
  ``oneencoder_sketch-0.1.0.dist-info`` (what ``pip install`` writes, and all that
  ``importlib.metadata`` reads), so the entry point is found without ``--plugin``.

Without the module, a user gets one line naming the class and the distribution to install.
The data is the session's 64 real Tux Paint stamps and its short Stage-1 model (copied,
so other tests never see the added modality).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "sketch"
CLI = Path(sys.executable).with_name("oneencoder")  # the console script pip installed
CLASS = "oneencoder_sketch:Sketch"

pytestmark = pytest.mark.slow

# These tests need a user without the plugin; `pip install -e examples/sketch` into this
# venv would make it importable everywhere.
_needs_absent_plugin = pytest.mark.skipif(
    importlib.util.find_spec("oneencoder_sketch") is not None,
    reason="oneencoder_sketch is installed in this environment; the tests need a user without it")


def _env(pythonpath: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def _cli(*args: str | Path, pythonpath: Path | None, cwd: Path) -> subprocess.CompletedProcess:
    """``oneencoder ARGS`` in a fresh process, as typed in a shell."""
    command = [str(CLI)] if CLI.is_file() else [sys.executable, "-m", "oneencoder.cli.main"]
    return subprocess.run([*command, *map(str, args)], cwd=cwd, env=_env(pythonpath), capture_output=True,
                          text=True, timeout=300)


def _python(code: str, *args: str | Path, pythonpath: Path | None, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=_env(pythonpath),
                          capture_output=True, text=True, timeout=300)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _copy_model(trained_model: dict, dest: Path) -> Path:
    """A private copy of the session's Stage-1 model (its resumable runs are not part of it)."""
    shutil.copytree(trained_model["dir"], dest, ignore=shutil.ignore_patterns("runs"))
    return dest


def _sketch_meta(model: Path) -> dict:
    return json.loads((model / "oneencoder.json").read_text(encoding="utf-8"))["modalities"]["sketch"]


def _fake_install(site: Path) -> Path:
    """``site`` as pip leaves it after installing examples/sketch: the module and its dist-info."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    site.mkdir(parents=True)
    shutil.copy(EXAMPLE / "oneencoder_sketch.py", site)
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project["entry-points"]
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for group, eps in groups.items()))
    # RECORD is how importlib.metadata maps the module to its distribution.
    files = ["oneencoder_sketch.py", *(f"{info.name}/{f}" for f in ("METADATA", "entry_points.txt", "RECORD"))]
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))
    return site


# ----- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sketch_data(small_manifest: Path, small_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/manifest.jsonl`` written by the example's own script, and ``<root>/cache``.

    The cache starts as a copy of the session's (its caption features are the anchor's); the
    sketch features each test adds go to this copy only.
    """
    root = tmp_path_factory.mktemp("sketch")
    _ok(subprocess.run([sys.executable, str(EXAMPLE / "make_manifest.py"), str(small_manifest),
                        str(root / "manifest.jsonl")], capture_output=True, text=True, timeout=60))
    shutil.copytree(small_cache, root / "cache")
    return root


@pytest.fixture(scope="module")
def sketch_inputs(sketch_data: Path) -> list[str]:
    rows = [json.loads(line) for line in (sketch_data / "manifest.jsonl").read_text().splitlines()]
    return [rows[0]["sketch"], rows[1]["sketch"]]


@pytest.fixture(scope="module")
def sketch_model(sketch_data: Path, trained_model: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage 1 plus sketches, added with PYTHONPATH and --plugin (the documented command)."""
    model = _copy_model(trained_model, tmp_path_factory.mktemp("with-sketch") / "model")
    out = _ok(_cli("--plugin", "oneencoder_sketch", "add-modality", "sketch", "--model", model, "--anchor", "text",
                   "--data", sketch_data / "manifest.jsonl", "--epochs", "3",
                   pythonpath=EXAMPLE, cwd=sketch_data))
    assert "added sketch (aligned to text)" in out and "sketch→text" in out
    return model


# ----- PYTHONPATH + --plugin -------------------------------------------------------------------------


@_needs_absent_plugin
def test_model_records_the_plugin_class(sketch_model: Path) -> None:
    info = _sketch_meta(sketch_model)
    assert info["class"] == CLASS
    # Only on PYTHONPATH, not installed: no distribution to name.
    assert info["distribution"] is None and info["distribution_version"] is None
    assert info["record_key"] == "sketch" and info["feature_dim"] == 10 and info["max_tokens"] == 17


def test_eval_without_plugin_flag(sketch_model: Path, sketch_data: Path, tmp_path: Path) -> None:
    out = _ok(_cli("eval", "--model", sketch_model, "--manifest", sketch_data / "manifest.jsonl",
                   "--cache-dir", sketch_data / "cache", "--out", tmp_path / "eval.json",
                   pythonpath=EXAMPLE, cwd=tmp_path))
    assert "sketch→text" in out and "text→sketch" in out
    directions = json.loads((tmp_path / "eval.json").read_text())["directions"]
    assert {"sketch→text", "text→sketch"} <= set(directions)


def test_embed_and_load_encode_without_plugin_flag(sketch_model: Path, sketch_inputs: list[str],
                                                   tmp_path: Path) -> None:
    _ok(_cli("embed", "sketch", *sketch_inputs, "--model", sketch_model, "--out", tmp_path / "e.npy",
             pythonpath=EXAMPLE, cwd=tmp_path))
    embedded = np.load(tmp_path / "e.npy")
    code = ("import json, sys, oneencoder; m = oneencoder.load(sys.argv[1]); "
            "print(json.dumps(m.encode('sketch', sys.argv[2:]).tolist()))")
    encoded = np.asarray(json.loads(_ok(_python(code, sketch_model, *sketch_inputs, pythonpath=EXAMPLE,
                                                cwd=tmp_path)).splitlines()[-1]))
    assert embedded.shape == encoded.shape and embedded.shape[0] == 2
    np.testing.assert_allclose(np.linalg.norm(encoded, axis=1), 1.0, atol=1e-4)
    # `embed` takes these inputs' features from the cache the model trained on (fp16), `encode` runs the backbone
    np.testing.assert_allclose(embedded, encoded, atol=1e-4)


def test_eval_without_plugin_flag_resolves_relative_paths(sketch_model: Path, sketch_data: Path,
                                                          tmp_path: Path) -> None:
    """A manifest with paths relative to its folder works from any current folder."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rows = [json.loads(line) for line in (sketch_data / "manifest.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "test"]
    for i, row in enumerate(rows):
        link = data / "images" / f"{i}{Path(row['sketch']).suffix}"
        link.symlink_to(row["sketch"])
        row["sketch"] = f"images/{link.name}"
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copytree(sketch_data / "cache" / "text", data / "cache" / "text")  # only sketches are new
    _ok(_cli("eval", "--model", sketch_model, "--manifest", data / "manifest.jsonl", "--cache-dir", data / "cache",
             "--out", tmp_path / "eval.json", pythonpath=EXAMPLE, cwd=tmp_path))
    rejects = (data / "cache" / "sketch.rejects.jsonl").read_text()
    assert rejects.strip() == "", rejects[:500]


# ----- installed distribution (entry point), and a user without it ---------------------------------------


@_needs_absent_plugin
def test_installed_plugin_needs_no_flag_and_its_absence_is_one_line(sketch_data: Path, trained_model: dict,
                                                                     sketch_inputs: list[str],
                                                                     tmp_path: Path) -> None:
    site = _fake_install(tmp_path / "site")
    model = _copy_model(trained_model, tmp_path / "model")
    # No --plugin and no --anchor: the entry point finds the class, its spec names the anchor.
    out = _ok(_cli("add-modality", "sketch", "--model", model, "--data", sketch_data / "manifest.jsonl",
                   "--epochs", "1", "--workers", "0", pythonpath=site, cwd=tmp_path))
    assert "added sketch (aligned to text)" in out
    info = _sketch_meta(model)
    assert (info["class"], info["distribution"], info["distribution_version"]) == (CLASS, "oneencoder-sketch", "0.1.0")

    # A module of that name inside the model directory must never be imported.
    trap = model / "oneencoder_sketch.py"
    trap.write_text("open(__file__ + '.imported', 'w').close()\nraise SystemExit('imported from the model dir')\n")
    result = _cli("eval", "--model", model, "--manifest", sketch_data / "manifest.jsonl",
                  "--cache-dir", sketch_data / "cache", pythonpath=None, cwd=model)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert CLASS in lines[0] and "oneencoder-sketch==0.1.0" in lines[0], lines[0]
    assert not Path(f"{trap}.imported").exists()

    # The API: the model still loads and embeds what is installed; sketch is the same one line.
    code = ("import sys, oneencoder; m = oneencoder.load(sys.argv[1]); print(m.modalities); "
            "print(tuple(m.encode('text', ['A badger.']).shape))\n"
            "try:\n    m.encode('sketch', [sys.argv[2]])\nexcept oneencoder.OneEncoderError as e:\n    print(repr(str(e)))")
    out = _ok(_python(code, model, sketch_inputs[0], pythonpath=None, cwd=tmp_path)).splitlines()
    assert "'sketch'" in out[0] and out[1].startswith("(1, ")
    message = ast.literal_eval(out[2])  # the repr printed above
    assert "\n" not in message and CLASS in message and "oneencoder-sketch==0.1.0" in message


# ----- [stage] plugins ----------------------------------------------------------------------------------


@_needs_absent_plugin
def test_stage_file_plugins_key(sketch_data: Path, trained_model: dict, tmp_path: Path) -> None:
    stage = EXAMPLE / "sketch.toml"
    assert tomllib.loads(stage.read_text())["stage"]["plugins"] == ["oneencoder_sketch"]
    model = _copy_model(trained_model, tmp_path / "model")
    args = ("add-modality", "sketch", "--stage", stage, "--model", model, "--data", sketch_data / "manifest.jsonl",
            "--epochs", "1", "--workers", "0")
    # Not importable: one line naming the stage file's key and the module.
    result = _cli(*args, pythonpath=None, cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "[stage] plugins" in result.stderr and "oneencoder_sketch" in result.stderr
    out = _ok(_cli(*args, pythonpath=EXAMPLE, cwd=tmp_path))
    assert "added sketch (aligned to text)" in out
    assert _sketch_meta(model)["class"] == CLASS


# ----- the example modality itself (in a subprocess: importing it here would register it for every test) ----

_UNIT = """
import json, sys
from pathlib import Path
import torch
import oneencoder_sketch as s
from oneencoder.errors import ConfigError, SampleError

m = s.Sketch()
out = {"fingerprint": m.fingerprint(), "other": s.Sketch(cells=2).fingerprint()}
items = [m.prepare(p)[1] for p in sys.argv[2:4]]
tokens, mask = m.featurize(m.load_backbone(), items)
out["shape"], out["mask"] = list(tokens.shape), bool(mask.all())
out["difficulty"] = m.difficulty(None, tokens[0])
tmp = Path(sys.argv[1])
(tmp / "corrupt.png").write_bytes(b"not a png")
errors = {}
for name, source in {"missing": tmp / "none.png", "corrupt": tmp / "corrupt.png"}.items():
    try:
        m.prepare(source)
    except SampleError as e:
        errors[name] = str(e)
try:
    s.Sketch(cells="4")
except ConfigError as e:
    errors["option"] = str(e)
out["errors"] = errors
print(json.dumps(out))
"""


def test_sketch_modality_tokens_errors_and_fingerprint(sketch_inputs: list[str], tmp_path: Path) -> None:
    out = json.loads(_ok(_python(_UNIT, tmp_path, *sketch_inputs, pythonpath=EXAMPLE, cwd=tmp_path)))
    assert out["shape"] == [2, 17, 10] and out["mask"]  # cells^2 + 1 tokens of bins + 1
    fp, other = out["fingerprint"], out["other"]
    assert (fp["feature_dim"], fp["max_tokens"], fp["preprocess_version"]) == (10, 17, "sketch-v1")
    assert other["max_tokens"] == 5 and other["weights_sha256"] != fp["weights_sha256"]
    assert 0.0 < out["difficulty"]["ink"] < 1.0 and out["difficulty"]["orientation_entropy"] > 0.0
    errors = out["errors"]
    assert "none.png" in errors["missing"] and "not found" in errors["missing"]
    assert "corrupt.png" in errors["corrupt"] and "cannot decode" in errors["corrupt"]
    assert "cells" in errors["option"]
