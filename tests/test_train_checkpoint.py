"""Schedule, determinism, resume, and the checksummed model directory."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import oneencoder
from oneencoder.errors import ChecksumError, OneEncoderError
from oneencoder.features.cache import FeatureCache, cache_dir_for
from oneencoder.model.checkpoint import MEANS, META, PROJECTION, adapter_file, load_model, read_meta, save_model
from oneencoder.training.config import TrainConfig
from oneencoder.training.curriculum import RandomBatchSampler
from oneencoder.training.stage import run_stage
from oneencoder.training.trainer import Trainer, lr_at

pytestmark = pytest.mark.bytes  # compares outputs byte for byte (docs/reliability.md)

# ----- learning-rate schedule ------------------------------------------------------------


def test_lr_warmup_then_cosine() -> None:
    c = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.05)
    total = 100
    lrs = [lr_at(s, total, c) for s in range(130)]
    floor = c.lr * c.min_lr_ratio
    # Linear warmup reaching the peak on the last warmup step.
    for s in range(10):
        assert lrs[s] == pytest.approx(c.lr * (s + 1) / 10)
    assert lrs[9] == pytest.approx(c.lr) and lrs[10] == pytest.approx(c.lr)
    # Cosine decay: monotone, half way at the midpoint, the floor at the end and after it.
    decay = lrs[10:]
    assert all(x >= y - 1e-15 for x, y in zip(decay, decay[1:]))
    assert lrs[55] == pytest.approx(floor + (c.lr - floor) / 2)
    assert lrs[total] == pytest.approx(floor) and lrs[129] == pytest.approx(floor)
    assert min(lrs[10:]) >= floor - 1e-15


def test_lr_without_warmup_starts_at_peak() -> None:
    c = TrainConfig(lr=0.01, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(0, 10, c) == pytest.approx(0.01)
    assert lr_at(10, 10, c) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(5, 10, c) == pytest.approx(0.005)


# ----- generic trainer: resume is exact ---------------------------------------------------


class _Regression(nn.Module):
    """A tiny objective on fixed random data (with dropout, so RNG state matters)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.register_buffer("x", torch.randn(32, 8, generator=g))
        self.register_buffer("y", torch.randn(32, 2, generator=g))
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": (self.net(self.x[index]) - self.y[index]).pow(2).mean()}


class _InterruptAt(RandomBatchSampler):
    def __init__(self, *args, stop_step: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stop_step = stop_step

    def batch(self, step: int, total_steps: int) -> torch.Tensor:
        if step == self.stop_step:
            raise KeyboardInterrupt
        return super().batch(step, total_steps)


def _trainer(run_dir: Path, sampler: RandomBatchSampler, epochs: int = 4) -> tuple[Trainer, _Regression, list]:
    torch.manual_seed(0)
    objective = _Regression()
    bests: list[dict] = []

    def validate() -> dict[str, float]:
        with torch.no_grad():
            return {"score": -float(objective(torch.arange(32))["loss"])}

    config = TrainConfig(epochs=epochs, batch_size=8, lr=1e-2, warmup_steps=3, patience=100, log_every=1)
    trainer = Trainer(config, objective, sampler, validate, bests.append, run_dir, torch.device("cpu"),
                      progress=False)
    return trainer, objective, bests


def test_resumed_training_equals_uninterrupted(tmp_path: Path) -> None:
    straight, obj_a, _ = _trainer(tmp_path / "a", RandomBatchSampler(32, 8, seed=0))
    fit_a = straight.fit()
    assert fit_a.steps == 16 and fit_a.epochs_run == 4

    spe = 4  # steps per epoch
    first, _, _ = _trainer(tmp_path / "b", _InterruptAt(32, 8, seed=0, stop_step=2 * spe))
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert json.loads((tmp_path / "b" / "last.json").read_text())["step"] == 2 * spe

    resumed, obj_b, _ = _trainer(tmp_path / "b", RandomBatchSampler(32, 8, seed=99))
    assert resumed.try_resume()
    assert (resumed.step, resumed.epoch) == (2 * spe, 2)
    assert len(resumed.history) == 2
    fit_b = resumed.fit()
    assert fit_b.steps == fit_a.steps and fit_b.epochs_run == 4
    for pa, pb in zip(obj_a.parameters(), obj_b.parameters()):
        assert torch.equal(pa, pb)
    assert [h["val/score"] for h in fit_b.history] == [h["val/score"] for h in fit_a.history]
    # metrics.jsonl holds every step once per run segment plus one row per epoch.
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "loss" in r) == list(range(1, 17))


def test_resume_refuses_another_schedule(tmp_path: Path) -> None:
    trainer, _, _ = _trainer(tmp_path, RandomBatchSampler(32, 8, seed=0), epochs=2)
    trainer.fit()
    other, _, _ = _trainer(tmp_path, RandomBatchSampler(32, 8, seed=0), epochs=3)
    assert not other.try_resume()
    assert other.step == 0
    fresh, _, _ = _trainer(tmp_path / "empty", RandomBatchSampler(32, 8, seed=0))
    assert not fresh.try_resume()


def test_early_stopping_uses_patience(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    objective = _Regression()
    config = TrainConfig(epochs=20, batch_size=8, warmup_steps=1, patience=2)
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9])
    bests: list[dict] = []
    trainer = Trainer(config, objective, RandomBatchSampler(32, 8), lambda: {"score": next(scores)},
                      bests.append, tmp_path, torch.device("cpu"), progress=False)
    fit = trainer.fit()
    assert fit.epochs_run == 4 and fit.best_epoch == 2 and fit.best_score == 0.7
    assert [b["score"] for b in bests] == [0.5, 0.7]
    assert ("early stop after epoch 4 of 20: validation score has not improved for 2 epochs ([train] patience); "
            "keeping epoch 2 (score 0.7000)") in capsys.readouterr().err
    # One epoch rule: step rows name the epoch they are in (from 1), validation rows the one they close.
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps_per_epoch = 32 // 8
    assert all(r["epoch"] == (r["step"] - 1) // steps_per_epoch + 1 for r in rows if "loss" in r)
    assert [r["epoch"] for r in rows if "val/score" in r] == [1, 2, 3, 4]


# ----- run_stage: determinism and resume ------------------------------------------------------


def _files(model_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(model_dir)): p.read_bytes() for p in sorted(model_dir.rglob("*.safetensors"))
            if "runs" not in p.relative_to(model_dir).parts}


def test_same_seed_gives_byte_identical_models(small_manifest, small_cache, make_config, tmp_path: Path) -> None:
    config = make_config(small_manifest, small_cache, epochs=2)
    a = run_stage(config, tmp_path / "a", progress=False)
    b = run_stage(config, tmp_path / "b", progress=False)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert set(fa) == {PROJECTION, adapter_file("image"), adapter_file("text"), MEANS}  # means: fitted on val
    assert fa == fb
    assert a["test"] == b["test"] and a["best_epoch"] == b["best_epoch"]
    # A different seed gives a different model.
    c = make_config(small_manifest, small_cache, epochs=2, seed=1)
    run_stage(c, tmp_path / "c", progress=False)
    assert _files(tmp_path / "c")[PROJECTION] != fa[PROJECTION]


def test_run_stage_resumes_a_finished_run(trained_model, tmp_path: Path, capsys) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model["dir"], model_dir)
    before = _files(model_dir)
    summary = run_stage(trained_model["config"], model_dir, progress=False)
    out = capsys.readouterr().err  # a status line
    steps = trained_model["summary"]["steps"]
    assert f"resuming image_text from step {steps}" in out
    assert summary["steps"] == steps and summary["epochs_run"] == trained_model["summary"]["epochs_run"]
    assert _files(model_dir) == before  # nothing retrained
    assert summary["test"] == trained_model["summary"]["test"]


def test_stage1_refuses_to_overwrite_a_model(trained_model, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model["dir"], model_dir, ignore=shutil.ignore_patterns("runs"))
    with pytest.raises(OneEncoderError, match="overwrite"):
        run_stage(trained_model["config"], model_dir, progress=False)


def test_later_stage_rewrites_only_what_it_trains(trained_model, small_manifest, small_cache, make_config,
                                                  tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model["dir"], model_dir)
    before = _files(model_dir)
    config = make_config(small_manifest, small_cache, epochs=1)
    config.name, config.trainable = "text_again", ["text"]
    with pytest.raises(OneEncoderError, match="--replace"):  # retraining a held modality is explicit
        run_stage(config, model_dir, progress=False)
    run_stage(config, model_dir, replace=True, progress=False)
    after = _files(model_dir)
    assert after[PROJECTION] == before[PROJECTION]
    assert after[adapter_file("image")] == before[adapter_file("image")]
    assert after[adapter_file("text")] != before[adapter_file("text")]
    meta = read_meta(model_dir)
    assert [s["name"] for s in meta["stages"]] == ["image_text", "text_again"]
    assert meta["stages"][0]["test"] == read_meta(trained_model["dir"])["stages"][0]["test"]
    load_model(model_dir)  # checksums of the rewritten adapter were updated


# ----- model directory ---------------------------------------------------------------------


def _count(records: list[dict], split: str) -> int:
    return sum(1 for r in records if r["split"] == split)


def test_meta_has_sha256_for_every_file(trained_model, small_records) -> None:
    model_dir = trained_model["dir"]
    meta = read_meta(model_dir)
    weights = {str(p.relative_to(model_dir)) for p in model_dir.rglob("*")
               if p.is_file() and p.name not in (META, "README.md") and "runs" not in p.relative_to(model_dir).parts}
    assert set(meta["files"]) == weights == {PROJECTION, adapter_file("image"), adapter_file("text"), MEANS}
    for rel, digest in meta["files"].items():
        assert digest == hashlib.sha256((model_dir / rel).read_bytes()).hexdigest()
    assert meta["d_model"] == trained_model["config"].model.d_model
    assert set(meta["modalities"]) == {"image", "text"}
    stage = meta["stages"][0]
    assert stage["name"] == "image_text"
    assert stage["n_train"] == _count(small_records, "train") and stage["n_val"] == _count(small_records, "val")
    assert set(stage["test"]) == {"image→text", "text→image"}


def test_save_load_round_trip(trained_model, tmp_path: Path) -> None:
    model, meta = load_model(trained_model["dir"])
    assert not model.training
    entry = {k: v for k, v in meta["stages"][0].items() if k != "time"}
    metas = {n: {k: v for k, v in info.items() if k != "adapter"} for n, info in meta["modalities"].items()}
    save_model(model, tmp_path / "copy", metas, entry, write=["projection", "image", "text"])
    again, meta2 = load_model(tmp_path / "copy")
    sa, sb = model.state_dict(), again.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # Identical bytes, identical checksums (the means are fitted when a stage ends, not saved with weights).
    assert meta2["files"] == {rel: d for rel, d in meta["files"].items() if rel != MEANS}
    assert meta2["modalities"] == meta["modalities"]


def test_api_encodes_text_and_images(trained_model, small_records, small_cache, stage_modalities) -> None:
    m = oneencoder.load(trained_model["dir"])
    d = m.model.embed_dim  # d_model, plus the language prior when blended
    assert d == trained_model["config"].model.d_model + (384 if trained_model["config"].model.language_prior > 0 else 0)
    assert sorted(m.modalities) == ["image", "text"]
    text = m.encode("text", ["a badger"])
    assert text.shape == (1, d)
    assert torch.allclose(text.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert m.encode("text", "a badger").shape == (1, d)  # a single string is one input
    rec = next(r for r in small_records if r["split"] == "test")
    image = m.encode("image", [rec["image"], Path(rec["image"])])
    assert image.shape == (2, d) and torch.allclose(image[0], image[1])
    assert torch.allclose(image.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert m.similarity(image, text).shape == (2, 1)
    # Raw inputs and the cached features of the same sample give the same embedding.
    for name, raw, emb in (("image", rec["image"], image[0]), ("text", rec["caption"], None)):
        emb = m.encode(name, [raw])[0] if emb is None else emb
        with FeatureCache(cache_dir_for(small_cache, name), stage_modalities[name].fingerprint(),
                          readonly=True) as cache:
            cached = cache.get(rec["id"])
        from_cache = m.encode_features(name, cached)[0]
        assert float(emb @ from_cache) > 0.999, name
    assert m.encode("text", []).shape == (0, d)


def test_api_user_errors(trained_model, small_records, tmp_path: Path) -> None:
    m = oneencoder.load(trained_model["dir"])
    with pytest.raises(oneencoder.errors.SampleError, match=r"input #1: .*missing\.png"):
        m.encode("image", [small_records[0]["image"], str(tmp_path / "missing.png")])
    with pytest.raises(oneencoder.errors.SampleError, match="input #0: .*cannot decode"):
        m.encode("image", [str(trained_model["dir"] / PROJECTION)])
    with pytest.raises(OneEncoderError, match="audio"):
        m.encode("audio", ["x.wav"])
    with pytest.raises(OneEncoderError, match="not a oneencoder model directory"):
        oneencoder.load(tmp_path)


def test_tampered_file_raises_checksum_error(trained_model, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model["dir"], model_dir)
    target = model_dir / adapter_file("text")
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"text\.safetensors"):
        oneencoder.load(model_dir)
    target.unlink()
    with pytest.raises(ChecksumError, match="missing"):
        oneencoder.load(model_dir)


def test_other_backbone_weights_are_refused(trained_model, small_records, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model["dir"], model_dir)
    meta = json.loads((model_dir / META).read_text())
    meta["modalities"]["text"]["weights_sha256"] = "0" * 64
    (model_dir / META).write_text(json.dumps(meta))
    m = oneencoder.load(model_dir)
    with pytest.raises(ChecksumError, match="other weights"):
        m.encode("text", ["a badger"])
    assert m.encode("image", [small_records[0]["image"]]).shape[0] == 1  # the other modality still works


def test_stage_summary_reports_chance(trained_model, small_records) -> None:
    summary = trained_model["summary"]
    batch = trained_model["config"].train.batch_size
    assert summary["steps"] == summary["epochs_run"] * (_count(small_records, "train") // batch)
    assert math.isfinite(summary["train_seconds"])
    for direction in ("image→text", "text→image"):
        r = summary["test"]["directions"][direction]
        assert 0.0 < r["chance"]["R@1"] < 1.0
        assert 0.0 <= r["metrics"]["R@1"] <= 1.0
    on_disk = json.loads((trained_model["dir"] / "runs" / "image_text" / "test.json").read_text())
    assert on_disk["test"]["directions"].keys() == summary["test"]["directions"].keys()


def test_overwriting_stage1_with_another_config_records_the_new_one(small_manifest, small_cache, make_config,
                                                                    tmp_path: Path) -> None:
    from oneencoder.model.checkpoint import read_meta
    from oneencoder.training.stage import run_stage

    model_dir = tmp_path / "model"
    run_stage(make_config(small_manifest, small_cache, epochs=1, sections={"model": {"language_prior": 0.0}}),
              model_dir, progress=False)
    assert read_meta(model_dir)["embed_dim"] == read_meta(model_dir)["d_model"]
    later_run = model_dir / "runs" / "add_audio"  # a stage that built on the old projection
    later_run.mkdir(parents=True)
    (later_run / "last.json").write_text("{}")
    run_stage(make_config(small_manifest, small_cache, epochs=1, sections={"model": {"language_prior": 0.5}}),
              model_dir, resume=False, overwrite=True, progress=False)
    assert not later_run.exists()  # it would resume onto a projection it was not trained with
    assert (model_dir / "runs" / "image_text" / "settings.json").is_file()
    meta = read_meta(model_dir)
    assert meta["projection"]["language_prior"] == 0.5
    assert meta["embed_dim"] == meta["d_model"] + 384
    assert oneencoder.load(model_dir).encode("text", ["a badger"]).shape == (1, meta["embed_dim"])


def test_init_from_fine_tunes_stage1_from_another_model(trained_model, small_manifest, small_cache, make_config,
                                                        tmp_path: Path) -> None:
    """--init-from starts from the source's weights: with a vanishing learning rate they barely move."""
    from safetensors.torch import load_file

    from oneencoder.model.checkpoint import read_meta
    from oneencoder.errors import ConfigError
    from oneencoder.training.stage import run_stage

    source = trained_model["dir"]
    config = make_config(small_manifest, small_cache, epochs=1, sections={"train": {"lr": 1e-9}})
    run_stage(config, tmp_path / "tuned", init_from=source, progress=False)
    before, after = (load_file(str(d / "projection.safetensors")) for d in (source, tmp_path / "tuned"))
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], atol=1e-5) for k in before)
    fresh = tmp_path / "fresh"
    run_stage(config, fresh, progress=False)
    scratch = load_file(str(fresh / "projection.safetensors"))
    assert any(not torch.allclose(before[k], scratch[k], atol=1e-3) for k in before)  # so the test can fail
    assert read_meta(tmp_path / "tuned")["stages"][-1]["init_from"] == str(source)
    wider = make_config(small_manifest, small_cache, epochs=1, sections={"model": {"d_model": 128}})
    with pytest.raises(ConfigError, match="--init-from .* projection"):
        run_stage(wider, tmp_path / "wider", init_from=source, progress=False)


def test_a_model_saved_before_widths_came_from_the_backbone_still_loads(trained_model, tmp_path: Path) -> None:
    """Older model directories recorded `feature_dim` among the options and no class: they still load."""
    model = tmp_path / "old"
    shutil.copytree(trained_model["dir"], model, ignore=shutil.ignore_patterns("runs"))
    meta = json.loads((model / "oneencoder.json").read_text())
    for name, width in (("text", 384), ("image", 1280)):
        info = meta["modalities"][name]
        info["options"]["feature_dim"] = width
        for key in ("class", "distribution", "distribution_version", "language_source", "metric_style"):
            info.pop(key)
    (model / "oneencoder.json").write_text(json.dumps(meta))
    old, new = oneencoder.load(model), oneencoder.load(trained_model["dir"])
    assert torch.equal(old.encode("text", ["A badger."]), new.encode("text", ["A badger."]))
