"""One way to prepare a stage: train, eval and the embedding commands share it, and the commands
that read inputs take cached backbone features instead of encoding the same samples again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from oneencoder.apps.api import OneEncoder
from oneencoder.apps.index import load_index
from oneencoder.cli.main import app
from oneencoder.evaluation.retrieval import evaluate_samples
from oneencoder.features.lookup import CachedFeatures
from oneencoder.fileio import write_jsonl_atomic
from oneencoder.training.prepare import prepare_stage

runner = CliRunner()

# Embeddings of cached (fp16) features against freshly encoded ones: the cosine is at least this
# (measured: 1 - 1e-7; docs/search.md).
COSINE_FLOOR = 1 - 1e-5


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _top1(index: Path, queries: torch.Tensor) -> list[str]:
    """Top-1 item id of each query in the index at ``index``."""
    return [hits[0]["id"] for hits in load_index(index).search(queries, k=1).hits]


def test_index_build_takes_every_sample_from_the_cache(trained_model, small_manifest, small_cache, small_records,
                                                       tmp_path: Path) -> None:
    cached = invoke("index", "build", "--model", trained_model["dir"], "--modality", "image", "--data", small_manifest,
                    "--out", tmp_path / "cached", "--cache-dir", small_cache, "--device", "cpu", "--no-progress")
    assert cached.exit_code == 0, cached.output
    assert f"image: {len(small_records)} from the cache, 0 encoded" in cached.output
    fresh = invoke("index", "build", "--model", trained_model["dir"], "--modality", "image", "--data", small_manifest,
                   "--out", tmp_path / "fresh", "--no-cache", "--device", "cpu", "--no-progress")
    assert fresh.exit_code == 0, fresh.output
    assert "from the cache" not in fresh.output
    from safetensors.numpy import load_file

    a, b = (load_file(str(tmp_path / d / "vectors.safetensors"))["vectors"] for d in ("cached", "fresh"))
    assert a.shape == b.shape == (len(small_records), a.shape[1])
    assert float((a * b).sum(1).min()) >= COSINE_FLOOR  # equal to within the cache's fp16 rounding
    queries = OneEncoder(trained_model["dir"], device="cpu").encode("text", [r["caption"] for r in small_records])
    assert _top1(tmp_path / "cached", queries) == _top1(tmp_path / "fresh", queries)


def test_cached_inputs_never_load_the_backbone(trained_model, small_cache, small_records, tmp_path: Path) -> None:
    m = OneEncoder(trained_model["dir"], device="cpu")
    paths = [r["image"] for r in small_records[:6]]
    with CachedFeatures(m.modality("image"), small_cache) as cache:
        emb = m.encode("image", paths, cache=cache)
        assert cache.summary() == "image: 6 from the cache, 0 encoded" and "image" not in m._backbones
        other = tmp_path / "copy.png"  # same pixels, another file: not what the cache recorded
        other.write_bytes(Path(paths[0]).read_bytes())
        mixed = m.encode("image", [*paths[:3], other, *paths[3:]], cache=cache)
        assert (cache.hits, cache.encoded) == (12, 1)
    fresh = m.encode("image", paths)
    assert torch.equal(mixed[[0, 1, 2, 4, 5, 6]], emb)  # cached rows stay in their places around the encoded one
    assert torch.allclose(mixed[3], fresh[0], atol=1e-6)
    assert float((emb * fresh).sum(1).min()) >= COSINE_FLOOR
    with CachedFeatures(m.modality("text"), small_cache) as cache:  # captions are found by their text, whatever the id
        m.encode("text", [small_records[0]["caption"], "A caption nobody cached."], cache=cache)
        assert (cache.hits, cache.encoded) == (1, 1)


def test_classify_and_embed_default_to_the_cache_the_model_trained_on(trained_model, small_records,
                                                                      tmp_path: Path) -> None:
    paths = [r["image"] for r in small_records[:2]]
    result = invoke("classify", *paths, "--model", trained_model["dir"], "--labels", "animals,food", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "image: 2 from the cache, 0 encoded" in result.output
    out = tmp_path / "e.npy"
    result = invoke("embed", "text", small_records[1]["caption"], "--model", trained_model["dir"], "--out", out)
    assert result.exit_code == 0, result.output
    assert "text: 1 from the cache, 0 encoded" in result.output
    assert np.load(out).shape[0] == 1


def test_train_builds_a_missing_cache(small_records, tmp_path: Path) -> None:
    rows = [r for split, n in (("train", 6), ("val", 3), ("test", 3))
            for r in [r for r in small_records if r["split"] == split][:n]]
    manifest = tmp_path / "m.jsonl"
    write_jsonl_atomic(manifest, rows)
    result = invoke("train", "--stage", "image_text", "--manifest", manifest, "--cache-dir", tmp_path / "cache",
                    "--model", tmp_path / "model", "--epochs", 1, "--device", "cpu", "--workers", 0)
    assert result.exit_code == 0, result.output
    for name in ("image", "text"):
        assert f"{name}: {len(rows)} samples, 0 already cached, {len(rows)} encoded, 0 rejected" in result.output
        assert (tmp_path / "cache" / name / "data.mdb").is_file()
    assert "stage image_text: best epoch 1 of 1" in result.output


def test_one_call_prepares_training_and_evaluation(trained_model, small_manifest, small_cache) -> None:
    train = prepare_stage(trained_model["config"], progress=False, log=lambda _: None)
    assert list(train.modalities) == ["image", "text"] and train.model is None
    assert all(r.encoded == 0 and r.cached_before == 64 for r in train.reports.values())  # nothing to encode

    evaluation = prepare_stage(model_dir=trained_model["dir"], manifest=small_manifest, cache_dir=small_cache,
                               progress=False, log=lambda _: None)
    assert evaluation.model is not None and evaluation.config is None
    # The model's modalities are the stage's: same fingerprints, so they share one cache.
    assert {n: m.fingerprint() for n, m in evaluation.modalities.items()} == \
           {n: m.fingerprint() for n, m in train.modalities.items()}
    results = evaluate_samples(evaluation.model, evaluation.modalities, evaluation.records, evaluation.cache_dir,
                               "test")
    for direction, r in trained_model["summary"]["test"]["directions"].items():
        assert results["directions"][direction]["metrics"] == pytest.approx(r["metrics"])
