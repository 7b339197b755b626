"""Depth modality and the pybullet RGB-D renders, on small real renders (no mocks)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import oneencoder.modalities.depth  # noqa: F401  (registers "depth")
from oneencoder.data.manifest import caption_group
from oneencoder.errors import ConfigError, SampleError
from oneencoder.features.cache import FeatureCache, build_cache, cache_dir_for, rejects_path
from oneencoder.modalities.depth import ENCODINGS, DepthMap

pytest.importorskip("pybullet")

from oneencoder.data.sources.pybullet_rgbd import pose_split, rgbd_records, summarize  # noqa: E402
from oneencoder.modality import create_modality  # noqa: E402

OBJECTS = ("duck", "cube", "bunny")
HELDOUT = ("bunny",)
PER_OBJECT = 2


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("rgbd")
    return rgbd_records(out, renders_per_object=PER_OBJECT, heldout_objects=HELDOUT, objects=OBJECTS, progress=False)


@pytest.fixture(scope="module")
def depth():
    return create_modality("depth")


def _metres(path: str) -> np.ndarray:
    """A render's depth, read with numpy alone (not through the modality under test)."""
    with np.load(path) as archive:
        return archive["depth"]


@pytest.fixture(scope="module")
def backbone(depth):
    return depth.load_backbone()  # the image backbone, memoised per session by conftest


# ----- renders ---------------------------------------------------------------------------


def test_records_files_and_splits(renders: list[dict]) -> None:
    assert [r["id"] for r in renders] == [f"{o}/{o}_{i:03d}" for o in OBJECTS for i in range(PER_OBJECT)]
    for r in renders:
        assert Path(r["image"]).is_file() and Path(r["depth"]).is_file()
        assert Path(r["image"]).parent.name == Path(r["depth"]).parent.name == r["object"]
        assert r["caption"].endswith(".") and r["caption"][0].isupper()
        assert r["group"] == caption_group(r["caption"])
        assert set(r["camera"]) == {"fov", "distance", "yaw", "pitch"}
        assert -70 <= r["camera"]["pitch"] <= -10 and 0 <= r["camera"]["yaw"] <= 360
        if r["object"] in HELDOUT:
            assert (r["split"], r["heldout"]) == ("test", "object")
        else:
            assert r["split"] == pose_split(r["id"])
            assert r["heldout"] == (None if r["split"] == "train" else "pose")
    assert renders[0]["caption"] == "A rubber duck."
    assert json.loads(json.dumps(renders)) == renders  # manifest-ready
    counts = summarize(renders)
    assert counts["renders"] == 6 and counts["objects"] == 3 and counts["heldout_object"] == PER_OBJECT


@pytest.mark.bytes
def test_rerender_is_identical_and_resume_skips_done_files(renders: list[dict], tmp_path: Path) -> None:
    again = rgbd_records(tmp_path, renders_per_object=PER_OBJECT, heldout_objects=HELDOUT, objects=("cube",),
                         progress=False)
    first = [r for r in renders if r["object"] == "cube"]
    for a, b in zip(first, again):
        assert np.array_equal(_metres(a["depth"]), _metres(b["depth"]))
        assert np.array_equal(np.asarray(Image.open(a["image"])), np.asarray(Image.open(b["image"])))
        assert a["camera"] == b["camera"] and a["split"] == b["split"]
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    resumed = rgbd_records(tmp_path, renders_per_object=PER_OBJECT, heldout_objects=HELDOUT, objects=("cube",),
                           progress=False)
    assert resumed == again
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files


def test_depth_is_metric_and_background_is_empty(renders: list[dict]) -> None:
    for r in renders:
        d = _metres(r["depth"])
        rgb = np.asarray(Image.open(r["image"]))
        assert d.dtype == np.float32 and d.shape == rgb.shape[:2] == (224, 224)
        valid = d > 0
        assert 0.02 < valid.mean() < 0.9  # the object is in view, and so is some background
        assert (rgb[~valid] == 255).all()  # background white, as the image adapter's cut-outs
        # The object fits a sphere of radius <= 0.65 * distance around the target (framing
        # distance times a jitter >= 0.8), so every hit lies within that of the camera distance.
        dist = r["camera"]["distance"]
        assert dist * 0.35 < d[valid].min() and d[valid].max() < dist * 1.65, (r["id"], dist)
    cube = create_modality("depth").load(renders[2]["depth"])
    assert renders[2]["object"] == "cube"
    # A 0.2 m cube: its visible depth extent is at most its diagonal.
    assert 0.01 < create_modality("depth").difficulty(cube, torch.zeros(1))["depth_range"] < 0.2 * 3 ** 0.5


# ----- preprocessing ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoded(renders: list[dict]) -> dict[str, torch.Tensor]:
    out = {}
    for enc in ENCODINGS:
        m = create_modality("depth", encoding=enc)
        out[enc] = m.preprocess(m.load(renders[0]["depth"]))
    return out


def test_every_encoding_gives_normalised_pixels(encoded: dict[str, torch.Tensor]) -> None:
    for enc, x in encoded.items():
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32, enc
        assert torch.isfinite(x).all() and x.min() >= -1.0 and x.max() <= 1.0, enc
        assert (x[:, 0, 0] == -1.0).all(), enc  # missing pixels are 0 before the (0.5, 0.5) normalisation
        assert (x > -1.0).any(dim=0).float().mean() > 0.02, enc  # the object is encoded
    for a, b in itertools.combinations(ENCODINGS, 2):
        assert (encoded[a] - encoded[b]).abs().mean() > 0.01, (a, b)
    # Disparity replicates one channel; the nearest point is the brightest.
    d = encoded["disparity"]
    assert torch.equal(d[0], d[1]) and torch.equal(d[0], d[2]) and float(d.max()) == 1.0


def test_preprocess_is_deterministic_and_pads_non_square(depth, renders: list[dict]) -> None:
    raw = depth.load(renders[0]["depth"])
    assert torch.equal(depth.preprocess(raw), depth.preprocess(raw))
    wide = depth.load(np.pad(raw.depth, ((0, 0), (50, 50))))  # 224 x 324: letterboxed, not stretched
    x = depth.preprocess(wide)
    assert x.shape == (3, 224, 224) and (x[:, :10] == -1).all() and (x[:, -10:] == -1).all()


def test_npy_npz_and_16bit_png_round_trip(depth, renders: list[dict], tmp_path: Path) -> None:
    metres = _metres(renders[1]["depth"])
    png = tmp_path / "depth_mm.png"
    Image.fromarray(np.round(metres * 1000).astype(np.uint16)).save(png)
    assert Image.open(png).mode.startswith("I")
    from_png = depth.load(png)
    assert np.abs(from_png.depth - metres).max() <= 0.0006  # millimetre quantisation
    for enc in ENCODINGS:
        m = create_modality("depth", encoding=enc)
        diff = (m.preprocess(m.load(png)) - m.preprocess(m.load(renders[1]["depth"]))).abs()
        # Millimetre steps at ~0.2 m add some noise to normals; disparity barely moves.
        assert diff.mean() < (0.01 if enc == "disparity" else 0.03), enc
        if enc == "disparity":
            assert diff.max() < 0.1
    # Tensors and integer arrays load too (integers are sensor units, like the PNG).
    assert np.array_equal(depth.load(torch.from_numpy(metres)).depth, depth.load(metres).depth)
    assert np.allclose(depth.load(np.round(metres * 1000).astype(np.uint16)).depth, from_png.depth)
    assert depth.load(metres[..., None]).depth.shape == metres.shape
    # The renders are compressed .npz; a plain .npy and an .npz with another key read the same.
    np.save(tmp_path / "plain.npy", metres)
    np.savez(tmp_path / "other_key.npz", anything=metres)
    for path in (tmp_path / "plain.npy", tmp_path / "other_key.npz"):
        assert np.array_equal(depth.load(path).depth, depth.load(renders[1]["depth"]).depth)


# ----- bad input -------------------------------------------------------------------------


def test_all_nan_map_is_a_sample_error_naming_the_file(depth, tmp_path: Path) -> None:
    path = tmp_path / "all_nan.npy"
    np.save(path, np.full((32, 32), np.nan, np.float32))
    with pytest.raises(SampleError, match=r"all_nan\.npy.*no valid pixels"):
        depth.load(path)
    with pytest.raises(SampleError, match="no valid pixels"):
        depth.load(np.zeros((8, 8), np.float32))


def test_partially_missing_map_is_accepted(depth, renders: list[dict]) -> None:
    metres = _metres(renders[0]["depth"])
    holes = metres.copy()
    holes[:, ::2] = np.nan
    holes[0, 0], holes[0, 1] = -1.0, np.inf
    full, partial = depth.load(metres), depth.load(holes)
    m_full = depth.difficulty(full, torch.zeros(1))
    m_part = depth.difficulty(partial, torch.zeros(1))
    assert m_part["occluded_fraction"] > m_full["occluded_fraction"] > 0
    assert m_part["valid_fraction"] == pytest.approx(1 - m_part["occluded_fraction"])
    assert torch.isfinite(depth.preprocess(partial)).all()
    assert set(m_full) == {"depth_range", "edge_density", "occluded_fraction", "valid_fraction"}
    assert all(np.isfinite(v) for v in m_full.values()) and 0 <= m_full["edge_density"] < 1


@pytest.mark.parametrize("case", ["missing", "rgb_array", "rgb_npy", "text_npy", "pickle_npy", "rgb_png",
                                  "text_npz", "two_arrays_npz"])
def test_bad_inputs_raise_sample_error(depth, tmp_path: Path, case: str) -> None:
    rgb = np.zeros((16, 16, 3), np.uint8)
    path = tmp_path / f"{case}.npy"
    if case == "rgb_array":
        with pytest.raises(SampleError, match="RGB image is not a depth map"):
            depth.load(rgb)
        return
    if case == "rgb_npy":
        np.save(path, rgb)
    elif case == "text_npy":
        path.write_text("this is not a numpy file\n")
    elif case == "pickle_npy":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif case == "rgb_png":
        path = tmp_path / "photo.png"
        Image.fromarray(rgb).save(path)
    elif case == "text_npz":
        path = tmp_path / "notes.npz"
        path.write_text("not a zip archive\n")
    elif case == "two_arrays_npz":
        path = tmp_path / "two.npz"
        np.savez(path, a=np.ones((4, 4)), b=np.ones((4, 4)))
    with pytest.raises(SampleError, match=path.name) as err:
        depth.load(path)
    expected = {"text_npy": "no NumPy header", "text_npz": "not a zip archive", "two_arrays_npz": "name the depth array"}
    if case in expected:
        assert expected[case] in str(err.value)


def test_difficulty_never_raises(depth) -> None:
    m = depth.difficulty(DepthMap(np.array([]), "broken"), torch.zeros(1))
    assert set(m) == {"depth_range", "edge_density", "occluded_fraction", "valid_fraction"}


def test_cache_build_rejects_nan_map_and_keeps_the_rest(depth, renders: list[dict], tmp_path: Path) -> None:
    nan_path = tmp_path / "nan.npy"
    np.save(nan_path, np.full((24, 24), np.nan, np.float32))
    records = [*renders, {"id": "bad/nan", "depth": str(nan_path), "split": "train"}]
    report = build_cache(depth, records, tmp_path / "cache", batch_size=4, progress=False)
    assert report.encoded == len(renders) and set(report.rejects) == {"bad/nan"}
    rows = [json.loads(line) for line in rejects_path(tmp_path / "cache", "depth").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["bad/nan"]
    assert "nan.npy" in rows[0]["reason"] and "no valid pixels" in rows[0]["reason"]
    with FeatureCache(cache_dir_for(tmp_path / "cache", "depth"), depth.fingerprint(), readonly=True) as cache:
        assert cache.ids() == {r["id"] for r in renders}
        assert cache.get(renders[0]["id"]).shape == (1, depth.feature_dim)
        assert cache.measurements([renders[0]["id"]])[0]["valid_fraction"] > 0


# ----- encoding and identity -------------------------------------------------------------


def test_encode_shape_and_language_slice(depth, backbone, renders: list[dict]) -> None:
    batch = depth.collate([depth.preprocess(depth.load(r["depth"])) for r in renders[:3]])
    tokens, mask = depth.encode(backbone, batch)
    assert tokens.shape == (3, 1, 1280) == (3, depth.max_tokens, depth.feature_dim)
    assert torch.isfinite(tokens).all() and mask.shape == (3, 1) and bool(mask.all())
    assert not torch.allclose(tokens[0], tokens[2], atol=1e-3)  # a duck is not a cube
    assert depth.language_slice() is None
    semantic = create_modality("depth", semantic=True)
    image = create_modality("image", semantic=True)
    assert semantic.feature_dim == image.feature_dim and semantic.language_slice() == image.language_slice()


def test_spec_options_and_fingerprint(depth) -> None:
    image = create_modality("image", semantic=False)
    assert depth.spec.record_key == "depth" and depth.spec.default_anchor == "image"
    assert depth.backbone_id == image.backbone_id == depth.spec.backbone
    assert len(depth.weights_sha256()) == 64 and depth.weights_sha256() != image.weights_sha256()
    assert create_modality("depth", tokens="grid").max_tokens == 49
    fps = {json.dumps(create_modality("depth", encoding=e).fingerprint(), sort_keys=True) for e in ENCODINGS}
    assert len(fps) == len(ENCODINGS)  # caches of different encodings never mix
    for bad in ({"encoding": "rgb"}, {"fov": 0}, {"depth_scale": -1}, {"tokens": "bogus"}, {"nope": 1}):
        with pytest.raises(ConfigError):
            create_modality("depth", **bad)
