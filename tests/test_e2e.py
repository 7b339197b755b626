"""End to end on real Tux Paint pairs: manifest -> cache (with bad samples) -> Stage 1 -> evaluation.

This is a learning check: after training, image->text retrieval on the training
pairs must be far above chance and above the same network before training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import oneencoder
from oneencoder.data.manifest import read_manifest
from oneencoder.evaluation.retrieval import evaluate_samples
from oneencoder.features.cache import build_cache, rejects_path
from oneencoder.fileio import write_jsonl_atomic
from oneencoder.modality import create_modality
from oneencoder.model.checkpoint import load_model, read_meta
from oneencoder.model.parts import OneEncoderModel
from oneencoder.runtime import seed_everything
from oneencoder.training.stage import run_stage

EPOCHS = 8


@pytest.fixture(scope="module")
def pipeline(small_records, bad_records, make_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    manifest = root / "manifest.jsonl"
    write_jsonl_atomic(manifest, small_records + bad_records)
    records = read_manifest(manifest)
    config = make_config(manifest, root / "cache", epochs=EPOCHS)
    modalities = {n: create_modality(n, **config.modality_options.get(n, {})) for n in config.modalities}
    reports = {n: build_cache(m, records, config.data.cache_dir, batch_size=32, progress=False)
               for n, m in modalities.items()}
    summary = run_stage(config, root / "model", progress=False)
    return {"root": root, "records": records, "config": config, "modalities": modalities,
            "reports": reports, "summary": summary, "model_dir": root / "model"}


def test_pipeline_completes_and_records_rejects(pipeline, bad_expected) -> None:
    cache_dir = Path(pipeline["config"].data.cache_dir)
    for name, report in pipeline["reports"].items():
        expected = {sid for sid, (mod, _) in bad_expected.items() if mod == name}
        assert set(report.rejects) == expected
        rows = [json.loads(line) for line in rejects_path(cache_dir, name).read_text().splitlines()]
        assert {r["id"] for r in rows} == expected
        for row in rows:
            assert bad_expected[row["id"]][1] in row["reason"]
    stage = read_meta(pipeline["model_dir"])["stages"][0]
    n_train = sum(1 for r in pipeline["records"] if r["split"] == "train" and not r["id"].startswith("bad/"))
    assert stage["n_train"] == n_train  # no rejected sample reached training
    assert pipeline["summary"]["epochs_run"] == EPOCHS


def test_held_out_metrics_exist_with_chance_levels(pipeline) -> None:
    test = pipeline["summary"]["test"]
    assert test["split"] == "test"
    assert set(test["directions"]) == {"image→text", "text→image"}
    n_test = sum(1 for r in pipeline["records"] if r["split"] == "test")
    for direction, r in test["directions"].items():
        assert r["n_query_samples"] == n_test
        for key in ("R@1", "R@5", "R@10", "MRR", "mAP"):
            assert 0.0 <= r["metrics"][key] <= 1.0 and 0.0 < r["chance"][key] < 1.0, (direction, key)
        print(f"test {direction}: R@1 {r['metrics']['R@1']:.3f} (chance {r['chance']['R@1']:.3f})")
    saved = json.loads((pipeline["model_dir"] / "runs" / "image_text" / "test.json").read_text())
    assert saved["test"]["directions"]["image→text"]["metrics"] == pytest.approx(
        test["directions"]["image→text"]["metrics"])


def test_trained_model_beats_chance_on_train_split(pipeline) -> None:
    config, modalities = pipeline["config"], pipeline["modalities"]
    model, _ = load_model(pipeline["model_dir"])
    after = evaluate_samples(model, modalities, pipeline["records"], config.data.cache_dir, split="train")
    r = after["directions"]["image→text"]
    # The same network before any training step (same seed, same construction as run_stage).
    seed_everything(config.train.seed)
    untrained = OneEncoderModel(config.model)
    for name in ("image", "text"):
        untrained.add_modality(name, modalities[name].feature_dim, modalities[name].max_tokens, config.adapter)
    before = evaluate_samples(untrained.eval(), modalities, pipeline["records"], config.data.cache_dir,
                              split="train")["directions"]["image→text"]
    r1, chance, r1_before = r["metrics"]["R@1"], r["chance"]["R@1"], before["metrics"]["R@1"]
    print(f"train image→text R@1: {r1:.3f} after training, {r1_before:.3f} before, chance {chance:.3f}")
    assert r1 > 3 * chance
    assert r1 > r1_before
    assert r["metrics"]["MRR"] > before["metrics"]["MRR"]


def test_trained_model_embeds_raw_inputs(pipeline) -> None:
    m = oneencoder.load(pipeline["model_dir"])
    train = [r for r in pipeline["records"] if r["split"] == "train" and not r["id"].startswith("bad/")][:8]
    images = m.encode("image", [r["image"] for r in train])
    texts = m.encode("text", [r["caption"] for r in train])
    sims = m.similarity(images, texts)
    # Matching captions score higher than the average non-matching one.
    diag = sims.diagonal().mean()
    off = (sims.sum() - sims.diagonal().sum()) / (sims.numel() - len(train))
    assert float(diag) > float(off)
    # encode(numpy=True) arrays go into similarity as they are, and give a numpy matrix back.
    as_numpy = m.similarity(images.numpy(), m.encode("text", [r["caption"] for r in train], numpy=True))
    assert isinstance(as_numpy, np.ndarray) and np.allclose(as_numpy, sims.numpy(), atol=1e-5)
