"""Progressive alignment: adding a modality trains only its adapter; everything earlier is untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import oneencoder
from oneencoder.cli.main import app
from oneencoder.fileio import sha256_file, write_jsonl_atomic
from oneencoder.training.add_modality import add_modality

pytestmark = pytest.mark.bytes  # compares outputs byte for byte (docs/reliability.md)

runner = CliRunner()
FROZEN_FILES = ("projection.safetensors", "adapters/image.safetensors", "adapters/text.safetensors")


@pytest.fixture(scope="module")
def sound_stamps(stamps) -> list[dict]:
    """Stamps that have image, caption and sound, in every split (about 134 exist)."""
    quota = {"train": 30, "val": 8, "test": 8}
    taken = {k: 0 for k in quota}
    out = []
    for rec in stamps:
        if rec["sound"] and rec["caption"] and taken[rec["split"]] < quota[rec["split"]]:
            out.append(rec)
            taken[rec["split"]] += 1
    assert all(taken[k] >= 4 for k in quota), taken
    return out


@pytest.fixture(scope="module")
def stage1_dir(sound_stamps, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("progressive")
    manifest = root / "manifest.jsonl"
    write_jsonl_atomic(manifest, sound_stamps)
    common = ["--manifest", str(manifest), "--cache-dir", str(root / "cache")]
    assert runner.invoke(app, ["cache", "build", "--stage", "image_text", "--workers", "0", *common]).exit_code == 0
    result = runner.invoke(app, ["train", "--stage", "image_text", "--model", str(root / "model"), "--epochs", "2",
                                 *common])
    assert result.exit_code == 0, result.output
    return root, manifest


def test_add_modality_leaves_earlier_parts_byte_identical(stage1_dir, sound_stamps) -> None:
    root, manifest = stage1_dir
    model = root / "model"
    before = {f: sha256_file(model / f) for f in FROZEN_FILES}
    m = oneencoder.load(model)
    text_in = ["A badger.", "A red fire truck."]
    image_in = [sound_stamps[0]["image"], sound_stamps[1]["image"]]
    text_before, image_before = m.encode("text", text_in), m.encode("image", image_in)

    result = runner.invoke(app, ["add-modality", "audio", "--model", str(model), "--anchor", "text",
                                 "--data", str(manifest), "--cache-dir", str(root / "cache"), "--epochs", "3",
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "audio→text" in result.output and "audio→image" in result.output  # emergent pair is reported

    assert {f: sha256_file(model / f) for f in FROZEN_FILES} == before
    after = oneencoder.load(model)
    assert after.modalities == ["image", "text", "audio"]
    assert torch.equal(after.encode("text", text_in), text_before)  # bitwise
    assert torch.equal(after.encode("image", image_in), image_before)
    audio = after.encode("audio", [sound_stamps[0]["sound"]])
    assert audio.shape == (1, after.model.embed_dim)
    assert [s["name"] for s in after.meta["stages"]] == ["image_text", "add_audio"]

    # Rerunning the same command resumes the finished run: nothing changes.
    audio_file = model / "adapters" / "audio.safetensors"
    audio_sha = sha256_file(audio_file)
    args = ["add-modality", "audio", "--model", str(model), "--data", str(manifest),
            "--cache-dir", str(root / "cache"), "--epochs", "3", "--workers", "0"]
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert sha256_file(audio_file) == audio_sha
    # Other settings never resume the old run (that would report a stale model as the new one).
    changed = runner.invoke(app, [*args[:-4], "--epochs", "4", "--workers", "0"])
    assert changed.exit_code == 2 and "changed: stage.train.epochs" in changed.output and "--replace" in changed.output
    settings = model / "runs" / "add_audio" / "settings.json"
    kept = settings.read_text()
    settings.unlink()  # a run made before runs recorded their settings
    legacy = runner.invoke(app, args)
    assert legacy.exit_code == 2 and "older oneencoder" in legacy.output and "cannot be resumed" in legacy.output
    settings.write_text(kept)
    assert sha256_file(audio_file) == audio_sha
    # Without its run state (e.g. a copied model), retraining an existing modality needs --replace.
    shutil.rmtree(model / "runs" / "add_audio")
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "--replace" in refused.output
    replaced = runner.invoke(app, [*args, "--replace"])
    assert replaced.exit_code == 0, replaced.output
    assert (model / "runs" / "add_audio" / "metrics.jsonl").is_file()  # it trained again...
    assert sha256_file(audio_file) == audio_sha  # ...from the state a first add starts from: the same adapter
    assert {f: sha256_file(model / f) for f in FROZEN_FILES} == before
    # The demos' rule: a changed stage starts over on rerun instead of failing.
    summary = add_modality("audio", model, manifest, anchor="text", cache_dir=root / "cache", workers=0,
                           overrides={"train": {"epochs": 4}}, restart_if_changed=True, progress=False)
    assert summary["epochs_run"] == 4  # a fresh 4-epoch run, not the old 3-epoch one resumed
    assert json.loads((model / "runs" / "add_audio" / "settings.json").read_text())["stage"]["train"]["epochs"] == 4
    assert {f: sha256_file(model / f) for f in FROZEN_FILES} == before


def test_adding_molecules_keeps_every_earlier_file(stage1_dir, tmp_path: Path) -> None:
    from oneencoder.data.sources.chemicals import chemicals_records

    root, _ = stage1_dir
    model = tmp_path / "model"
    shutil.copytree(root / "model", model, ignore=shutil.ignore_patterns("runs"))
    frozen = [f for f in FROZEN_FILES + ("adapters/audio.safetensors",) if (model / f).exists()]
    before = {f: sha256_file(model / f) for f in frozen}
    text_before = oneencoder.load(model).encode("text", ["ethanol"])
    manifest = tmp_path / "chem.jsonl"
    write_jsonl_atomic(manifest, chemicals_records(limit=600))
    result = runner.invoke(app, ["add-modality", "molecule", "--model", str(model), "--data", str(manifest),
                                 "--cache-dir", str(tmp_path / "cache"), "--epochs", "2", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "text→molecule" in result.output
    assert {f: sha256_file(model / f) for f in frozen} == before
    after = oneencoder.load(model)
    assert "molecule" in after.modalities
    assert torch.equal(after.encode("text", ["ethanol"]), text_before)
    mol = after.encode("molecule", ["CCO", "c1ccccc1"])
    assert mol.shape == (2, after.model.embed_dim)
    assert torch.allclose(mol.norm(dim=-1), torch.ones(2), atol=1e-5)
