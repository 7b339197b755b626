"""Hostile files (issue 26, items 7-9): each ends in a per-sample reject or one clear line.

* ids LMDB cannot key (over :data:`MAX_ID_BYTES` UTF-8 bytes, or a lone surrogate): a reject
  in ``data import`` and in ``cache build``, which finishes the other samples;
* a CSV cell over :data:`MAX_CELL_CHARS`: that row's reject, not the import's end;
* JSON nested past :data:`MAX_JSON_DEPTH` in a manifest, a ``.jsonl`` table or
  ``oneencoder.json``: one line naming the file and line, never ``RecursionError``;
* ``export onnx --opset`` outside what the exporter writes: one line, no ``.onnx`` left;
  an opset inside is what the written graph declares;
* a plugin that raises on import: one line naming the module and the exception, the
  traceback only under ``--debug`` or ``ONEENCODER_DEBUG=1``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.data.manifest import MAX_ID_BYTES, read_manifest
from oneencoder.data.table_import import MAX_CELL_CHARS, import_table
from oneencoder.errors import ConfigError, OneEncoderError, SampleError
from oneencoder.features.cache import FeatureCache, build_cache, cache_dir_for, read_rejects, rejects_path
from oneencoder.fileio import MAX_JSON_DEPTH
from oneencoder.training.config import load_stage

REPO = Path(__file__).resolve().parent.parent
DEEP = "[" * 100_000  # far past Python's recursion limit: json.loads alone raises RecursionError


def one_error_line(result) -> str:
    """The CLI's one ``error:`` line (exit code 2, no traceback); returns it."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ----- ids that cannot key the feature cache --------------------------------------------------


def test_import_rejects_ids_over_the_key_limit_and_lone_surrogates(tmp_path: Path) -> None:
    """Multi-byte characters count in bytes: 250 x 'é' (500 bytes) passes, 251 (502) does not."""
    table = _jsonl(tmp_path / "t.jsonl", [
        json.dumps({"id": "é" * 250, "caption": "A badger."}),
        json.dumps({"id": "é" * 251, "caption": "A cat."}),
        '{"id": "fox\\udc80", "caption": "A fox."}',
        json.dumps({"id": "ok", "caption": "A dog."}),
    ])
    report = import_table(table, tmp_path / "m.jsonl", ["text=caption"], id_col="id", progress=False)
    assert [r["id"] for r in report.samples] == ["é" * 250, "ok"]
    reasons = {r["line"]: r["reason"] for r in report.rejects}
    assert f"is 502 bytes in UTF-8; ids are limited to {MAX_ID_BYTES} bytes" in reasons[2]
    assert "lone" in reasons[3] and "not valid UTF-8" in reasons[3]
    # The rejects file holds the lone surrogate as an escape, and reads back.
    rows = [json.loads(line) for line in report.rejects_path.read_text(encoding="utf-8").splitlines()]
    assert rows[1]["id"] == "fox\udc80"


def test_cache_build_rejects_unkeyable_ids_and_caches_the_rest(text_modality, tmp_path: Path) -> None:
    long_id = "x" * (MAX_ID_BYTES + 1)
    records = [{"id": "a-badger", "caption": "A badger."}, {"id": long_id, "caption": "A cat."},
               {"id": "fox\udc80", "caption": "A fox."}, {"id": "a-dog", "caption": "A dog."}]
    report = build_cache(text_modality, records, tmp_path, progress=False)
    assert report.encoded == 2 and report.total == 4
    assert f"is {MAX_ID_BYTES + 1} bytes in UTF-8" in report.rejects[long_id]
    assert "lone surrogate" in report.rejects["fox\udc80"]
    assert set(read_rejects(rejects_path(tmp_path, "text"))) == {long_id, "fox\udc80"}
    with FeatureCache(cache_dir_for(tmp_path, "text"), text_modality.fingerprint(), readonly=True) as cache:
        assert cache.ids() == {"a-badger", "a-dog"}
        with pytest.raises(SampleError, match=rf"^id 'x{{40}}'\.\.\. \(501 characters\) is {MAX_ID_BYTES + 1} bytes"):
            cache.get(long_id)
        with pytest.raises(SampleError, match="lone surrogate"):
            cache.get_many(["fox\udc80"])
    # A rerun finds everything up to date and keeps the same two rejects.
    again = build_cache(text_modality, records, tmp_path, progress=False)
    assert again.encoded == 0 and again.cached_before == 2 and set(again.rejects) == {long_id, "fox\udc80"}


def test_a_modality_name_that_climbs_is_no_cache_folder(tmp_path: Path) -> None:
    for name in ("..", "../x", "/etc", ""):
        with pytest.raises(ConfigError, match="modality name"):
            cache_dir_for(tmp_path, name)


# ----- manifests with lone surrogates and deep nesting -------------------------------------------


def test_manifest_with_a_lone_surrogate_id_is_one_printable_line(tmp_path: Path) -> None:
    manifest = _jsonl(tmp_path / "m.jsonl", [json.dumps({"id": "a", "caption": "A cat."}),
                                             '{"id": "b\\udc80", "caption": "A dog."}'])
    with pytest.raises(OneEncoderError) as err:
        read_manifest(manifest)
    message = str(err.value)
    assert message.startswith(f"{manifest}:2: field 'id' holds a lone surrogate")
    message.encode("utf-8")  # printable: the message quotes no surrogate itself


def test_manifest_id_over_the_key_limit_reads_and_is_left_to_cache_build(tmp_path: Path) -> None:
    """The batch completes: ``cache build`` rejects that one sample (above), training skips it."""
    manifest = _jsonl(tmp_path / "m.jsonl", [json.dumps({"id": "y" * 600, "caption": "A cat."}),
                                             json.dumps({"id": "b", "caption": "A dog."})])
    assert [len(r["id"]) for r in read_manifest(manifest)] == [600, 1]


def test_deeply_nested_manifest_line_is_one_line_in_the_cli(tmp_path: Path) -> None:
    manifest = _jsonl(tmp_path / "m.jsonl", [json.dumps({"id": "a", "caption": "A cat."}),
                                             '{"id": "b", "caption": ' + DEEP])
    result = CliRunner().invoke(app, ["cache", "build", "--manifest", str(manifest),
                                      "--cache-dir", str(tmp_path / "cache")])
    line = one_error_line(result)
    assert line == f"error: {manifest}:2: JSON nested deeper than {MAX_JSON_DEPTH} levels of arrays/objects (the limit)"
    # At the limit it is only a wrong type: the ordinary one-line refusal of that field.
    deepest = "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1)  # with the row's object: the limit
    at_limit = _jsonl(tmp_path / "ok.jsonl", ['{"id": "a", "x": ' + deepest + ', "caption": [[]]}'])
    with pytest.raises(OneEncoderError, match="field 'caption' must be"):
        read_manifest(at_limit)


def test_deeply_nested_jsonl_table_row_is_a_reject(tmp_path: Path) -> None:
    table = _jsonl(tmp_path / "t.jsonl", [json.dumps({"caption": "A badger."}), '{"caption": ' + DEEP,
                                          '{"caption": "A dog.", "x": ' + "{\"a\": " * 5000 + "1" + "}" * 5000 + "}"])
    report = import_table(table, tmp_path / "m.jsonl", ["text=caption"], progress=False)
    assert len(report.samples) == 1
    assert [(r["line"], r["reason"]) for r in report.rejects] == [
        (2, f"JSON nested deeper than {MAX_JSON_DEPTH} levels of arrays/objects (the limit)"),
        (3, f"JSON nested deeper than {MAX_JSON_DEPTH} levels of arrays/objects (the limit)")]


def test_deeply_nested_oneencoder_json_is_one_line_naming_its_line(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "oneencoder.json").write_text('{\n  "format_version": 1,\n  "x": ' + DEEP + "\n", encoding="utf-8")
    line = one_error_line(CliRunner().invoke(app, ["info", str(model)]))
    assert line.startswith(f"error: {model / 'oneencoder.json'}:3: JSON nested deeper than {MAX_JSON_DEPTH} levels")


# ----- CSV cells ---------------------------------------------------------------------------------


def test_csv_cell_over_the_limit_is_that_rows_reject(tmp_path: Path) -> None:
    """Python's csv stops at 131,072 characters; here the import goes on, and says why."""
    table = tmp_path / "t.csv"
    table.write_text("caption,note\n"
                     f"A badger.,{'n' * MAX_CELL_CHARS}\n"           # at the limit: kept
                     f"\"{'c' * (MAX_CELL_CHARS + 1)}\",x\n"          # one over: that row's reject
                     "A dog.,x\n", encoding="utf-8")
    report = import_table(table, tmp_path / "m.jsonl", ["text=caption"], progress=False)
    assert [r["caption"] for r in report.samples] == ["A badger.", "A dog."]
    assert len(report.samples[0]["note"]) == MAX_CELL_CHARS
    assert [(r["line"], r["field"]) for r in report.rejects] == [(3, "caption")]
    assert report.rejects[0]["reason"] == f"{MAX_CELL_CHARS + 1:,} characters in one cell; cells are limited to 131,072"
    # An unclosed quote makes the rest of the file one cell: over the limit, the reason says so.
    long_tail = tmp_path / "tail.csv"
    long_tail.write_text("caption\nA dog.\n\"open" + "\nmore" * 30_000 + "\n", encoding="utf-8")
    tail = import_table(long_tail, tmp_path / "m2.jsonl", ["text=caption"], progress=False)
    assert "an unclosed quote makes the rest of the file one cell" in tail.rejects[0]["reason"]


# ----- ONNX opsets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", ["7", "17", "26", "999"])
def test_export_refuses_opsets_it_cannot_write(opset: str, tmp_path: Path) -> None:
    """Refused before the model is read (so no model is needed), and nothing is written."""
    out = tmp_path / "onnx"
    result = CliRunner().invoke(app, ["export", "onnx", "--model", str(tmp_path / "no-model"), "--out", str(out),
                                      "--opset", opset])
    assert one_error_line(result) == (f"error: --opset {opset}: the ONNX exporter writes opsets 18 to 25 "
                                      "(default 18); pick one in that range")
    assert not out.exists()


def test_export_out_naming_a_file_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.write_text("keep me\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["export", "onnx", "--model", str(tmp_path / "no-model"), "--out", str(out)])
    assert one_error_line(result) == f"error: --out {out} is a file; name a folder for the .onnx files and export.json"
    assert out.read_text(encoding="utf-8") == "keep me\n"


def test_exported_graph_declares_the_opset_asked_for(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from oneencoder.apps.export import export_head
    from oneencoder.model.parts import AdapterConfig, ProjectionConfig, build_model

    torch.manual_seed(0)
    model = build_model(ProjectionConfig(d_model=16, layers=1, heads=2), {"c": {"feature_dim": 8, "max_tokens": 3}},
                        {"c": AdapterConfig(positions=False)}).eval()
    entry = export_head(model, "c", 8, 3, tmp_path / "c.onnx", opset=20)
    graph = onnx.load(str(tmp_path / "c.onnx"))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [20] == [entry["opset"]]
    assert entry["max_abs_diff"] < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["c.onnx"]  # no temporary file left


# ----- plugins that raise on import -------------------------------------------------------------------


@pytest.fixture
def raising_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module that raises ValueError when imported (a fresh name per test: failed imports are not cached)."""
    name = f"hostile_plugin_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text("raise ValueError('boom at import')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_plugin_raising_on_import_is_one_line_naming_it(raising_plugin: str, monkeypatch) -> None:
    monkeypatch.delenv("ONEENCODER_DEBUG", raising=False)
    line = one_error_line(CliRunner().invoke(app, ["--plugin", raising_plugin, "info", "x"]))
    assert line.startswith(f"error: --plugin {raising_plugin}: importing it raised ValueError: boom at import (")
    assert "--debug" in line


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_plugins_traceback(how: str, raising_plugin: str) -> None:
    args, env = (["--debug"], {}) if how == "flag" else ([], {"ONEENCODER_DEBUG": "1"})
    result = CliRunner().invoke(app, [*args, "--plugin", raising_plugin, "info", "x"], env=env)
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.output
    assert f"{raising_plugin}.py\", line 1" in result.output and "ValueError: boom at import" in result.output
    assert result.output.rstrip().splitlines()[-1].startswith(f"error: --plugin {raising_plugin}: importing it")


def test_stage_plugin_raising_on_import_is_one_config_error(raising_plugin: str, tmp_path: Path) -> None:
    text = (REPO / "stages" / "image_text.toml").read_text(encoding="utf-8")
    stage = tmp_path / "s.toml"
    stage.write_text(text.replace("[stage]\n", f"[stage]\nplugins = [\"{raising_plugin}\"]\n", 1), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_stage(stage)
    assert str(err.value).startswith(f"{stage}: [stage] plugins {raising_plugin}: importing it raised ValueError")
    assert isinstance(err.value.__cause__, ValueError)  # kept for --debug
