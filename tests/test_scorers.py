"""Difficulty scorers, measurements and the difficulty table, on real stamps and real spaCy."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oneencoder.errors import ConfigError, OneEncoderError
from oneencoder.features.cache import FeatureCache, cache_dir_for
from oneencoder.modality import create_modality
from oneencoder.training.curriculum.difficulty import (
                                                       DifficultyTable,
                                                       compute_difficulty,
                                                       difficulty_path,
                                                       pooled_features,
                                                       )
from oneencoder.training.curriculum.scorers import (
                                                    IMAGE_MEASUREMENTS,
                                                    Scorer,
                                                    ScorerResult,
                                                    ScoringContext,
                                                    create_scorer,
                                                    knn_density,
                                                    list_scorers,
                                                    rank_normalise,
                                                    register_scorer,
                                                    )

BADGER = "A badger."
LOONIE = "symbols/money/canadian/coins/100loonie"  # "A Canadian dollar ($1.00) called a loonie. It's named ..."
LETTER = "symbols/alphabets/english/filled/uppercase/A_filled"  # flat black letter, LA mode
PHOTO = "animals/mammals/badger"  # real photo cut-out, RGBA


def _ctx(captions: list, corpus: list[str] | None = None) -> ScoringContext:
    return ScoringContext([{"id": f"s{i}", "caption": c} for i, c in enumerate(captions)], corpus=corpus)


def _by_id(stamps: list[dict], sid: str) -> dict:
    return next(r for r in stamps if r["id"] == sid)


# ----- ranks and registry ---------------------------------------------------------------


def test_rank_normalise_averages_ties_and_keeps_nan_neutral() -> None:
    assert rank_normalise(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [1.0, 0.0, 0.5, 0.5]
    assert rank_normalise(np.array([5.0, math.nan, 1.0])).tolist() == [1.0, 0.5, 0.0]
    assert rank_normalise(np.array([7.0, 7.0, 7.0])).tolist() == [0.5, 0.5, 0.5]
    assert rank_normalise(np.array([4.0])).tolist() == [0.5]
    assert rank_normalise(np.array([])).shape == (0,)


def test_registry_lists_builtins_and_checks_names_and_options() -> None:
    assert {"text_nouns", "text_length", "text_rarity", "image_complexity",
            "cross_modal_density"} <= set(list_scorers())
    with pytest.raises(ConfigError, match=r"unknown difficulty scorer 'nouns'.*text_nouns"):
        create_scorer("nouns")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['kk'\]; known: \['k', 'modalities'\]"):
        create_scorer("cross_modal_density", kk=3)

    class Clash(Scorer):
        name = "text_length"

        def __call__(self, ctx: ScoringContext) -> ScorerResult:
            return ScorerResult(np.zeros(len(ctx)))

    with pytest.raises(ValueError, match="already registered"):
        register_scorer(Clash)


# ----- text -----------------------------------------------------------------------------


def test_text_nouns_counts_real_caption_nouns_and_takes_the_max(stamps: list[dict]) -> None:
    loonie = _by_id(stamps, LOONIE)["caption"]
    assert "coin" in loonie
    nouns = create_scorer("text_nouns")
    result = nouns(_ctx([BADGER, loonie, [BADGER, loonie], "Happy!"]))
    # badger | dollar, loonie, bird, coin, loon | the longer caption of the list | none
    assert result.score.tolist() == [1.0, 5.0, 5.0, 0.0]
    assert result.measurements["nouns"].tolist() == [1.0, 5.0, 5.0, 0.0]


def test_text_length_and_rarity_directions() -> None:
    length = create_scorer("text_length")(_ctx(["Hair.", "A big red fire truck with a ladder.", ["Hair.", "A cat."]]))
    assert length.score.tolist() == [1.0, 8.0, 2.0]

    corpus = ["the cat", "the dog", "the cat sat"]  # the 3, cat 2, dog 1, sat 1: 7 words, 4 types
    rarity = create_scorer("text_rarity")(_ctx(["The cat.", "The dog!", "Zebra!", ["Zebra", "The cat"]], corpus))
    denom = 7 + 4 + 1  # add-one smoothing with one bucket for unseen words
    expected = [np.mean([math.log(denom / 4), math.log(denom / 3)]),
                np.mean([math.log(denom / 4), math.log(denom / 2)]),
                math.log(denom / 1), math.log(denom / 1)]
    assert np.allclose(rarity.score, expected)
    assert rarity.score[0] < rarity.score[1] < rarity.score[2]  # common < rarer < never seen
    # Without a corpus the records' own captions are counted: a repeated word is common.
    own = create_scorer("text_rarity")(_ctx(["A dog.", "A dog.", "A quokka."]))
    assert own.score[0] == own.score[1] < own.score[2]


@pytest.mark.parametrize("mode", ["tokens", "pooled", "pooled+tokens"])
def test_text_difficulty_measures_words_chars_and_word_pieces(text_modality, mode: str) -> None:
    text = create_modality("text", **{**text_modality.options, "tokens": mode})
    ids = text.preprocess(BADGER)
    assert len(ids) == 5  # [CLS] a badger . [SEP]
    cached = {"tokens": 5, "pooled": 1, "pooled+tokens": 6}[mode]  # valid tokens the cache stores
    measured = text.difficulty(BADGER, torch.zeros(cached, text.feature_dim))
    assert measured == {"n_words": 2.0, "n_chars": 9.0, "n_tokens": 5.0}


# ----- image ----------------------------------------------------------------------------


def test_flat_letter_has_fewer_colours_than_a_photo(stamps: list[dict], image_modality) -> None:
    letter = image_modality.difficulty(image_modality.load(_by_id(stamps, LETTER)["image"]), None)
    photo = image_modality.difficulty(image_modality.load(_by_id(stamps, PHOTO)["image"]), None)
    print(f"letter {letter}\nphoto {photo}")
    assert set(IMAGE_MEASUREMENTS) | {"width", "height"} == set(letter) == set(photo)
    assert letter["colour_entropy"] < 0.5 < 3.0 < photo["colour_entropy"]
    assert letter["edge_density"] < photo["edge_density"]
    assert 0.3 < letter["foreground_fraction"] < 0.8 and 0.1 < photo["foreground_fraction"] < 0.5
    raw = Image.open(_by_id(stamps, PHOTO)["image"])
    assert (photo["width"], photo["height"]) == (float(raw.width), float(raw.height))


def test_blank_images_have_no_foreground(image_modality) -> None:
    for blank in (Image.new("RGBA", (120, 80), (30, 200, 10, 0)),  # fully transparent (any colour)
                  Image.new("RGB", (64, 64), (255, 255, 255)),
                  Image.new("L", (50, 300), 250)):  # near-white counts as background
        m = image_modality.difficulty(blank, None)
        assert m["foreground_fraction"] == 0.0 and m["colour_entropy"] == 0.0, (blank.mode, m)
    # An opaque square filling the canvas is all foreground, one colour, no edges.
    full = image_modality.difficulty(Image.new("RGB", (40, 40), (200, 0, 0)), None)
    assert full["foreground_fraction"] == 1.0 and full["colour_entropy"] == 0.0 and full["edge_density"] == 0.0


def test_odd_modes_never_raise_and_palette_equals_rgba(stamps: list[dict], image_modality) -> None:
    photo = Image.open(_by_id(stamps, PHOTO)["image"]).convert("RGB")
    for mode in ("P", "LA", "RGBA", "L", "CMYK", "1", "I", "F", "I;16", "YCbCr", "PA", "La", "RGBa"):
        img = photo.convert("RGBA").convert(mode) if mode in ("La", "RGBa", "PA") else photo.convert(mode)
        m = image_modality.difficulty(img, None)
        for key in IMAGE_MEASUREMENTS:  # NaN only where PIL cannot reach RGBA at all (La)
            assert math.isnan(m[key]) if mode == "La" else math.isfinite(m[key]), (mode, key, m)
    # A real palette stamp with transparency measures exactly like its RGBA conversion.
    palette = next(r for r in stamps if r["image"].endswith(".png") and Image.open(r["image"]).mode == "P")
    img = Image.open(palette["image"])
    assert image_modality.difficulty(img, None) == image_modality.difficulty(img.convert("RGBA"), None)


def test_image_measurements_are_fast(stamps: list[dict], image_modality) -> None:
    images = [image_modality.load(r["image"]) for r in [r for r in stamps if r["image"].endswith(".png")][:40]]
    start = time.perf_counter()
    for img in images:
        image_modality.difficulty(img, None)
    per_image = (time.perf_counter() - start) / len(images)
    print(f"image difficulty: {per_image * 1e3:.2f} ms per image")
    assert per_image < 0.05  # ~5 ms here; generous for loaded machines


def test_image_complexity_ranks_the_three_measurements() -> None:
    rows = [{"edge_density": 0.02, "colour_entropy": 0.1, "foreground_fraction": 0.3},  # flat letter
            {"edge_density": 0.20, "colour_entropy": 4.5, "foreground_fraction": 0.4},  # photo
            {"edge_density": 0.10, "colour_entropy": 2.0, "foreground_fraction": 0.5}]
    ctx = ScoringContext([{"id": str(i)} for i in range(3)], measurements={"image": rows})
    result = create_scorer("image_complexity")(ctx)
    assert np.allclose(result.score, [0.0, (1 + 1 + 0.5) / 3, (0.5 + 0.5 + 1) / 3])
    assert result.measurements["colour_entropy"].tolist() == [0.1, 4.5, 2.0]
    stale = ScoringContext(ctx.records, measurements={"image": [{"width": 1.0}] * 3})
    with pytest.raises(ConfigError, match="no cache here has the measurements.*needs a rebuild"):
        create_scorer("image_complexity")(stale)


# ----- cross-modal density --------------------------------------------------------------


def _density_ctx(groups: list[str]) -> ScoringContext:
    # Rows 0-2: a tight cluster; 3: isolated; 4-5: identical twins far from everything.
    feats = np.array([[1, 0.00, 0], [1, 0.01, 0], [1, -0.01, 0], [0, 0, 1], [0, 1, 0.01], [0, 1, 0.01]],
                     dtype=np.float32)
    records = [{"id": f"s{i}", "group": g} for i, g in enumerate(groups)]
    return ScoringContext(records, features={"image": feats, "text": feats * 3.0})


def test_crowded_cluster_is_harder_than_isolated_points() -> None:
    ctx = _density_ctx(["a", "b", "c", "d", "twin", "twin"])
    result = create_scorer("cross_modal_density", k=2)(ctx)
    density = result.measurements["density_image"]
    assert set(result.measurements) == {"density_image", "density_text"}
    assert np.allclose(density, result.measurements["density_text"], atol=1e-6)  # cosine: scale-free
    assert density[:3].min() > 0.99 and abs(density[3]) < 0.01
    assert result.score[:3].min() > result.score[3:].max()
    # Twins share a group, so they are not each other's neighbours: nearly empty neighbourhood.
    assert density[4] < 0.02 and density[4] == pytest.approx(density[5])


def test_same_group_neighbours_are_excluded() -> None:
    apart = create_scorer("cross_modal_density", k=2)(_density_ctx(["a", "b", "c", "d", "t1", "t2"]))
    together = create_scorer("cross_modal_density", k=2)(_density_ctx(["a", "b", "c", "d", "t", "t"]))
    # As separate groups the twins are each other's nearest neighbour (cosine 1).
    assert apart.measurements["density_image"][4] == pytest.approx((1.0 + 0.01) / 2, abs=0.01)
    assert together.measurements["density_image"][4] < 0.02
    # A sample whose only other sample is in its group has no neighbours at all: neutral rank.
    assert math.isnan(knn_density(np.eye(2), np.array([0, 0]), k=3)[0])
    with pytest.raises(ConfigError, match="needs 'audio' features"):
        create_scorer("cross_modal_density", modalities=["audio"])(_density_ctx(list("abcdef")))


# ----- difficulty table -----------------------------------------------------------------


def _table() -> DifficultyTable:
    return DifficultyTable(
        ids=["a", "b", "c", "d"],
        scores={"text_nouns": np.array([1.0, 5.0, 2.0, 2.0]), "image_complexity": np.array([0.9, 0.1, 0.4, math.nan])},
        measurements={"text_nouns": {"nouns": np.array([1.0, 5.0, 2.0, 2.0])},
                      "image_complexity": {"edge_density": np.array([0.3, 0.01, 0.1, math.nan])}},
        meta={"note": ("tuple", 1)},
    )


def test_combined_is_a_weighted_rank_average() -> None:
    table = _table()
    nouns, image = [0.0, 1.0, 0.5, 0.5], [1.0, 0.0, 0.5, 0.5]  # NaN ranks in the middle
    combined = table.combined({"text_nouns": 1.0, "image_complexity": 3.0})
    assert np.allclose(combined, (np.array(nouns) + 3 * np.array(image)) / 4)
    assert combined.min() >= 0.0 and combined.max() <= 1.0
    assert np.allclose(table.combined({"text_nouns": 2.0}), nouns)
    with pytest.raises(ConfigError, match=r"'cross_modal_density' is not in this difficulty table; "
                                          r"it has: text_nouns, image_complexity"):
        table.combined({"cross_modal_density": 1.0})
    with pytest.raises(ConfigError, match="sum to 0"):
        table.combined({"text_nouns": 0.0})
    with pytest.raises(ConfigError, match=">= 0"):
        table.combined({"text_nouns": -1.0})


def test_table_round_trips_through_json(tmp_path: Path) -> None:
    table = _table()
    path = tmp_path / "difficulty.json"
    table.save(path)
    assert "NaN" not in path.read_text()  # strict JSON: NaN is stored as null
    loaded = DifficultyTable.load(path)
    assert loaded == table and loaded.ids == ["a", "b", "c", "d"]
    assert np.array_equal(loaded.scores["image_complexity"], table.scores["image_complexity"], equal_nan=True)
    assert loaded.explain(1) == {"id": "b", "text_nouns": 5.0, "text_nouns.rank": 1.0, "text_nouns.nouns": 5.0,
                                 "image_complexity": 0.1, "image_complexity.rank": 0.0,
                                 "image_complexity.edge_density": 0.01}
    assert loaded.explain(3)["image_complexity"] is None and loaded.explain(3)["image_complexity.rank"] == 0.5
    picked = loaded.select(["c", "a"])
    assert picked.ids == ["c", "a"] and picked.scores["text_nouns"].tolist() == [2.0, 1.0]
    with pytest.raises(OneEncoderError, match="1 sample.*'zz'"):
        loaded.select(["a", "zz"])
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(OneEncoderError, match="not a difficulty table"):
        DifficultyTable.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="expected \\(4,\\)"):
        DifficultyTable(["a", "b", "c", "d"], {"x": np.zeros(3)})


def test_compute_difficulty_on_the_real_cache(small_records, small_cache, stage_modalities, tmp_path) -> None:
    extra = {**small_records[0], "id": "not/cached"}
    with pytest.raises(ConfigError, match="unknown difficulty scorer 'bogus'"):
        compute_difficulty(small_records, small_cache, stage_modalities, ["bogus"], progress=False)
    table = compute_difficulty(small_records + [extra], small_cache, stage_modalities, list_scorers(),
                               progress=False, options={"cross_modal_density": {"k": 5}})
    assert table.ids == [r["id"] for r in small_records]  # one row per cached pair, manifest order
    assert table.scorers == list_scorers()
    for name, score in table.scores.items():
        assert score.shape == (len(small_records),) and np.isfinite(score).all(), name
    assert set(table.measurements["cross_modal_density"]) == {"density_image", "density_text"}
    assert set(table.measurements["image_complexity"]) == set(IMAGE_MEASUREMENTS)
    assert table.meta["fingerprints"]["text"]["preprocess_version"] == "text-v2"
    # Cached text measurements are the modality's own; pooled features average the cached tokens.
    text = stage_modalities["text"]
    with FeatureCache(cache_dir_for(small_cache, "text"), text.fingerprint(), readonly=True) as cache:
        rec = small_records[5]
        meas = cache.measurements([rec["id"]])[0]
        assert meas["n_tokens"] == len(text.preprocess(rec["caption"]))
        assert meas["n_words"] == len(rec["caption"].split()) and meas["n_chars"] == len(rec["caption"])
        pooled = pooled_features(cache, [rec["id"]])
        assert pooled.dtype == np.float32 and np.allclose(pooled[0], cache.get(rec["id"]).float().mean(0).numpy())
    i = table.ids.index(rec["id"])
    assert table.measurements["text_length"]["n_words"][i] == meas["n_words"]
    # Stored next to the cache, and read back unchanged.
    path = difficulty_path(tmp_path, ("image", "text"))
    assert path == tmp_path / "difficulty-image-text.json"
    table.save(path)
    assert DifficultyTable.load(path) == table
    print(table.explain(0))
