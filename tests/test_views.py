"""Augmented views (``cache build --views K``): reproducible, view 0 untouched, one view per epoch."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from PIL import Image

from oneencoder.errors import OneEncoderError
from oneencoder.features.bank import FeatureBank
from oneencoder.features.cache import FeatureCache, cache_dir_for
from oneencoder.features.views import AugmentedView, ViewedBank, build_view, view_rng, view_root
from oneencoder.modalities.text import CAPTION_TEMPLATES, reworded
from oneencoder.modality import Modality
from oneencoder.training.config import StageConfig
from oneencoder.training.prepare import prepare_stage
from oneencoder.training.stage import run_stage


def _plain(root: Path, modality: Modality, ids: list[str]) -> list[torch.Tensor]:
    with FeatureCache(cache_dir_for(root, modality.spec.name), modality.fingerprint(), readonly=True) as cache:
        return cache.get_many(ids)


def _view(root: Path, modality: Modality, k: int, ids: list[str]) -> list[torch.Tensor]:
    path = cache_dir_for(view_root(root, modality.spec.name, k), modality.spec.name)
    with FeatureCache(path, AugmentedView(modality, k, 0).fingerprint(), readonly=True) as cache:
        return cache.get_many(ids)


def test_image_and_text_views_come_from_the_generator_only(small_records: list[dict],
                                                           image_modality: Modality, text_modality: Modality) -> None:
    raw = image_modality.load(small_records[0]["image"])
    before = raw.tobytes()
    first = image_modality.augment(raw, view_rng(0, 1, "x"))
    again = image_modality.augment(raw, view_rng(0, 1, "x"))
    other = image_modality.augment(raw, view_rng(0, 2, "x"))
    assert raw.tobytes() == before  # the input is left as it was
    assert isinstance(first, Image.Image) and first.mode == "RGB"
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()
    caption = small_records[0]["caption"]
    assert text_modality.augment(caption, view_rng(3, 1, caption)) == text_modality.augment(caption, view_rng(3, 1, caption))
    assert {text_modality.augment(caption, random.Random(i)) for i in range(40)} == {
        reworded(caption, t) for t in CAPTION_TEMPLATES}


@pytest.mark.parametrize("caption, template, expected", [
    ("A badger.", "A picture of {np}.", "A picture of a badger."),
    ("A badger.", "{bare}", "badger"),
    ("An apple.", "{Np}, drawn simply.", "An apple, drawn simply."),
    ("Grinning face", "This is {np}.", "This is grinning face."),
    ("NASA logo.", "Clip art of {np}.", "Clip art of NASA logo."),
])
def test_reworded_captions(caption: str, template: str, expected: str) -> None:
    assert reworded(caption, template) == expected


def test_views_are_reproducible_and_view_zero_is_todays_cache(
        small_records: list[dict], small_manifest: Path, small_cache: Path, tmp_path: Path,
        make_config: Callable[..., StageConfig]) -> None:
    ids = [r["id"] for r in small_records]
    train_ids = [r["id"] for r in small_records if r["split"] == "train"]
    roots = []
    for name in ("a", "b"):
        root = tmp_path / name
        shutil.copytree(small_cache, root)
        prepared = prepare_stage(make_config(small_manifest, root, sections={"data": {"views": 2}}), build_caches=False)
        reports = prepared.build_caches(progress=False, log=lambda line: None)
        assert {"image view 1", "text view 1"} <= set(reports)
        assert reports["image view 1"].encoded == len(train_ids)
        roots.append(root)
    image, text = prepared.modalities["image"], prepared.modalities["text"]
    for modality in (image, text):
        # View 0 is the plain cache, exactly as it was before any view was built.
        assert all(torch.equal(x, y) for x, y in zip(_plain(roots[0], modality, ids), _plain(small_cache, modality, ids)))
        # The same seed gives the same views in two separate builds.
        a, b = _view(roots[0], modality, 1, train_ids), _view(roots[1], modality, 1, train_ids)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # Image views differ from the plain features; only train rows get views.
    plain = torch.stack([t[0] for t in _plain(roots[0], image, train_ids)]).float()
    v1 = torch.stack([t[0] for t in _view(roots[0], image, 1, train_ids)]).float()
    assert not torch.allclose(plain, v1, atol=1e-2)
    assert torch.nn.functional.cosine_similarity(plain, v1).mean() > 0.5  # still the same picture
    path = cache_dir_for(view_root(roots[0], "image", 1), "image")
    with FeatureCache(path, AugmentedView(image, 1, 0).fingerprint(), readonly=True) as cache:
        assert cache.ids() == set(train_ids)
    # A second build finds everything cached.
    again = prepare_stage(make_config(small_manifest, roots[0], sections={"data": {"views": 2}}), build_caches=False)
    assert all(r.encoded == 0 for r in again.build_caches(progress=False, log=lambda line: None).values())


def test_a_changed_recipe_is_refused(small_cache: Path, small_records: list[dict], image_modality: Modality,
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "c"
    shutil.copytree(small_cache, root)
    records = [r for r in small_records if r["split"] == "train"][:2]
    build_view(image_modality, records, root, 1, progress=False)
    monkeypatch.setattr(type(image_modality), "view_recipe", lambda self: {"name": "other"})
    with pytest.raises(OneEncoderError, match="augmentation"):
        build_view(image_modality, records, root, 1, progress=False)


def test_viewed_bank_reads_the_view_drawn_for_the_epoch() -> None:
    n, k = 50, 4
    rows = [torch.full((1 + v % 2, 3), float(v * 100 + i)) for v in range(k) for i in range(n)]
    bank = ViewedBank(FeatureBank(rows), n, seed=7)
    index = torch.arange(n)
    tokens, mask = bank.gather(index)
    assert torch.equal(tokens[:, 0, 0], index.float())  # before any epoch: view 0
    bank.set_epoch(3)
    first = bank.choice.clone()
    tokens, mask = bank.gather(index)
    assert torch.equal(tokens[:, 0, 0], (first * 100 + index).float())
    assert torch.equal(mask.sum(1), 1 + first % 2)  # each view keeps its own length
    assert len(set(first.tolist())) == k
    bank.set_epoch(3)
    assert torch.equal(bank.choice, first)  # a resumed epoch draws the same views
    bank.set_epoch(4)
    assert not torch.equal(bank.choice, first)
    with pytest.raises(ValueError, match="not K views"):
        ViewedBank(FeatureBank(rows[:-1]), n, seed=0)


def test_training_on_views(small_manifest: Path, small_cache: Path, tmp_path: Path,
                           make_config: Callable[..., StageConfig]) -> None:
    root = tmp_path / "cache"
    shutil.copytree(small_cache, root)
    config = make_config(small_manifest, root, sections={"data": {"views": 2}}, epochs=2)
    with pytest.raises(OneEncoderError, match=r"cache build --views 2"):
        run_stage(config, tmp_path / "unbuilt", progress=False)
    prepare_stage(config, progress=False, log=lambda line: None)
    summary: dict[str, Any] = run_stage(config, tmp_path / "model", progress=False)
    assert summary["epochs_run"] == 2 and summary["test"]


def test_which_modalities_read_views(small_manifest: Path, tmp_path: Path, stage_modalities: dict[str, Modality],
                                     make_config: Callable[..., StageConfig]) -> None:
    from oneencoder.errors import ConfigError
    from oneencoder.training.pairs import viewed_modalities

    def viewed(**data: Any) -> list[str]:
        return viewed_modalities(make_config(small_manifest, tmp_path, sections={"data": data}), stage_modalities)

    assert viewed() == [] and viewed(views=1, view_modalities=["image"]) == []
    assert viewed(views=2) == ["image", "text"]
    assert viewed(views=2, view_modalities=["image"]) == ["image"]
    with pytest.raises(ConfigError, match=r"view_modalities: 'audio' cannot train on views"):
        viewed(views=2, view_modalities=["audio"])
