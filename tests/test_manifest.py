"""Manifest reading and writing: row checks, the JSON Schema, path resolution and the data hash."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from oneencoder.data.manifest import (Manifest, manifest_hash, manifest_schema, portable_path, read_manifest,
                                      write_manifest)
from oneencoder.errors import OneEncoderError
from oneencoder.modality import file_fields

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "oneencoder" / "data" / "manifest.schema.json"
GOOD = {"id": "a", "caption": "A badger.", "split": "train"}


def _manifest(tmp_path: Path, *lines: Any, name: str = "pairs.jsonl") -> Path:
    """A manifest whose lines are ``lines`` (dicts as JSON, str/bytes verbatim)."""
    path = tmp_path / name
    data = b""
    for line in lines:
        if isinstance(line, bytes):
            data += line
        elif isinstance(line, str):
            data += line.encode("utf-8")
        else:
            data += json.dumps(line).encode("utf-8")
        data += b"\n"
    path.write_bytes(data)
    return path


# ----- every error names the file, the line and the field --------------------------------------------

BAD_ROWS = [
    ({"id": 12, "caption": "x"}, "field 'id' must be a non-empty string, got 12"),
    ({"id": "", "caption": "x"}, "field 'id' must be a non-empty string, got \"\""),
    ({"id": None}, "field 'id' must be a non-empty string, got null"),
    ({"id": ["a"]}, "field 'id' must be a non-empty string"),
    ({"caption": "no id"}, "field 'id' is missing"),
    ({"id": "b", "split": "dev"}, "field 'split' must be one of train, val, test, got \"dev\""),
    ({"id": "b", "split": None}, "field 'split' must be one of train, val, test"),
    ({"id": "b", "group": 3}, "field 'group' must be a string, got 3"),
    ({"id": "b", "heldout": 1}, "field 'heldout' must be a string or null"),
    ({"id": "b", "image": 5}, "field 'image' must be a string or null, got 5"),
    ({"id": "b", "sound": ["x.ogg"]}, "field 'sound' must be a string or null"),
    ({"id": "b", "caption": [1, 2]}, "field 'caption' must be a string or a list of strings or null"),
    ({"id": "b", "smiles": {"C": 1}}, "field 'smiles' must be a string or null"),
    ({"id": "b", "_index": 3}, "field '_index': keys beginning with '_' are reserved"),
    (["not", "an", "object"], "each line must be a JSON object, got list"),
    ({"id": "a"}, "duplicate id 'a'"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS, ids=[m.split(",")[0][:40] for _, m in BAD_ROWS])
def test_each_bad_row_names_file_line_and_field(tmp_path: Path, row: Any, message: str) -> None:
    path = _manifest(tmp_path, GOOD, "", row)  # the blank line still counts: the bad row is line 3
    with pytest.raises(OneEncoderError) as err:
        read_manifest(path)
    text = str(err.value)
    assert text.startswith(f"{path}:3: ") and message in text, text
    assert "\n" not in text


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = _manifest(tmp_path, GOOD, b'{"id": "b", "caption": "caf\xe9"}')
    with pytest.raises(OneEncoderError, match=re.escape(f"{path}:2: not valid UTF-8 (byte 0xe9")):
        read_manifest(path)


def test_not_json_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(OneEncoderError, match=re.escape(f"{tmp_path / 'pairs.jsonl'}:2: not valid JSON")):
        read_manifest(_manifest(tmp_path, GOOD, '{"id": "b",'))
    with pytest.raises(OneEncoderError, match="has no samples"):
        read_manifest(_manifest(tmp_path, "", "  "))
    with pytest.raises(OneEncoderError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_good_rows_and_old_manifests_without_split(tmp_path: Path) -> None:
    rows = [{"id": "a", "caption": ["A badger.", "A brown badger."], "group": "g", "heldout": None},
            {"id": "b", "caption": None, "smiles": "CCO", "split": "test", "heldout": "object", "extra": [1, {}]},
            {"id": "c", "image": None, "sound": None, "category": 3}]
    records = read_manifest(_manifest(tmp_path, "\ufeff" + json.dumps(rows[0]), *rows[1:]))
    assert [r["split"] for r in records] == ["train", "test", "train"]  # no split: train, as before
    assert records[1]["extra"] == [1, {}] and records[2]["image"] is None


# ----- the schema file agrees with the reader ----------------------------------------------------


def _schema_accepts(schema: dict, row: Any) -> bool:
    """The schema's facts, checked by hand: required, property type/enum/minLength/items, propertyNames."""
    def ok(rule: dict, value: Any) -> bool:
        if "enum" in rule and value not in rule["enum"]:
            return False
        types = rule.get("type")
        types = [types] if isinstance(types, str) else types or []
        py = {"string": str, "null": type(None), "array": list, "object": dict}
        if types and not any(isinstance(value, py[t]) for t in types):
            return False
        if isinstance(value, str) and len(value) < rule.get("minLength", 0):
            return False
        return not (isinstance(value, list) and "items" in rule and not all(ok(rule["items"], v) for v in value))

    if not isinstance(row, dict) or any(k not in row for k in schema["required"]):
        return False
    pattern = re.compile(schema["propertyNames"]["pattern"])
    return all(pattern.search(k) for k in row) and all(ok(schema["properties"][k], v)
                                                       for k, v in row.items() if k in schema["properties"])


SCHEMA_EXAMPLES = [
    ({"id": "a"}, True),
    ({"id": "a", "split": "val", "group": "g", "heldout": "pose", "image": "x.png", "caption": "A cat."}, True),
    ({"id": "a", "caption": ["one", "two"], "smiles": None, "depth": None, "video": "c.mp4"}, True),
    ({"id": "a", "anything": {"nested": [1]}}, True),
    ({"id": ""}, False),
    ({"id": 7}, False),
    ({"split": "train"}, False),
    ({"id": "a", "split": "dev"}, False),
    ({"id": "a", "group": None}, False),
    ({"id": "a", "image": 1}, False),
    ({"id": "a", "caption": [None]}, False),
    ({"id": "a", "_private": 1}, False),
    ("just a string", False),
]


def test_schema_file_is_valid_json_and_shipped() -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert schema == manifest_schema()  # the packaged copy is the file
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["required"] == ["id"] and schema["properties"]["split"]["enum"] == ["train", "val", "test"]
    assert file_fields() <= set(schema["properties"])  # every built-in file field is described


@pytest.mark.parametrize("row, valid", SCHEMA_EXAMPLES, ids=[json.dumps(r)[:40] for r, _ in SCHEMA_EXAMPLES])
def test_schema_and_reader_agree(tmp_path: Path, row: Any, valid: bool) -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert _schema_accepts(schema, row) is valid
    path = _manifest(tmp_path, row)
    if valid:
        assert read_manifest(path)[0]["id"] == row["id"]
    else:
        with pytest.raises(OneEncoderError, match=re.escape(f"{path}:1: ")):
            read_manifest(path)


# ----- paths ------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_manifest_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            stamps: list[dict]) -> None:
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    shutil.copyfile(stamps[0]["image"], data / "imgs" / "a.png")
    path = _manifest(data, {"id": "rel", "image": "imgs/a.png", "caption": "x"},
                     {"id": "abs", "image": stamps[1]["image"]}, {"id": "none", "image": None, "caption": "imgs/a.png"})
    monkeypatch.chdir(tmp_path)  # not the manifest's folder
    records = read_manifest(path)
    assert records[0]["image"] == str(data / "imgs" / "a.png") and os.path.isfile(records[0]["image"])
    assert records[1]["image"] == stamps[1]["image"]  # absolute stays as it is
    assert records[2]["image"] is None and records[2]["caption"] == "imgs/a.png"  # only file fields move
    assert isinstance(records, Manifest) and records.root == data


def test_relative_manifest_path_from_another_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d").mkdir()
    _manifest(tmp_path / "d", {"id": "x", "image": "../x.png"})
    monkeypatch.chdir(tmp_path)
    assert read_manifest(Path("d/pairs.jsonl"))[0]["image"] == str(tmp_path / "x.png")


def test_write_manifest_relative_under_its_folder_else_absolute(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rows = [{"id": "in", "image": str(tmp_path / "m" / "rgb" / "a.png"), "depth": "m/d/a.npz", "caption": "m/x"},
            {"id": "out", "image": "/usr/share/tuxpaint/x.png", "sound": "other/s.ogg", "video": None}]
    write_manifest(tmp_path / "m" / "manifest.jsonl", rows)
    raw = [json.loads(line) for line in (tmp_path / "m" / "manifest.jsonl").read_text().splitlines()]
    assert raw[0] == {"id": "in", "image": "rgb/a.png", "depth": "d/a.npz", "caption": "m/x"}
    assert raw[1] == {"id": "out", "image": "/usr/share/tuxpaint/x.png", "sound": str(tmp_path / "other" / "s.ogg"),
                      "video": None}
    assert portable_path("", tmp_path) == "" and portable_path(None, tmp_path) is None
    back = read_manifest(tmp_path / "m" / "manifest.jsonl")
    assert back[0]["image"] == rows[0]["image"] and back[0]["depth"] == str(tmp_path / "m" / "d" / "a.npz")


# ----- the data hash ---------------------------------------------------------------------------------


def _old_hash(rows: list[dict]) -> str:
    """manifest_hash as it was before paths were resolved: the rows' JSON, as read."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def test_hash_of_absolute_manifests_does_not_move(tmp_path: Path, stamps: list[dict]) -> None:
    path = tmp_path / "manifest.jsonl"
    write_manifest(path, stamps)
    assert [json.loads(line) for line in path.read_text().splitlines()] == stamps  # written unchanged
    records = read_manifest(path)
    assert records == stamps and manifest_hash(records) == manifest_hash(stamps) == _old_hash(stamps)


def test_hash_does_not_depend_on_where_the_folder_lies(tmp_path: Path) -> None:
    rows = [{"id": "a", "image": str(tmp_path / "one" / "a.png"), "caption": "A.", "split": "train"}]
    write_manifest(tmp_path / "one" / "manifest.jsonl", rows)
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    one, two = read_manifest(tmp_path / "one" / "manifest.jsonl"), read_manifest(tmp_path / "two" / "manifest.jsonl")
    assert one[0]["image"] != two[0]["image"] and manifest_hash(one) == manifest_hash(two)
    assert manifest_hash(one) == _old_hash([{**rows[0], "image": "a.png"}])  # the file's content, as written


# ----- dataset builders write manifests that work from any folder ------------------------------------


def test_pybullet_rgbd_manifest_works_from_another_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pybullet")
    work, other = tmp_path / "work", tmp_path / "other"
    work.mkdir(), other.mkdir()
    cli = Path(sys.executable).parent / "oneencoder"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([str(cli), "data", "pybullet-rgbd", "--out", "outputs/rgbd/manifest.jsonl",
                             "--renders", "1"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    manifest = work / "outputs" / "rgbd" / "manifest.jsonl"
    raw = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert all(not os.path.isabs(r["image"]) and r["depth"].startswith("depth/") for r in raw)
    monkeypatch.chdir(other)
    records = read_manifest(manifest)
    assert all(os.path.isabs(r[k]) and os.path.isfile(r[k]) for r in records for k in ("image", "depth"))
