"""Vector indexes and ``oneencoder index build`` / ``oneencoder search`` on real Tux Paint stamps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

import oneencoder
from oneencoder.apps import index as index_module
from oneencoder.apps import index_build
from oneencoder.apps.index import IndexMismatchError, VectorIndex, exact_topk, load_index
from oneencoder.cli.main import app
from oneencoder.fileio import sha256_file, write_jsonl_atomic

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    text = result.output.strip()
    assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text, text
    return text


def _clustered(n: int, d: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ----- the index itself ------------------------------------------------------------------


def test_exact_topk_in_blocks_equals_a_full_sort(monkeypatch) -> None:
    g = torch.Generator().manual_seed(0)
    gallery, queries = torch.randn(1000, 16, generator=g), torch.randn(7, 16, generator=g)
    monkeypatch.setattr(index_module, "_SCORE_BLOCK", 7 * 64)  # 16 blocks of 64 gallery rows
    scores, rows = exact_topk(queries, gallery, 10)
    full = queries @ gallery.T
    expected = full.argsort(dim=1, descending=True)[:, :10]
    assert torch.equal(rows, expected)
    assert torch.allclose(scores, full.gather(1, expected))
    assert exact_topk(queries, gallery[:3], 10)[1].shape == (7, 3)  # k above N gives N


def test_ivf_index_reaches_its_recall_and_round_trips_without_pickle(tmp_path: Path) -> None:
    both = _clustered(20_200, 32, 200, 0.35, seed=0)
    vectors, queries = both[:20_000], both[20_000:]  # queries: fresh points of the same clusters
    items = [{"id": f"v{i}"} for i in range(len(vectors))]
    space = {"projection": "p", "adapter": "a", "backbone": "b", "preprocess_version": "v1", "embed_dim": 32}
    ivf = VectorIndex(vectors, items, "image", space, kind="ivf")
    info = ivf.ann_info
    assert info["nlist"] == 128 and info["tuned_recall@10"] >= 0.95 and 1 <= info["nprobe"] <= 128
    exact = VectorIndex(vectors, items, "image", space, kind="exact").search(queries, 10)
    found = ivf.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.rows.tolist(), exact.rows.tolist())])
    assert recall >= 0.9, recall
    assert (np.diff(found.scores, axis=1) <= 1e-6).all()  # best first
    assert found.hits[0][0] == {"rank": 1, "score": pytest.approx(float(found.scores[0, 0])),
                                "row": int(found.rows[0, 0]), "id": f"v{found.rows[0, 0]}",
                                "item": {"id": f"v{found.rows[0, 0]}"}}

    ivf.save(tmp_path / "ix")
    names = sorted(p.name for p in (tmp_path / "ix").iterdir())
    assert names == ["ann.faiss", "index.json", "items.jsonl", "vectors.safetensors"]
    for name in names:
        assert not (tmp_path / "ix" / name).read_bytes().startswith(b"\x80")  # no pickle protocol header
    again = load_index(tmp_path / "ix")
    assert again.kind == "ivf" and again.ann_info == info
    np.testing.assert_array_equal(again.search(queries, 10).rows, found.rows)
    assert np.array_equal(load_file(str(tmp_path / "ix" / "vectors.safetensors"))["vectors"], vectors)

    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert meta["files"]["ann.faiss"] == sha256_file(tmp_path / "ix" / "ann.faiss")
    (tmp_path / "ix" / "items.jsonl").write_text('{"id": "tampered"}\n')
    with pytest.raises(oneencoder.OneEncoderError, match="items.jsonl: sha256 does not match"):
        load_index(tmp_path / "ix")


def test_auto_kind_switches_to_ann_above_the_threshold(monkeypatch) -> None:
    vectors = _clustered(400, 8, 10, 0.3, seed=0)
    items = [{"id": str(i)} for i in range(400)]
    monkeypatch.setattr(index_module, "EXACT_LIMIT", 399)
    assert VectorIndex(vectors, items, "text", {}).kind == "ivf"
    assert VectorIndex(vectors[:399], items[:399], "text", {}).kind == "exact"
    with pytest.raises(oneencoder.OneEncoderError, match="do not fit an index of 8-wide"):
        VectorIndex(vectors, items, "text", {}).search(np.zeros((1, 9)), 3)


# ----- the Python API on a trained model ----------------------------------------------------


@pytest.fixture(scope="module")
def model(trained_model):
    return oneencoder.load(trained_model["dir"], device="cpu")


def test_model_index_finds_each_image_first_and_refuses_another_model(model, small_records, tmp_path) -> None:
    paths = [r["image"] for r in small_records[:8]]
    idx = model.index("image", paths)
    assert len(idx) == 8 and idx.kind == "exact" and idx.ids == paths
    result = idx.search(model.encode("image", paths[:2]), k=3)
    assert [hits[0]["item"]["input"] for hits in result.hits] == paths[:2]  # each image is its own nearest neighbour
    assert np.allclose(result.scores[:, 0], 1.0, atol=1e-4)
    text_hits = idx.search(model.encode("text", [small_records[0]["caption"]]), k=8).hits[0]
    assert sorted(h["item"]["input"] for h in text_hits) == sorted(paths)  # any modality queries it

    idx.save(tmp_path / "ix")
    load_index(tmp_path / "ix").check_model(model.meta, model.model_dir)
    other = json.loads(json.dumps(model.meta))
    other["files"]["projection.safetensors"] = "f" * 64
    with pytest.raises(IndexMismatchError, match="built with another model: its projection"):
        load_index(tmp_path / "ix").check_model(other, "other-model")


# ----- the CLI ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(trained_model, small_records, bad_records, tmp_path_factory) -> dict:
    """``index build`` over 12 real stamps plus a corrupt and a missing image."""
    root = tmp_path_factory.mktemp("index-cli")
    rows = small_records[:12] + [r for r in bad_records if r["id"] != "bad/empty-caption"]
    manifest = root / "manifest.jsonl"
    write_jsonl_atomic(manifest, rows)
    out = root / "ix"
    result = invoke("index", "build", "--model", trained_model["dir"], "--modality", "image", "--data", manifest,
                    "--out", out, "--device", "cpu", "--no-progress")
    return {"result": result, "out": out, "rows": rows, "root": root}


def test_index_build_writes_vectors_items_checksums_and_rejects(built, trained_model) -> None:
    result, out = built["result"], built["out"]
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 12 image vectors (exact), 2 rejected (see {out / 'rejects.jsonl'})" in result.output
    rejects = {r["id"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert "cannot decode" in rejects["bad/corrupt-png"] and "not found" in rejects["bad/missing-file"]
    meta = json.loads((out / "index.json").read_text())
    model_meta = json.loads((trained_model["dir"] / "oneencoder.json").read_text())
    assert meta["space"]["projection"] == model_meta["files"]["projection.safetensors"]
    assert meta["space"]["adapter"] == model_meta["files"]["adapters/image.safetensors"]
    assert meta["count"] == 12 and meta["model"] == str(Path(trained_model["dir"]).resolve())
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert [it["id"] for it in items] == [r["id"] for r in built["rows"][:12]]
    assert items[0]["input"] == built["rows"][0]["image"] and items[0]["caption"] == built["rows"][0]["caption"]
    assert not (out / ".build").exists()
    _one_line_error(invoke("index", "build", "--model", trained_model["dir"], "--modality", "image",
                           "--data", built["root"] / "manifest.jsonl", "--out", out))  # exists: --overwrite


def test_search_json_and_text_output(built) -> None:
    rows = built["rows"]
    result = invoke("search", "--index", built["out"], "--text", rows[3]["caption"], "--k", 5, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    hits = payload["results"][0]["hits"]
    assert payload["query"] == {"modality": "text", "input": rows[3]["caption"]} and len(hits) == 5
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5] and all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    assert {h["id"] for h in hits} <= {r["id"] for r in rows}

    result = invoke("search", "--index", built["out"], "--index", built["out"], "--file", rows[5]["image"], "--k", 2)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"image query: {rows[5]['image']}"
    assert sum(line.strip().startswith(f"1. +1.000  {rows[5]['id']}") for line in lines) == 2  # in both indexes


def test_a_composed_query_is_the_weighted_sum_of_its_parts(built, trained_model) -> None:
    rows = built["rows"]
    m = oneencoder.load(trained_model["dir"])
    image, caption = rows[5]["image"], rows[9]["caption"]
    parts = [("image", image, 1.0), ("text", caption, 0.5)]
    expected = torch.nn.functional.normalize(m.encode("image", [image]) + 0.5 * m.encode("text", [caption]), dim=-1)
    assert torch.allclose(m.compose(parts), expected, atol=1e-5)
    assert torch.allclose(m.compose([("text", caption)]), m.encode("text", [caption]), atol=1e-6)
    with pytest.raises(oneencoder.OneEncoderError, match="cancel out"):
        m.compose([("text", caption), ("text", caption, -1.0)])
    with pytest.raises(oneencoder.OneEncoderError, match="weight"):
        m.compose([("text", caption, float("nan"))])
    # The CLI composes the same query: a zero-weighted caption leaves the image's own hit first.
    result = invoke("search", "--index", built["out"], "--text", caption, "--file", image, "-w", 0, "-w", 1,
                    "--k", 1, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["query"]["modality"] == "text+image"
    assert [p["weight"] for p in payload["query"]["parts"]] == [0.0, 1.0]
    assert payload["results"][0]["hits"][0]["id"] == rows[5]["id"]


def test_search_user_errors_are_one_line(built, trained_model, tmp_path) -> None:
    out = built["out"]
    assert "give a query" in _one_line_error(invoke("search", "--index", out))
    assert "--weight given 1 times for 2 query parts" in _one_line_error(
        invoke("search", "--index", out, "--text", "a", "--text", "b", "--weight", 1))
    assert "no 'molecule' modality" in _one_line_error(invoke("search", "--index", out, "--smiles", "CCO"))
    assert "no modality of this model reads .ogg" in _one_line_error(
        invoke("search", "--index", out, "--file", next(Path("/usr/share/tuxpaint/stamps").rglob("*.ogg"))))
    assert "is not an index" in _one_line_error(invoke("search", "--index", tmp_path, "--text", "a"))
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in _one_line_error(invoke("search", "--index", out, "--text", "a", "--device", "cuda"))

    # Another model: same files but a retrained (here: perturbed) projection, its checksum recorded.
    other = tmp_path / "other-model"
    shutil.copytree(trained_model["dir"], other, ignore=shutil.ignore_patterns("runs"))
    state = load_file(str(other / "projection.safetensors"))
    save_file({k: v + np.float32(0.01) for k, v in state.items()}, str(other / "projection.safetensors"))
    meta = json.loads((other / "oneencoder.json").read_text())
    meta["files"]["projection.safetensors"] = sha256_file(other / "projection.safetensors")
    (other / "oneencoder.json").write_text(json.dumps(meta))
    text = _one_line_error(invoke("search", "--index", out, "--model", other, "--text", "A cat."))
    assert f"index {out} was built with another model: its projection" in text and "rebuild it" in text


def test_index_build_from_a_folder_and_a_list_file(trained_model, small_records, tmp_path) -> None:
    folder = tmp_path / "pictures"
    (folder / "sub").mkdir(parents=True)
    for i, rec in enumerate(small_records[:3]):
        shutil.copy(rec["image"], folder / ("sub" if i else "") / f"p{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"skipped")
    result = invoke("index", "build", "--model", trained_model["dir"], "--modality", "image", "--data", folder,
                    "--out", tmp_path / "ix", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "3 image vectors (exact), 1 rejected" in result.output
    assert load_index(tmp_path / "ix").ids == ["p0.png", "sub/p1.png", "sub/p2.png"]

    captions = tmp_path / "captions.txt"
    captions.write_text("A badger.\n\nA red apple.\n")
    result = invoke("index", "build", "--model", trained_model["dir"], "--modality", "text", "--data", captions,
                    "--out", tmp_path / "tx", "--no-progress")
    assert result.exit_code == 0 and "2 text vectors" in result.output, result.output
    assert "inputs are not files" in _one_line_error(
        invoke("index", "build", "--model", trained_model["dir"], "--modality", "text", "--data", folder,
               "--out", tmp_path / "t2"))


def test_an_interrupted_build_resumes_where_it_stopped(model, small_records, tmp_path, monkeypatch) -> None:
    sources = [{"id": r["id"], "input": r["caption"]} for r in small_records[:20]]
    real, calls = index_build._encode_part, []

    def stop_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[3])  # the chunk's start
        return real(*args, **kwargs)

    monkeypatch.setattr(index_build, "_encode_part", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        index_build.build_index(model, "text", sources, tmp_path / "ix", chunk=8, progress=False)
    assert calls == [0, 8] and not (tmp_path / "ix" / "index.json").exists()
    monkeypatch.setattr(index_build, "_encode_part", real)
    report = index_build.build_index(model, "text", sources, tmp_path / "ix", chunk=8, progress=False)
    assert report.resumed == 16 and report.count == 20
    whole = index_build.build_index(model, "text", sources, tmp_path / "ix2", chunk=8, progress=False)
    np.testing.assert_allclose(load_index(tmp_path / "ix").vectors, load_index(whole.path).vectors, atol=1e-6)
