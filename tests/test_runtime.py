"""Backbone runtimes (oneencoder.features.runtime) on real Tux Paint stamps: onnxruntime and bf16
against fp32 PyTorch, the cache fingerprint of each, ``auto``'s remembered choice, and the one
line a modality whose backbone is no graph gets. The image graph is exported once (~30 s)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.errors import CacheMismatchError
from oneencoder.features.cache import FeatureCache, build_cache, cache_dir_for
from oneencoder.features.runtime import (PARITY_COSINE, RuntimeBackbone, export_backbone, machine_key,
                                         runtime_fingerprint)
from oneencoder.modality import create_modality

#: Least cosine of bf16-autocast features to fp32 ones that docs/backbones.md states for the image backbone.
BF16_BOUND = 0.99


def _least_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(1), b.float().flatten(1)).min())


@pytest.fixture(scope="module")
def onnx_home(image_modality, image_backbone, tmp_path_factory) -> Path:
    """A cache root holding the image backbone's exported graph (exported once for this module)."""
    home = tmp_path_factory.mktemp("runtime")
    graph, meta = export_backbone(image_modality, image_backbone, home)
    assert graph.is_file() and meta["fingerprint"] == image_modality.fingerprint()
    return home


@pytest.fixture(scope="module")
def stamp_items(image_modality, small_records) -> list:
    return [image_modality.prepare(r["image"])[1] for r in small_records[:12]]


def test_onnx_features_match_torch_fp32_on_stamps(image_modality, image_backbone, onnx_home, stamp_items) -> None:
    notes: list[str] = []
    onnx = RuntimeBackbone(image_modality, image_backbone, "onnx", "fp32", onnx_home, notes.append)
    got, mask = image_modality.featurize(onnx, stamp_items)
    ref, ref_mask = image_modality.featurize(image_backbone, stamp_items)
    assert onnx.chosen == "onnx fp32" and torch.equal(mask, ref_mask)
    assert _least_cosine(got, ref) >= PARITY_COSINE and onnx.parity >= PARITY_COSINE
    assert notes and notes[0].startswith("image: onnx fp32, least cosine to torch fp32 ")
    one, _ = image_modality.featurize(onnx, stamp_items[:1])  # the graph's batch axis takes 1 too
    assert _least_cosine(one, ref[:1]) >= PARITY_COSINE


def test_bf16_keeps_its_bound_and_its_own_fingerprint(image_modality, image_backbone, stamp_items) -> None:
    bf16 = RuntimeBackbone(image_modality, image_backbone, "torch", "bf16")
    got, _ = image_modality.featurize(bf16, stamp_items[:3])  # bf16 is emulated (slow) on CPUs without it
    ref, _ = image_modality.featurize(image_backbone, stamp_items[:3])
    assert bf16.chosen == "torch bf16 channels_last" and got.dtype == torch.float32
    assert BF16_BOUND <= _least_cosine(got, ref) < 1.0
    assert bf16.parity is not None and bf16.parity >= BF16_BOUND
    plain = image_modality.fingerprint()
    assert runtime_fingerprint(image_modality, "fp32") == plain
    assert runtime_fingerprint(image_modality, "bf16") == {**plain, "precision": "bf16"}


def test_an_onnx_cache_shares_the_fp32_fingerprint_and_a_bf16_one_does_not(
        image_modality, small_records, small_cache, onnx_home) -> None:
    records = small_records[:8]
    notes: list[str] = []
    report = build_cache(image_modality, records, onnx_home, runtime="onnx", progress=False, log=notes.append)
    assert report.encoded == len(records) and any("onnx fp32" in n for n in notes)
    ids = [r["id"] for r in records]
    fp = image_modality.fingerprint()
    with FeatureCache(cache_dir_for(onnx_home, "image"), fp, readonly=True) as onnx, \
            FeatureCache(cache_dir_for(small_cache, "image"), fp, readonly=True) as torch_cache:
        for a, b in zip(onnx.get_many(ids), torch_cache.get_many(ids)):
            assert _least_cosine(a[None], b[None]) >= PARITY_COSINE
    with pytest.raises(CacheMismatchError, match="precision"):  # bf16 features never join fp32 ones
        build_cache(image_modality, records, onnx_home, precision="bf16", progress=False)


def test_auto_measures_once_and_remembers_its_choice(image_modality, image_backbone, onnx_home,
                                                     stamp_items) -> None:
    notes: list[str] = []
    auto = RuntimeBackbone(image_modality, image_backbone, "auto", "fp32", onnx_home, notes.append)
    got, _ = image_modality.featurize(auto, stamp_items[:4])
    ref, _ = image_modality.featurize(image_backbone, stamp_items[:4])
    assert _least_cosine(got, ref) >= PARITY_COSINE
    stored = json.loads((onnx_home / "image.runtime.json").read_text())
    (key, choice), = stored.items()
    assert key.startswith(machine_key()) and choice["path"] == auto.chosen
    assert set(choice["rates"]) == {"torch fp32", "torch fp32 channels_last", "onnx fp32"}
    assert all(c >= PARITY_COSINE for c in choice["cosines"].values())
    assert choice["rates"][auto.chosen] == max(choice["rates"].values())
    assert notes[0].startswith(f"image: runtime auto chose {auto.chosen} (")
    again = RuntimeBackbone(image_modality, image_backbone, "auto", "fp32", onnx_home)
    image_modality.featurize(again, stamp_items[:2])
    assert again.chosen == auto.chosen and again.rates == choice["rates"]  # read back, not measured again


def test_onnx_on_a_backbone_that_is_no_graph_says_so_and_runs_torch(stamps, tmp_path: Path) -> None:
    pytest.importorskip("aisfx")
    audio = create_modality("audio")
    records = [r for r in stamps if r["sound"]][:2]
    notes: list[str] = []
    report = build_cache(audio, records, tmp_path, runtime="onnx", progress=False, log=notes.append)
    assert report.encoded == 2
    assert notes == ["audio: --runtime onnx: its backbone is no exportable graph; it runs on PyTorch"]
    assert not (tmp_path / "audio.onnx").exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_backbone_without_weights_runs_on_every_path(precision: str, tmp_path: Path) -> None:
    """RDKit fingerprints have no parameters or buffers: the runtime must not look for a weight's device."""
    pytest.importorskip("rdkit")
    molecule = create_modality("molecule")
    records = [{"id": f"m{i}", "smiles": s} for i, s in enumerate(["CCO", "c1ccccc1O", "CC(=O)O"])]
    report = build_cache(molecule, records, tmp_path, precision=precision, progress=False)
    assert report.encoded == 3 and not report.rejects


@pytest.mark.parametrize("args, option", [(["--runtime", "tensorrt"], "--runtime 'tensorrt'"),
                                          (["--precision", "fp8"], "--precision 'fp8'"),
                                          (["--runtime", "auto", "--precision", "bf16"], "--runtime auto runs fp32 only")])
def test_cache_build_refuses_an_unknown_runtime_in_one_line(args, option, small_manifest, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["cache", "build", "--manifest", str(small_manifest), "--cache-dir",
                                      str(tmp_path), *args])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and option in lines[0], result.output
    assert not any(tmp_path.iterdir())  # refused before any work


def test_embed_runs_the_backbone_on_onnx_with_torch_parity(trained_model, small_records, onnx_home,
                                                           tmp_path: Path, monkeypatch) -> None:
    """``embed --runtime onnx`` (the path index build and classify share) against the torch path."""
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "runtime").symlink_to(onnx_home)  # the graph exported above, not again
    monkeypatch.setenv("ONEENCODER_HOME", str(tmp_path / "home"))
    files = [r["image"] for r in small_records[:3]]
    out = {}
    for runtime in ("torch", "onnx"):
        out[runtime] = tmp_path / f"{runtime}.npy"
        result = CliRunner().invoke(app, ["embed", "image", *files, "--model", str(trained_model["dir"]),
                                          "--no-cache", "--runtime", runtime, "--out", str(out[runtime])])
        assert result.exit_code == 0, result.output
        assert ("image: onnx fp32, least cosine to torch fp32" in result.output) == (runtime == "onnx")
    a, b = np.load(out["torch"]), np.load(out["onnx"])
    assert a.shape == b.shape and a.shape[0] == 3
    assert float((a * b).sum(1).min()) >= PARITY_COSINE


@pytest.mark.parametrize("command", [["embed", "image", "x.png"], ["classify", "x.png", "--labels", "a,b"],
                                     ["index", "build", "--modality", "image", "--data", "x.jsonl", "--out", "ix"]])
def test_every_extraction_command_refuses_an_unknown_runtime_before_loading(command, trained_model) -> None:
    result = CliRunner().invoke(app, [*command, "--model", str(trained_model["dir"]), "--runtime", "tensorrt"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--runtime 'tensorrt'" in lines[0], result.output
