"""``eval --robustness``: every built-in corruption changes its input and is seeded; corrupted queries,
re-encoded through the real frozen backbone, rank worse than clean ones on the trained session model."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.evaluation.robustness import KEYS, corruption_rng, evaluate_robustness, format_robustness
from oneencoder.modality import create_modality
from oneencoder.training.prepare import prepare_stage

STAMP = Path("/usr/share/tuxpaint/stamps/animals/amphibians/frog")


@pytest.fixture(scope="module")
def inputs() -> dict[str, Any]:
    """One real input per built-in modality that needs no rendering: a stamp's picture and sound, a
    caption, a SMILES."""
    if not STAMP.with_suffix(".ogg").is_file():
        pytest.skip("Tux Paint stamps are not installed")
    return {"image": str(STAMP.with_suffix(".png")), "audio": str(STAMP.with_suffix(".ogg")),
            "text": "A small green frog sits on a wet leaf.", "molecule": "CCN1C=NC2=C1N=CN=C2N"}


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A real pybullet depth render and a real pybullet clip (about a second)."""
    pytest.importorskip("pybullet")
    from oneencoder.data.sources import pybullet_rgbd, pybullet_video

    folder = tmp_path_factory.mktemp("robust")
    depth = pybullet_rgbd.rgbd_records(folder / "rgbd", renders_per_object=1, heldout_objects=(), objects=("duck",),
                                       progress=False)[0]["depth"]
    video = pybullet_video.video_records(folder / "video", progress=False, objects=("cube",), actions=("drops",),
                                         clips_per_combo=1)[0]["video"]
    return {"depth": depth, "video": video}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return a == b


@pytest.mark.parametrize("name", ["image", "audio", "text", "molecule", "depth", "video"])
def test_each_corruption_changes_the_input_and_is_seeded(name: str, request: pytest.FixtureRequest) -> None:
    source = request.getfixturevalue("renders" if name in ("depth", "video") else "inputs")[name]
    modality = create_modality(name)
    raw = modality.load(source)
    clean = modality.preprocess(raw)
    kinds = modality.corruptions()
    assert kinds and all(len(s) >= 2 for s in kinds.values())
    for kind, strengths in kinds.items():
        for strength in strengths:
            first = modality.preprocess(modality.corrupt(raw, kind, strength, corruption_rng("s", kind, strength)))
            again = modality.preprocess(modality.corrupt(raw, kind, strength, corruption_rng("s", kind, strength)))
            assert _same(first, again), (name, kind, strength)
        strongest = modality.corrupt(raw, kind, strengths[-1], random.Random(0))
        assert not _same(modality.preprocess(strongest), clean), (name, kind)
    assert _same(modality.preprocess(raw), clean)  # the loaded input itself is left unchanged


def test_the_rng_depends_on_sample_kind_and_strength() -> None:
    draws = {corruption_rng(*key).random() for key in [("a", "blur", 1.0), ("b", "blur", 1.0), ("a", "noise", 1.0),
                                                       ("a", "blur", 2.0)]}
    assert len(draws) == 4 and corruption_rng("a", "blur", 1).random() == corruption_rng("a", "blur", 1.0).random()


def test_corrupted_images_rank_worse_than_clean(trained_model: dict, small_manifest: Path, small_cache: Path) -> None:
    prepared = prepare_stage(model_dir=trained_model["dir"], manifest=small_manifest, cache_dir=small_cache,
                             build_caches=False)
    out = evaluate_robustness(prepared.model, prepared.modalities, prepared.records, small_cache, "test",
                              only=["image"], progress=False)
    rows = {(r["kind"], r["strength"]): r for r in out["corrupted"] if r["direction"] == "image→text"}
    assert {r["direction"] for r in out["corrupted"]} == {"image→text"}  # text was not corrupted
    clean = rows[("clean", None)]["metrics"]
    assert set(rows[("clean", None)]["chance"]) == set(KEYS)  # chance of the same queries, beside clean
    for kind, strengths in create_modality("image").corruptions().items():
        mildest, strongest = rows[(kind, strengths[0])], rows[(kind, strengths[-1])]
        # 14 test stamps: a one-pixel blur or a tenth occluded moves at most two queries' first hit.
        assert abs(mildest["metrics"]["MRR"] - clean["MRR"]) <= 0.15, (kind, mildest, clean)
        assert strongest["metrics"]["R@1"] <= clean["R@1"], (kind, strongest, clean)
        assert strongest["change"]["MRR"] == pytest.approx(strongest["metrics"]["MRR"] - clean["MRR"])
        assert strongest["n_queries"] == rows[("clean", None)]["n_queries"] == 14 and strongest["n_failed"] == 0
    assert out["dropped"] == []  # the session model holds two modalities: there is nothing to fuse
    table = format_robustness(out)
    assert "image→text" in table and "occlusion 0.5" in table and all(k in table for k in KEYS)


def test_eval_robustness_writes_the_table_into_the_json(trained_model: dict, small_manifest: Path,
                                                        small_cache: Path, tmp_path: Path) -> None:
    path = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", "--model", str(trained_model["dir"]), "--manifest", str(small_manifest),
                                      "--cache-dir", str(small_cache), "--out", str(path), "--robustness",
                                      "--robustness-modalities", "text", "--robustness-limit", "5"])
    assert result.exit_code == 0, result.output
    assert "robustness on the test split" in result.output and "dropout 0.5" in result.output
    saved = json.loads(path.read_text(encoding="utf-8"))
    rows = saved["robustness"]["corrupted"]
    assert {r["direction"] for r in rows} == {"text→image"} and saved["robustness"]["limit"] == 5
    assert [r["kind"] for r in rows] == ["clean", "dropout", "dropout", "dropout"]
    assert all(r["n_queries"] <= 5 for r in rows) and "directions" in saved  # beside the plain eval


def test_an_unknown_robustness_modality_is_one_line(trained_model: dict, small_manifest: Path,
                                                    small_cache: Path) -> None:
    result = CliRunner().invoke(app, ["eval", "--model", str(trained_model["dir"]), "--manifest", str(small_manifest),
                                      "--cache-dir", str(small_cache), "--robustness",
                                      "--robustness-modalities", "sound"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "error: --robustness-modalities: 'sound' is not among the evaluated modalities; choose from image, text"]
