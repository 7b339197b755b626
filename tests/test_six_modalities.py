"""One model directory with all six modalities, built progressively on small real data,
then loaded and used in a fresh process that is not allowed to open a network socket."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.data.sources.chemicals import chemicals_records
from oneencoder.data.sources.pybullet_rgbd import rgbd_records
from oneencoder.data.sources.pybullet_video import video_records
from oneencoder.fileio import sha256_file, write_jsonl_atomic
from oneencoder.training.add_modality import add_modality

SIX = ["image", "text", "audio", "molecule", "depth", "video"]


def _round_robin_splits(records: list[dict]) -> list[dict]:
    """Every split present even in a tiny set (the real splits hash ids; too few here)."""
    order = ("train", "val", "train", "test")
    return [{**r, "split": order[i % 4], "heldout": None} for i, r in enumerate(records)]


@pytest.fixture(scope="module")
def six_modality_model(trained_model: dict[str, Any], stamps: list[dict],
                       tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("six")
    model = root / "model"
    shutil.copytree(trained_model["dir"], model)
    sounds = [r for r in stamps if r["sound"]]
    sounds = [r for split, n in (("train", 10), ("val", 3), ("test", 3))
              for r in [r for r in sounds if r["split"] == split][:n]]
    rgbd = _round_robin_splits(rgbd_records(root / "rgbd", renders_per_object=4,
                                            objects=("duck", "mug", "soccer_ball"), heldout_objects=(),
                                            progress=False))
    clips = _round_robin_splits(video_records(root / "video", clips_per_combo=2, objects=("sphere", "cube"),
                                              actions=("drops", "spins"), heldout_combos=(), progress=False))
    data = {"audio": sounds, "molecule": chemicals_records(limit=300), "depth": rgbd, "video": clips}
    frozen = {}
    for modality, records in data.items():
        manifest = root / modality / "manifest.jsonl"
        write_jsonl_atomic(manifest, records)
        before = {p.name: sha256_file(p) for p in sorted((model / "adapters").glob("*.safetensors"))}
        before["projection"] = sha256_file(model / "projection.safetensors")
        add_modality(modality, model, manifest, workers=0, progress=False, log=lambda _: None,
                     overrides={"train": {"epochs": 2}})
        after = {p.name: sha256_file(p) for p in sorted((model / "adapters").glob("*.safetensors"))}
        after["projection"] = sha256_file(model / "projection.safetensors")
        frozen[modality] = (before, after)
    inputs = {"text": ["A rubber duck.", "A badger."], "image": [rgbd[0]["image"], stamps[0]["image"]],
              "audio": [sounds[0]["sound"]], "molecule": ["CCO", "c1ccccc1O"], "depth": [rgbd[0]["depth"]],
              "video": [clips[0]["video"], clips[1]["video"]]}
    return {"dir": model, "frozen": frozen, "inputs": inputs}


@pytest.mark.bytes
def test_each_addition_leaves_every_earlier_file_byte_identical(six_modality_model) -> None:
    for modality, (before, after) in six_modality_model["frozen"].items():
        assert {k: v for k, v in after.items() if k != f"{modality}.safetensors"} == before, modality


_FRESH_PROCESS = r"""
import json, socket, sys
def refuse(*args, **kwargs):
    raise RuntimeError("network access attempted")
socket.socket.connect = socket.socket.connect_ex = socket.create_connection = refuse
import oneencoder
m = oneencoder.load(sys.argv[1])
inputs = json.loads(sys.argv[2])
out = {"modalities": m.modalities}
for name, items in inputs.items():
    e = m.encode(name, items)
    out[name] = [list(e.shape), float(e.norm(dim=-1).min()), float(e.norm(dim=-1).max())]
print(json.dumps(out))
"""


def test_load_and_encode_all_six_in_a_fresh_process_without_network(six_modality_model) -> None:
    model, inputs = six_modality_model["dir"], six_modality_model["inputs"]
    result = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(model), json.dumps(inputs)],
                            capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["modalities"] == SIX
    for name, items in inputs.items():
        shape, lo, hi = out[name]
        assert shape[0] == len(items) and shape[1] > 0, name
        assert abs(lo - 1) < 1e-4 and abs(hi - 1) < 1e-4, name  # unit norm


def test_info_lists_six_modalities_backbones_stages_and_metrics(six_modality_model) -> None:
    result = CliRunner().invoke(app, ["info", str(six_modality_model["dir"])])
    assert result.exit_code == 0, result.output
    for name in SIX:
        assert f"  {name} " in result.output
    for stage in ("add_audio", "add_molecule", "add_depth", "add_video"):
        assert stage in result.output
    assert "backbone=timm:tf_efficientnet_lite0" in result.output and "backbone=pypi:aisfx" in result.output
    assert "test depth→image: R@1=" in result.output and "test video→text: R@1=" in result.output
