"""Hostile input to indexes and `search` (issue 26, items 4, 8 and 9): scores that cannot lie,
strict JSON, and one line for an IVF index of 3 vectors, an ``--out`` that is a file, an
edited ``index.json`` or a ``save`` onto a file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from oneencoder.apps.index import IVF_MIN_VECTORS, VectorIndex, load_index
from oneencoder.cli.main import app
from oneencoder.errors import OneEncoderError
from oneencoder.fileio import sha256_file, write_jsonl_atomic

runner = CliRunner()
SPACE = {"projection": "p", "adapter": "a", "backbone": "b", "preprocess_version": "v1", "embed_dim": 8}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    text = result.output.strip()
    assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text, text
    return text


def strict_loads(text: str):
    """``json.loads`` that fails on NaN and Infinity, as strict JSON parsers (and browsers) do."""
    def refuse(name: str):
        raise AssertionError(f"{name} in JSON output")

    return json.loads(text, parse_constant=refuse)


def unit(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ----- the index itself ----------------------------------------------------------------------


def test_hits_keep_rank_score_and_row_apart_from_user_fields() -> None:
    vectors = unit(5)
    items = [{"id": f"v{i}", "score": 42.0, "rank": 99, "row": -7, "item": "mine"} for i in range(5)]
    found = VectorIndex(vectors, items, "text", SPACE).search(vectors[3], k=5)
    hits = found.hits[0]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert [h["score"] for h in hits] == pytest.approx(found.scores[0].tolist())
    assert [h["row"] for h in hits] == found.rows[0].tolist() and hits[0]["row"] == 3
    assert hits[0]["score"] == pytest.approx(1.0) and hits[0]["id"] == "v3"
    assert hits[0]["item"] == items[3]  # the user's fields, whole and apart
    hits[0]["item"]["score"] = 0.0
    assert items[3]["score"] == 42.0  # a copy: a caller cannot edit the index through a hit


def test_ivf_below_its_minimum_is_one_line_and_the_minimum_works(tmp_path: Path) -> None:
    with pytest.raises(OneEncoderError, match=f"an IVF index needs at least {IVF_MIN_VECTORS} vectors, got 3"):
        VectorIndex(unit(3), [{"id": str(i)} for i in range(3)], "text", SPACE, kind="ivf")
    with pytest.raises(OneEncoderError, match="nlist=500: an IVF index of 64 vectors takes 1 to 32 lists"):
        VectorIndex(unit(64), [{"id": str(i)} for i in range(64)], "text", SPACE, kind="ivf", nlist=500)
    ivf = VectorIndex(unit(IVF_MIN_VECTORS), [{"id": str(i)} for i in range(IVF_MIN_VECTORS)], "text", SPACE,
                      kind="ivf")
    assert ivf.search(unit(IVF_MIN_VECTORS)[5], 3).rows[0, 0] == 5


def test_save_onto_a_file_is_one_line_and_leaves_the_file(tmp_path: Path) -> None:
    index = VectorIndex(unit(2), [{"id": "a"}, {"id": "b"}], "text", SPACE)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    with pytest.raises(OneEncoderError, match="is a file, not an index folder"):
        index.save(blocker)
    with pytest.raises(OneEncoderError, match="a part of the path is a file"):
        index.save(blocker / "ix")
    assert blocker.read_text() == "keep me"


def test_non_finite_items_and_vectors_are_refused_naming_the_row(tmp_path: Path) -> None:
    for bad in (math.nan, math.inf, -math.inf):
        index = VectorIndex(unit(2), [{"id": "a"}, {"id": "b", "score": bad}], "text", SPACE)
        with pytest.raises(OneEncoderError, match=r"index item 'b' \(row 1\): field 'score' is .*JSON cannot hold"):
            index.save(tmp_path / "ix")
    assert not (tmp_path / "ix").exists()  # refused before the folder was made
    vectors = unit(3)
    vectors[2, 1] = np.nan
    with pytest.raises(OneEncoderError, match="index vector of row 2 holds NaN"):
        VectorIndex(vectors, [{"id": str(i)} for i in range(3)], "text", SPACE)


def _saved(tmp_path: Path, kind: str = "exact", n: int = 4) -> Path:
    items = [{"id": f"v{i}", "caption": f"caption {i}\u2028second line"} for i in range(n)]  # U+2028: not a line end
    VectorIndex(unit(n), items, "text", SPACE, kind=kind).save(tmp_path / "ix")
    assert load_index(tmp_path / "ix").items == items
    return tmp_path / "ix"


@pytest.mark.parametrize("edit, message", [
    ({"kind": "ivf"}, "kind 'ivf' needs ann.faiss"),
    ({"kind": "auto"}, "kind 'auto' is not 'exact' or 'ivf'"),
    ({"kind": ["exact"]}, "is not 'exact' or 'ivf'"),
    ({"count": "four"}, "count four is not a number of vectors"),
    ({"count": 5}, "says 5 vectors, the files hold 4 vectors and 4 items"),
    ({"files": {"vectors.safetensors": "x", "items.jsonl": "y", "../../etc/passwd": "z"}}, "unknown file"),
])
def test_an_edited_index_json_is_one_line(tmp_path: Path, edit: dict, message: str) -> None:
    ix = _saved(tmp_path)
    meta = json.loads((ix / "index.json").read_text())
    (ix / "index.json").write_text(json.dumps({**meta, **edit}))
    with pytest.raises(OneEncoderError, match=message) as caught:
        load_index(ix, verify=False)
    assert "\n" not in str(caught.value)


def test_edited_ivf_settings_and_nan_items_are_refused(tmp_path: Path) -> None:
    ix = _saved(tmp_path, kind="ivf", n=IVF_MIN_VECTORS)
    meta = json.loads((ix / "index.json").read_text())
    (ix / "index.json").write_text(json.dumps({**meta, "ann": {**meta["ann"], "nprobe": "many"}}))
    with pytest.raises(OneEncoderError, match=r"its ann settings \(nprobe, refine\)"):
        load_index(ix)
    (ix / "index.json").write_text(json.dumps(meta))
    assert load_index(ix).kind == "ivf"

    # An items.jsonl holding NaN with its checksum recomputed (written by another tool): refused.
    lines = (ix / "items.jsonl").read_text().split("\n")
    lines[2] = '{"id": "v2", "score": NaN}'
    (ix / "items.jsonl").write_text("\n".join(lines))
    meta["files"]["items.jsonl"] = sha256_file(ix / "items.jsonl")
    (ix / "index.json").write_text(json.dumps(meta))
    with pytest.raises(OneEncoderError, match=r"items.jsonl:3: not a JSON item \(NaN is not a JSON value\)"):
        load_index(ix)
    (ix / "index.json").write_text('{"format_version": 1, "kind": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(OneEncoderError, match="index.json: unreadable JSON"):
        load_index(ix)


# ----- the CLI on a trained model ------------------------------------------------------------


@pytest.fixture(scope="module")
def captions(trained_model, small_records, tmp_path_factory) -> dict:
    """Two text indexes of the same 10 captions: plain, and with lying and non-finite columns."""
    root = tmp_path_factory.mktemp("hostile-index")
    plain = [{"id": r["id"], "caption": r["caption"]} for r in small_records[:10]]
    lying = [{**r, "score": 42.0, "rank": 0, "row": -1} for r in plain]
    lying += [{"id": "nan/score", "caption": "A cat.", "score": math.nan},
              {"id": "inf/weight", "caption": "A dog.", "weight": math.inf}]
    write_jsonl_atomic(root / "plain.jsonl", plain)
    (root / "lying.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lying))  # json writes NaN, Infinity
    (root / "lying.jsonl").write_text((root / "lying.jsonl").read_text().replace("Infinity", "1e999"))
    out = {"root": root, "rows": plain}
    for name in ("plain", "lying"):
        result = invoke("index", "build", "--model", trained_model["dir"], "--modality", "text",
                        "--data", root / f"{name}.jsonl", "--out", root / name, "--device", "cpu", "--no-progress")
        assert result.exit_code == 0, result.output
        out[name] = result.output
    return out


def test_non_finite_manifest_values_are_rejects_naming_the_field(captions) -> None:
    root = captions["root"]
    assert "10 text vectors (exact), 2 rejected" in captions["lying"]
    lines = (root / "lying" / "rejects.jsonl").read_text().splitlines()
    rejects = {r["id"]: r["reason"] for r in map(json.loads, lines)}
    tail = "which JSON cannot hold; use a finite number or leave it out"
    assert rejects == {"nan/score": f"field 'score' is nan, {tail}", "inf/weight": f"field 'weight' is inf, {tail}"}
    assert len(load_index(root / "lying")) == 10


def test_a_score_column_changes_no_printed_or_json_score(captions) -> None:
    root, query = captions["root"], captions["rows"][4]["caption"]
    printed, payload = {}, {}
    for name in ("plain", "lying"):
        result = invoke("search", "--index", root / name, "--text", query, "--k", 5, "--json", "--device", "cpu")
        assert result.exit_code == 0, result.output
        payload[name] = strict_loads(result.output)["results"][0]["hits"]
        text = invoke("search", "--index", root / name, "--text", query, "--k", 5, "--device", "cpu")
        assert text.exit_code == 0, text.output
        printed[name] = [line for line in text.output.splitlines() if line.startswith("  ")]
    plain, lying = payload["plain"], payload["lying"]
    assert [(h["rank"], h["row"], h["id"]) for h in lying] == [(h["rank"], h["row"], h["id"]) for h in plain]
    assert [h["score"] for h in lying] == pytest.approx([h["score"] for h in plain], abs=1e-6)
    assert lying[0]["id"] == captions["rows"][4]["id"] and lying[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert all(h["item"]["score"] == 42.0 and h["item"]["rank"] == 0 for h in lying)  # kept, apart
    assert printed["lying"] == printed["plain"] and "+42.000" not in "\n".join(printed["lying"])
    assert printed["lying"][0].startswith("    1. +1.000  ")


def test_index_build_and_search_refuse_bad_out_kind_and_as_in_one_line(captions, trained_model, tmp_path) -> None:
    model, data = trained_model["dir"], captions["root"] / "plain.jsonl"

    def build(out, *more):
        return invoke("index", "build", "--model", model, "--modality", "text", "--data", data, "--out", out,
                      "--device", "cpu", "--no-progress", *more)

    assert "--kind ivf needs at least 64 inputs, got 10" in one_line_error(build(tmp_path / "ivf", "--kind", "ivf"))
    assert not (tmp_path / "ivf").exists()  # refused before anything was written
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    assert "is a file, not an index folder" in one_line_error(build(blocker))
    assert "a part of the path is a file" in one_line_error(build(blocker / "ix"))
    assert blocker.read_text() == "keep me"
    mine = tmp_path / "my-project"
    (mine / ".build").mkdir(parents=True)
    (mine / ".build" / "notes.txt").write_text("not the index's")
    assert ".build is not an interrupted index build" in one_line_error(build(mine, "--no-resume"))
    (mine / ".build" / "notes.txt").unlink()
    (mine / ".build").rmdir()
    (mine / "README").write_text("mine")
    assert "is a folder of other files, not an index" in one_line_error(build(mine))
    assert (mine / "README").read_text() == "mine" and sorted(p.name for p in mine.iterdir()) == ["README"]

    edited = captions["root"] / "plain"
    meta = json.loads((edited / "index.json").read_text())
    try:
        (edited / "index.json").write_text(json.dumps({**meta, "kind": "ivf"}))
        text = one_line_error(invoke("search", "--index", edited, "--text", "A cat.", "--device", "cpu"))
        assert "kind 'ivf' needs ann.faiss" in text and "rebuild the index" in text
    finally:
        (edited / "index.json").write_text(json.dumps(meta))
    stamp = next(Path("/usr/share/tuxpaint/stamps").rglob("*.png"))
    text = one_line_error(invoke("search", "--index", edited, "--file", stamp, "--as", "text", "--device", "cpu"))
    assert "--as text: not a modality of this model that reads files (it has image)" in text
