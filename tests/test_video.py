"""Video modality and the pybullet video set: real physics, real mp4 files, the real frozen backbone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pybullet")
av = pytest.importorskip("av")

import oneencoder.modalities.video  # noqa: F401, E402  (registers "video")
from oneencoder.data.manifest import caption_group  # noqa: E402
from oneencoder.data.sources import pybullet_video as pv  # noqa: E402
from oneencoder.data.sources.pybullet_scenes import CATALOG  # noqa: E402
from oneencoder.errors import ConfigError, OneEncoderError, SampleError  # noqa: E402
from oneencoder.features.cache import FeatureCache, build_cache, cache_dir_for, rejects_path  # noqa: E402
from oneencoder.modalities.video import VideoClip, sample_indices  # noqa: E402
from oneencoder.modality import create_modality  # noqa: E402

SMALL = {"objects": ("sphere", "cube"), "actions": ("drops", "bounces"), "clips_per_combo": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """2 objects x 2 actions x 2 clips, simulated and encoded as mp4 (about 3 s)."""
    out = tmp_path_factory.mktemp("video")
    return out, pv.video_records(out, progress=False, **SMALL)


@pytest.fixture(scope="module")
def by_id(dataset) -> dict[str, dict]:
    return {r["id"]: r for r in dataset[1]}


@pytest.fixture(scope="module")
def video():
    return create_modality("video")


@pytest.fixture(scope="module")
def backbone(video):
    return video.load_backbone()


def _first_frame(path: str) -> np.ndarray:
    with av.open(path) as container:
        return next(iter(container.decode(video=0))).to_ndarray(format="rgb24")


# ----- the dataset --------------------------------------------------------------------


def test_records_files_and_captions(dataset) -> None:
    out, records = dataset
    assert len(records) == 8
    rec = next(r for r in records if r["id"] == "bounces/sphere_001")
    assert rec["video"] == str(out / "clips" / "bounces" / "sphere_001.mp4")
    assert rec["caption"] == "A red ball bounces on the floor."
    assert rec["group"] == caption_group(rec["caption"])
    assert (rec["object"], rec["action"], rec["n_frames"], rec["fps"]) == ("sphere", "bounces", 16, 8)
    assert pv.caption("drops", "duck") == "A rubber duck drops onto the floor."
    assert pv.caption("spins", "mug") == "A coffee mug spins in place."
    assert not list(out.rglob("*.tmp*")), "temporary files left behind"
    json.dumps(records)  # records are plain JSON (a manifest line each)


def test_mp4_decodes_to_sixteen_224px_frames_at_8fps(dataset) -> None:
    with av.open(dataset[1][0]["video"]) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and float(stream.average_rate) == 8.0
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 16
    assert all(f.shape == (224, 224, 3) and f.dtype == np.uint8 for f in frames)
    # The keyframe PNG (for emergent video<->image retrieval) is the clip's middle frame.
    from PIL import Image

    keyframe = np.asarray(Image.open(dataset[1][0]["image"]).convert("RGB")).astype(int)
    assert keyframe.shape == (224, 224, 3)
    # Not equal: the mp4 stores 4:2:0 chroma, the PNG full RGB.
    assert np.abs(keyframe - frames[8]).mean() < np.abs(keyframe - frames[0]).mean()


@pytest.mark.bytes
def test_mp4_is_lossless_so_regenerated_data_decodes_to_the_same_pixels(by_id) -> None:
    clip = pv.simulate_clip("cube", "drops", seed=0, index=0)
    with av.open(by_id["drops/cube_000"]["video"]) as container:
        decoded = np.stack([f.to_ndarray(format="yuv420p") for f in container.decode(video=0)])
    expected = np.stack([pv.rgb_to_yuv420p(f) for f in clip.frames])
    assert decoded.shape == expected.shape == (16, 336, 224)
    assert np.array_equal(decoded, expected)
    # The conversion is BT.601 limited range: white -> Y 235, black -> Y 16, grey has neutral chroma.
    rgb = np.zeros((4, 2, 3), dtype=np.uint8)
    rgb[0, 0], rgb[2:] = 255, 128
    plane = pv.rgb_to_yuv420p(rgb)
    assert plane.shape == (6, 2) and plane[0].tolist() == [235, 16]
    assert abs(int(plane[5, 0]) - 128) <= 1 and abs(int(plane[5, 1]) - 128) <= 1  # achromatic blocks: neutral chroma
    with pytest.raises(OneEncoderError, match="height divisible by 4"):
        pv.write_mp4(Path("odd.mp4"), np.zeros((2, 6, 8, 3), dtype=np.uint8))


def test_physics_is_real_drop_lands_and_bounce_rises_again() -> None:
    h = pv.simulate_clip("sphere", "drops", render=False).heights
    assert h[0] > 0.5 and abs(h[-1] - 0.125) < 0.01  # released high, rests on the floor (radius 0.125 m)
    assert h[np.argmin(h):].max() - h.min() < 0.02  # no bounce: restitution 0
    bounce = pv.simulate_clip("sphere", "bounces", render=False).heights
    landing = int(np.argmax(np.diff(bounce) > 0))  # first step where it goes up again
    assert bounce[landing] < 0.15  # touched the floor (radius 0.125 m)...
    assert bounce[landing:].max() > bounce[landing] + 0.3  # ...and flew back up by > 0.3 m
    roll = pv.simulate_clip("soccer_ball", "rolls", render=False).positions
    assert np.linalg.norm(roll[-1, :2] - roll[0, :2]) > 0.5  # rolled away over the floor


def test_decoded_frames_change_over_time(dataset, by_id, video) -> None:
    clip = video.load(by_id["drops/cube_000"]["video"])
    m = video.difficulty(clip, torch.zeros(1))
    assert m["motion_energy"] > 1e-3
    assert m["objects_in_view"] == 1.0 and m["clip_length"] == 2.0 and m["n_frames"] == 16.0
    first, last = clip.frames[0].astype(float), clip.frames[-1].astype(float)
    assert np.abs(first - last).mean() > 0.5  # the cube moved between first and last frame


def test_valid_combos_follow_the_object_flags() -> None:
    combos = pv.valid_combos()
    rollers = {o for a, o in combos if a == "rolls"}
    assert rollers and all(CATALOG[o].rolls for o in rollers)
    assert not {o for a, o in combos if a == "slides"} & {o for o, s in CATALOG.items() if s.rolls}
    assert not {o for _, o in combos} & set(pv.EXCLUDED)
    assert {a for a, _ in combos} == set(pv.ACTIONS)
    with pytest.raises(OneEncoderError, match="table"):
        pv.valid_combos(objects=["table"])
    with pytest.raises(OneEncoderError, match="flies"):
        pv.valid_combos(actions=["flies"])
    with pytest.raises(OneEncoderError, match="not a valid"):
        pv.video_records("/nonexistent", heldout_combos=(("rolls", "cube"),), progress=False)


# ----- splits -----------------------------------------------------------------------


def _check_heldout_partners(records: list[dict]) -> None:
    held = {(r["action"], r["object"]) for r in records if r["heldout"] == "combo"}
    assert held
    train = [r for r in records if r["split"] == "train"]
    for action, obj in held:
        assert any(r["action"] == action for r in train), action
        assert any(r["object"] == obj for r in train), obj
        assert (action, obj) not in {(r["action"], r["object"]) for r in train}


def test_heldout_combos_are_test_only(dataset) -> None:
    records = dataset[1]
    held = {(r["action"], r["object"]) for r in records if r["heldout"] == "combo"}
    assert len(held) == 1
    for r in records:
        if (r["action"], r["object"]) in held:
            assert (r["split"], r["heldout"]) == ("test", "combo")
        else:
            assert (r["split"], r["heldout"]) == pv.clip_split(r["id"], False)
            assert r["heldout"] in (None, "seen_combo")
    _check_heldout_partners(records)


def test_default_split_of_the_full_dataset() -> None:
    """The plan of the full default set (no simulation): 15-20% combos held out, partners kept."""
    combos = pv.valid_combos()
    held = set(pv.default_heldout(combos))
    assert 0.15 <= len(held) / len(combos) <= 0.2
    records = []
    for action, obj in combos:
        for i in range(8):
            cid = f"{action}/{obj}_{i:03d}"
            split, heldout = pv.clip_split(cid, (action, obj) in held)
            records.append({"id": cid, "action": action, "object": obj, "split": split, "heldout": heldout})
    _check_heldout_partners(records)
    assert {r["split"] for r in records} == {"train", "val", "test"}
    summary = pv.summarize([{**r, "caption": ""} for r in records])
    assert summary["heldout_combos"] == len(held) and summary["clips"] == 8 * len(combos)


# ----- determinism and resume --------------------------------------------------------------


@pytest.mark.bytes
def test_same_seed_same_pixels_and_resume_skips_existing(dataset, tmp_path: Path) -> None:
    out, records = dataset
    mtimes = {r["id"]: os.stat(r["video"]).st_mtime_ns for r in records}
    again = pv.video_records(out, progress=False, **SMALL)
    assert again == records
    assert {r["id"]: os.stat(r["video"]).st_mtime_ns for r in again} == mtimes
    one = dict(objects=("cube",), actions=("drops",), clips_per_combo=1, heldout_combos=(), progress=False)
    fresh = pv.video_records(tmp_path / "a", **one)
    reference = next(r for r in records if r["id"] == "drops/cube_000")
    assert np.array_equal(_first_frame(fresh[0]["video"]), _first_frame(reference["video"]))
    other = pv.video_records(tmp_path / "b", seed=1, **one)
    assert not np.array_equal(_first_frame(other[0]["video"]), _first_frame(reference["video"]))


# ----- the modality -------------------------------------------------------------------


def test_sampling_uniform_and_at_fps(dataset, video) -> None:
    path = dataset[1][0]["video"]
    clip = video.load(path)
    assert clip.indices == [0, 2, 4, 6, 9, 11, 13, 15] and clip.n_frames == 16 and clip.fps == 8.0
    assert video.preprocess(clip).shape == (8, 3, 224, 224)
    assert len(create_modality("video", frames=3).load(path).frames) == 3
    assert len(create_modality("video", frames=40).load(path).frames) == 16  # never more than the clip has
    assert create_modality("video", fps=4.0).load(path).indices == list(range(0, 16, 2))
    assert create_modality("video", fps=2.0).load(path).indices == [0, 4, 8, 12]
    capped = create_modality("video", fps=8.0, max_frames=5)
    assert capped.max_tokens == 6 and len(capped.load(path).frames) == 5
    assert sample_indices(100, 25.0, 8, 0.0, 16) == [0, 14, 28, 42, 57, 71, 85, 99]
    frames = [np.full((32, 48, 3), i * 10, np.uint8) for i in range(5)]
    direct = video.load((frames, 5.0))
    assert direct.n_frames == 5 and direct.duration == 1.0 and len(direct.frames) == 5


def test_encode_shapes_masks_and_summary(dataset, video, backbone) -> None:
    full = video.preprocess(video.load(dataset[1][0]["video"]))
    short = video.preprocess(video.load([np.asarray(f) for f in video.load(dataset[1][1]["video"]).frames[:3]]))
    assert short.shape[0] == 3
    tokens, mask = video.encode(backbone, video.collate([full, short]))
    assert video.feature_dim == 2 * (1280 + 384) and video.max_tokens == 9
    assert tokens.shape == (2, 9, video.feature_dim) and tokens.dtype == torch.float32
    assert mask.tolist() == [[True] * 9, [True] * 4 + [False] * 5]
    assert torch.isfinite(tokens).all() and (tokens[1, 4:] == 0).all()
    half = video.frame_dim
    assert (tokens[:, 1, half:] == 0).all()  # the first frame has no previous frame
    assert torch.allclose(tokens[0, 3, half:], tokens[0, 3, :half] - tokens[0, 2, :half], atol=1e-5)
    # Summary token: mean of the frame features, then mean |change| between frames.
    assert torch.allclose(tokens[1, 0, :half], tokens[1, 1:4, :half].mean(0), atol=1e-5)
    assert torch.allclose(tokens[1, 0, half:], tokens[1, 2:4, half:].abs().mean(0), atol=1e-5)
    alone, _ = video.encode(backbone, video.collate([short]))
    assert torch.allclose(alone[0], tokens[1, :4], atol=1e-4)  # batching does not change a clip
    lo, hi = video.language_slice()
    assert (lo, hi) == (1280, 1664)
    sem = tokens[:, 1:, lo:hi][mask[:, 1:]]  # label semantics of every frame: unit RMS
    assert torch.allclose(sem.pow(2).mean(-1), torch.ones(sem.shape[0]), atol=1e-3)


def test_options_shape_the_tokens(backbone) -> None:
    plain = create_modality("video", motion=False, summary_token=False, frames=4)
    assert (plain.feature_dim, plain.max_tokens, plain.language_slice()) == (1664, 4, None)
    assert create_modality("video", semantic=False).feature_dim == 2 * 1280
    fp = create_modality("video").fingerprint()
    assert fp["weights_sha256"] != create_modality("image").weights_sha256() and len(fp["weights_sha256"]) == 64
    for bad in ({"frames": 0}, {"fps": -1.0}, {"max_frames": "8"}, {"image": {"tokens": "grid"}},
                {"image": {"semantic": False}}, {"image": {"bogus": 1}}, {"image": {"backbone": "timm:x"}}):
        with pytest.raises(ConfigError, match="modalities.video"):
            create_modality("video", **bad)


def _zero_frame_video(path: Path, fmt: str, codec: str) -> None:
    """A valid container whose video stream holds no frames (mp4 drops the empty track, avi keeps it)."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()


def test_bad_videos_raise_sample_error_naming_the_file(video, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    zero_mp4, zero_avi = tmp_path / "zero_frames.mp4", tmp_path / "zero_frames.avi"
    _zero_frame_video(zero_mp4, "mp4", "libx264")
    _zero_frame_video(zero_avi, "avi", "mpeg4")
    for path, why in ((garbage, "cannot decode"), (empty, "empty"), (zero_mp4, "no video stream"),
                      (zero_avi, "video has no frames"), (tmp_path / "missing.mp4", "not found")):
        with pytest.raises(SampleError, match=path.name) as err:
            video.load(str(path))
        assert err.match(why)
    with pytest.raises(SampleError, match="no frames"):
        video.load([])
    with pytest.raises(SampleError, match="shape"):
        video.load([np.zeros((4, 4, 7), np.uint8)])


def test_difficulty_never_raises(video) -> None:
    still = video.load([np.full((40, 40, 3), 200, np.uint8)] * 4)
    m = video.difficulty(still, torch.zeros(1))
    assert m["motion_energy"] == 0.0 and m["objects_in_view"] == 0.0 and m["clip_length"] == 0.5
    broken = video.difficulty(VideoClip([], [], 0, 0.0, "x"), torch.zeros(1))
    assert set(broken) == {"motion_energy", "objects_in_view", "clip_length", "n_frames"}


def test_build_cache_rejects_the_corrupt_clip_and_keeps_the_rest(dataset, video, tmp_path: Path) -> None:
    good = [r for r in dataset[1] if r["object"] == "sphere"]
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    bad = {**good[0], "id": "bad/corrupt", "video": str(corrupt)}
    report = build_cache(video, good + [bad], tmp_path / "cache", batch_size=4, progress=False)
    assert report.encoded == len(good) and set(report.rejects) == {"bad/corrupt"}
    assert "corrupt.mp4" in report.rejects["bad/corrupt"]
    lines = [json.loads(x) for x in rejects_path(tmp_path / "cache", "video").read_text().splitlines()]
    assert [(x["id"], x["modality"]) for x in lines] == [("bad/corrupt", "video")]
    with FeatureCache(cache_dir_for(tmp_path / "cache", "video"), video.fingerprint(), readonly=True) as cache:
        assert cache.ids() == {r["id"] for r in good}
        assert cache.get(good[0]["id"]).shape == (9, video.feature_dim)
        assert cache.measurements([good[0]["id"]])[0]["motion_energy"] > 0
