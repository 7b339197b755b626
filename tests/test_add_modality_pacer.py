"""An add-modality stage with a real curriculum (a non-random pacer) runs end to end.

The stage is a copy of the shipped ``stages/audio.toml`` with only ``[curriculum]`` added.
A non-random pacer needs the difficulty table of the (audio, text) pairs, which reads
the anchor's feature cache: that must be the cache of the model's own text modality
(its recorded options), not of the stage file's defaults.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.fileio import sha256_file, write_jsonl_atomic
from oneencoder.modality import create_modality
from oneencoder.training.curriculum.difficulty import DifficultyTable, difficulty_path
from oneencoder.training.curriculum.pacers import list_pacers

REPO = Path(__file__).resolve().parent.parent
AUDIO_STAGE = REPO / "stages" / "audio.toml"
FROZEN_FILES = ("projection.safetensors", "adapters/image.safetensors", "adapters/text.safetensors")
runner = CliRunner()
pytestmark = [pytest.mark.slow, pytest.mark.bytes]  # trains a Stage-1 model, then adds audio


@pytest.fixture(scope="module")
def sound_manifest(stamps: list[dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real Tux Paint stamps that have a caption and a sound, in every split."""
    quota = {"train": 30, "val": 8, "test": 8}
    taken = {k: 0 for k in quota}
    records = []
    for rec in stamps:
        if rec["sound"] and rec["caption"] and taken[rec["split"]] < quota[rec["split"]]:
            # Without the image field only audio and text are cached (the emergent audio-image
            # pair is test_add_modality's subject); this keeps the test quick.
            records.append({**rec, "image": None})
            taken[rec["split"]] += 1
    assert all(taken[k] >= 4 for k in quota), taken
    path = tmp_path_factory.mktemp("sounds") / "manifest.jsonl"
    write_jsonl_atomic(path, records)
    return path


# "phases" is block pacing (difficulty blocks added one per phase), what the issue calls "blocks".
@pytest.mark.parametrize("pacer,options", [("phases", "{ blocks = 3, start = 0.34, full_at = 0.5 }")])
def test_add_modality_with_curriculum_pacer(pacer: str, options: str, trained_model: dict[str, Any],
                                            sound_manifest: Path, tmp_path: Path) -> None:
    assert pacer in list_pacers() and pacer != "random"
    stage = tmp_path / "audio_curriculum.toml"
    assert "[curriculum]" not in AUDIO_STAGE.read_text()
    stage.write_text(AUDIO_STAGE.read_text() + f'\n[curriculum]\npacer = "{pacer}"\npacer_options = {options}\n')
    model = tmp_path / "model"
    shutil.copytree(trained_model["dir"], model, ignore=shutil.ignore_patterns("runs"))
    before = {f: sha256_file(model / f) for f in FROZEN_FILES}
    cache = tmp_path / "cache"

    result = runner.invoke(app, ["add-modality", "audio", "--stage", str(stage), "--model", str(model),
                                 "--data", str(sound_manifest), "--cache-dir", str(cache), "--epochs", "2",
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "audio→text" in result.output

    summary = json.loads((model / "runs" / "add_audio" / "test.json").read_text())
    assert summary["epochs_run"] == 2 and "audio→text" in summary["test"]["directions"]
    meta = json.loads((model / "oneencoder.json").read_text())
    assert [s["name"] for s in meta["stages"]] == ["image_text", "add_audio"]
    assert meta["stages"][-1]["config"]["curriculum"]["pacer"] == pacer
    assert {f: sha256_file(model / f) for f in FROZEN_FILES} == before

    # The difficulty table was computed on the model's own text features (its recorded
    # options), which differ from what the stage file alone would give.
    table = DifficultyTable.load(difficulty_path(cache, ("audio", "text")))
    text_fp = table.meta["fingerprints"]["text"]
    recorded = meta["modalities"]["text"]
    assert text_fp["options"] == recorded["options"]
    assert {k: text_fp[k] for k in ("backbone", "weights_sha256", "feature_dim", "max_tokens")} == \
        {k: recorded[k] for k in ("backbone", "weights_sha256", "feature_dim", "max_tokens")}
    assert create_modality("text").options != recorded["options"]  # the check above means something
    assert table.meta["fingerprints"]["audio"]["feature_dim"] == meta["modalities"]["audio"]["feature_dim"]
    assert len(table) == meta["stages"][-1]["n_train"]
