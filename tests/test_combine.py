"""`data combine`: several real manifests into one, each source's test rows named for its own subset."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.data.combine import combine_manifests
from oneencoder.data.manifest import read_manifest, write_manifest
from oneencoder.errors import OneEncoderError


@pytest.fixture()
def two_sources(stamps: list[dict], tmp_path: Path) -> tuple[Path, Path]:
    first = [s for s in stamps if s["split"] == "test"][:3] + [s for s in stamps if s["split"] == "train"][:3]
    second = [{**s, "id": "copy/" + s["id"], "heldout": "style" if i == 0 else None}
              for i, s in enumerate(s for s in stamps if s["split"] == "test" and s not in first)][:2]
    a, b = tmp_path / "a" / "m.jsonl", tmp_path / "b" / "m.jsonl"
    a.parent.mkdir(), b.parent.mkdir()
    return write_manifest(a, first), write_manifest(b, second)


def test_combine_names_unmarked_test_rows_and_keeps_files(two_sources: tuple[Path, Path], tmp_path: Path):
    a, b = two_sources
    counts = combine_manifests([a, b], tmp_path / "out" / "m.jsonl", names=["tuxpaint", "emoji"])
    rows = read_manifest(tmp_path / "out" / "m.jsonl")
    assert counts == {str(a): {"test": 3, "train": 3}, str(b): {"test": 2}}
    by_id = {r["id"]: r for r in rows}
    assert [by_id[r["id"]]["heldout"] for r in read_manifest(a) if r["split"] == "test"] == ["tuxpaint"] * 3
    assert all(by_id[r["id"]].get("heldout") is None for r in read_manifest(a) if r["split"] == "train")
    assert sorted(by_id[r["id"]]["heldout"] for r in read_manifest(b)) == ["emoji", "style"]  # a set value stays
    assert all(Path(r["image"]).is_file() for r in rows)


def test_combine_refuses_shared_ids_and_bad_names(two_sources: tuple[Path, Path], tmp_path: Path):
    a, _ = two_sources
    with pytest.raises(OneEncoderError, match="ids must be unique"):
        combine_manifests([a, a], tmp_path / "x.jsonl")
    with pytest.raises(OneEncoderError, match="not a safe name"):
        combine_manifests([a], tmp_path / "x.jsonl", names=["../up"])
    assert not (tmp_path / "x.jsonl").exists()


def test_combine_command(two_sources: tuple[Path, Path], tmp_path: Path):
    a, b = two_sources
    out = tmp_path / "c.jsonl"
    result = CliRunner().invoke(app, ["data", "combine", f"{a}=tuxpaint", str(b), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "test 3, train 3" in result.output
    assert {r.get("heldout") for r in read_manifest(out) if r["split"] == "test"} == {"tuxpaint", "style", None}
