"""Hostile inputs to the modalities and the API (issue 26, items 3, 6, 7, 8 and 9).

Each input here once ran unbounded native work, aborted a batch, printed a raw traceback
or gave a silently wrong result. Now it is refused in one line naming the sample, or
handled correctly:

* SMILES over the size caps (4,096 characters, 600 atoms) are refused before RDKit's
  super-linear work; text after a SMILES ("O=C=O extra words") is refused;
* 16-bit grey PNGs and float TIFFs are read with their real range, not clipped at 255;
  images over 8192 x 8192 pixels are refused from their header;
* a depth ``.npy`` whose header claims 100000 x 100000 is refused from the header;
* closed PIL images, mode ``La``, 0x0 images and ``meta`` tensors given to ``encode``.

The hypothesis properties draw odd PIL modes and huge ``.npy`` headers (derandomized, no
example database).
"""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib import format as npformat
from PIL import Image

import oneencoder
from oneencoder.errors import SampleError
from oneencoder.features.cache import build_cache
from oneencoder.modalities.depth import MAX_DEPTH_VALUES
from oneencoder.modalities.image import MAX_IMAGE_PIXELS
from oneencoder.modalities.molecule import MAX_SMILES_ATOMS, MAX_SMILES_CHARS, parse_smiles
from oneencoder.modality import create_modality

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=60,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
BADGER = Path("/usr/share/tuxpaint/stamps/animals/mammals/badger.png")


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert text and "\n" not in text, text
    return text


def png_header_only(path: Path, width: int, height: int, bit_depth: int = 8) -> Path:
    """A grey PNG whose header claims ``width`` x ``height`` but holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


def npy_bytes(shape: tuple[int, ...], descr: str, data: bytes, version: tuple[int, int] = (1, 0)) -> bytes:
    """A ``.npy`` file's bytes with any header, true or not, followed by ``data``."""
    f = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    (npformat.write_array_header_1_0 if version == (1, 0) else npformat.write_array_header_2_0)(f, header)
    return f.getvalue() + data


@pytest.fixture(scope="module")
def molecule():
    return create_modality("molecule")


@pytest.fixture(scope="module")
def small_image():
    """The image modality's preprocessing at 32 px: what these checks compare, ten times faster."""
    return create_modality("image", semantic=False, image_size=32)


@pytest.fixture(scope="module")
def depth():
    return create_modality("depth")


@pytest.fixture(scope="module")
def model(trained_model):
    return oneencoder.load(trained_model["dir"], device="cpu")


# ----- item 3 and 9: SMILES ------------------------------------------------------------------


def test_a_200000_atom_smiles_is_refused_in_well_under_a_second() -> None:
    start = time.perf_counter()
    with pytest.raises(SampleError) as info:
        parse_smiles("C" * 200_000)
    assert time.perf_counter() - start < 0.5
    assert f"over the limit of {MAX_SMILES_CHARS:,} characters" in one_line(info)
    assert len(str(info.value)) < 200  # the SMILES is quoted shortened, not whole


def test_the_atom_cap_is_checked_before_sanitising() -> None:
    assert parse_smiles("C" * MAX_SMILES_ATOMS).GetNumAtoms() == MAX_SMILES_ATOMS  # at the cap: accepted
    ringy = "c1ccccc1" + "-c1ccccc1" * 120  # 726 atoms in 1,088 characters: under the character cap
    start = time.perf_counter()
    with pytest.raises(SampleError) as info:
        parse_smiles(ringy)
    assert time.perf_counter() - start < 0.5
    assert f"has 726 atoms, over the limit of {MAX_SMILES_ATOMS}" in one_line(info)


@pytest.mark.parametrize("smiles", ["O=C=O extra words", "CCO\tethanol", "CCO\nCCC", "C C", "CCO |$;;$| name"])
def test_text_after_a_smiles_is_refused(smiles: str) -> None:
    with pytest.raises(SampleError, match="is not SMILES") as info:
        parse_smiles(smiles)
    one_line(info)


def test_whitespace_around_a_smiles_and_a_cxsmiles_block_are_still_accepted() -> None:
    assert parse_smiles("  O=C=O\n").GetNumAtoms() == 3
    assert parse_smiles("CCO |$;;$|").GetNumAtoms() == 3  # CXSMILES extensions follow one space


def test_a_wrong_first_word_still_gets_rdkits_reason() -> None:
    with pytest.raises(SampleError, match="Parse Error"):
        parse_smiles("not a smiles")
    with pytest.raises(SampleError, match="control characters"):
        parse_smiles("CCO\x00C")


def test_cache_build_rejects_an_oversized_smiles_and_encodes_the_rest(molecule, tmp_path: Path) -> None:
    records = [{"id": "co2", "smiles": "O=C=O", "split": "train"},
               {"id": "huge", "smiles": "C" * 200_000, "split": "train"},
               {"id": "named", "smiles": "O=C=O extra words", "split": "train"},
               {"id": "ethanol", "smiles": "CCO", "split": "train"}]
    start = time.perf_counter()
    report = build_cache(molecule, records, tmp_path, batch_size=4, progress=False)
    assert time.perf_counter() - start < 10
    assert report.encoded == 2 and set(report.rejects) == {"huge", "named"}
    assert "4,096 characters" in report.rejects["huge"] and "is not SMILES" in report.rejects["named"]


@FUZZ
@given(smiles=st.sampled_from(["O=C=O", "CCO", "c1ccccc1", "CC(=O)O"]),
       gap=st.text(alphabet=" \t\r\n\x0b\x0c\u00a0\u2003", min_size=1, max_size=3),
       tail=st.text(min_size=1, max_size=12).filter(lambda t: t.strip()))
def test_any_text_after_a_valid_smiles_is_refused_in_one_line(smiles: str, gap: str, tail: str) -> None:
    text = smiles + gap + tail
    try:
        mol = parse_smiles(text)
    except SampleError as e:
        assert "\n" not in str(e)
        return
    # Only "<smiles> |...|" (a CXSMILES block after one space) may be accepted.
    assert gap == " " and tail.strip().startswith("|") and tail.strip().endswith("|"), (text, mol)


# ----- item 6: 16-bit and float images, pixel limit ------------------------------------------


@pytest.fixture(scope="module")
def badger_greys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The badger on white as 8-bit grey (the reference), 16-bit grey PNG and float TIFF."""
    rgba = Image.open(BADGER).convert("RGBA")
    grey = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("L")
    out = tmp_path_factory.mktemp("badger")
    paths = {"8-bit": out / "badger8.png", "16-bit": out / "badger16.png", "float": out / "badger.tif",
             "int32": out / "badger32.tif"}
    grey.save(paths["8-bit"])
    values = np.asarray(grey)
    Image.fromarray(values.astype(np.uint16) * 257).save(paths["16-bit"])  # 65535 = white
    Image.fromarray(values.astype(np.float32) / 255).save(paths["float"])  # 1.0 = white
    Image.fromarray(values.astype(np.int32) * 257).save(paths["int32"])  # 16-bit values in 32 bits
    return paths


def test_16_bit_and_float_badgers_embed_like_the_8_bit_one(image_modality, image_backbone, badger_greys) -> None:
    modes = {name: Image.open(p).mode for name, p in badger_greys.items()}
    assert modes == {"8-bit": "L", "16-bit": "I;16", "float": "F", "int32": "I"}
    names = list(badger_greys)
    items = [image_modality.prepare(badger_greys[n])[1] for n in names]
    # What the old code did: Pillow's own conversion, which clips every value over 255 to white.
    clipped = image_modality.preprocess(Image.open(badger_greys["16-bit"]).convert("RGB"))
    tokens, _ = image_modality.featurize(image_backbone, items + [clipped])
    feats = torch.nn.functional.normalize(tokens.flatten(1), dim=-1)
    cos = (feats @ feats[0]).tolist()
    for name, c in zip(names[1:], cos[1:len(names)]):
        assert c >= 0.99, (name, c)
    assert cos[-1] < 0.9, cos  # the check can tell: the clipped badger is far from the original


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(small_image, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 8  # just over the limit
    paths = (png_header_only(tmp_path / "big.png", side, side),
             png_header_only(tmp_path / "bomb.png", 100_000, 100_000))
    for pillow_check in (True, False):  # an application may switch Pillow's own check off
        if not pillow_check:
            monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
        for path in paths:
            start = time.perf_counter()
            with pytest.raises(SampleError, match=f"over the limit of {MAX_IMAGE_PIXELS:,} pixels") as info:
                small_image.load(path)
            assert time.perf_counter() - start < 1.0
            assert str(path) in one_line(info)


# ----- item 7: depth .npy headers -------------------------------------------------------------


def test_a_100000_square_npy_header_is_refused_before_allocation(depth, tmp_path: Path) -> None:
    path = tmp_path / "huge.npy"
    path.write_bytes(npy_bytes((100_000, 100_000), "<f4", b"\x00" * 64))
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(SampleError) as info:
            depth.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0 and peak < 16 * 2**20
    assert str(path) in one_line(info) and "(100000, 100000)" in str(info.value)
    assert f"over the limit of {MAX_DEPTH_VALUES:,} values" in str(info.value)


def test_a_huge_depth_header_is_one_reject_in_a_cache_build(depth, tmp_path: Path) -> None:
    good = tmp_path / "good.npy"
    np.save(good, np.linspace(0.5, 2.0, 64 * 48, dtype=np.float32).reshape(48, 64))
    huge = tmp_path / "huge.npy"
    huge.write_bytes(npy_bytes((100_000, 100_000), "<f8", b""))
    zipped = tmp_path / "huge.npz"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("depth.npy", npy_bytes((100_000, 100_000), "<f4", b""))
    wide_png = png_header_only(tmp_path / "wide.png", 9000, 9000, bit_depth=16)
    records = [{"id": "good", "depth": str(good), "split": "train"},
               {"id": "huge", "depth": str(huge), "split": "train"},
               {"id": "zipped", "depth": str(zipped), "split": "train"},
               {"id": "wide", "depth": str(wide_png), "split": "train"}]
    report = build_cache(depth, records, tmp_path / "cache", batch_size=4, progress=False)
    assert report.encoded == 1 and set(report.rejects) == {"huge", "zipped", "wide"}
    assert all("over the limit" in reason for reason in report.rejects.values()), report.rejects


def test_a_truncated_npy_is_refused_from_its_header(depth, tmp_path: Path) -> None:
    path = tmp_path / "short.npy"
    path.write_bytes(npy_bytes((100, 100), "<f4", b"\x3f" * 100))
    with pytest.raises(SampleError, match="truncated .npy: its header claims 40,000 bytes") as info:
        depth.load(path)
    one_line(info)


_DESCRS = ["<f4", "<f8", ">f4", "<f2", "<i2", "<u2", "<i8", "|u1", "|b1", "<c8", "|O", "<U3", "|V4"]
_SHAPES = st.one_of(st.tuples(st.integers(2, 9), st.integers(2, 9)),  # a real (tiny) depth map
                    st.lists(st.one_of(st.integers(0, 6), st.integers(0, 10**12)), max_size=4).map(tuple))


@FUZZ
@given(shape=_SHAPES, descr=st.sampled_from(_DESCRS), version=st.sampled_from([(1, 0), (2, 0)]),
       fill=st.sampled_from(["exact", "short", "long"]), as_npz=st.booleans())
def test_any_npy_header_loads_or_is_one_sample_error_without_allocating(depth, tmp_path: Path, shape, descr,
                                                                         version, fill, as_npz) -> None:
    values = int(np.prod(shape, dtype=object)) if shape else 1
    itemsize = np.dtype(descr).itemsize if descr != "|O" else 8
    exact = values * itemsize if values * itemsize <= 4096 else 64
    tail = {"exact": exact, "short": exact // 2, "long": exact + 7}[fill]
    data = npy_bytes(shape, descr, b"\x3f" * tail, version)  # 0x3f: positive floats and ints
    path = tmp_path / ("d.npz" if as_npz else "d.npy")
    if as_npz:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("depth.npy", data)
    else:
        path.write_bytes(data)
    values = int(np.prod(shape, dtype=object)) if shape else 1
    tracemalloc.start()
    start = time.perf_counter()
    try:
        loaded, error = depth.load(path), None
    except SampleError as e:
        loaded, error = None, e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - start < 2.0
    assert peak < 32 * 2**20  # never the size the header claims
    if error is not None:
        assert "\n" not in str(error) and str(path) in str(error)
        # Over the limit: refused for its size, or first for its dtype (pickled objects, bools...).
        assert values <= MAX_DEPTH_VALUES or "over the limit" in str(error) or "dtype" in str(error), str(error)
        event("refused")
    else:
        event("loaded")
        assert loaded.depth.ndim == 2 and loaded.depth.size <= MAX_DEPTH_VALUES


# ----- item 8 and 9: the API and odd PIL images ------------------------------------------------


def test_api_refuses_closed_empty_and_meta_inputs_in_one_line(model) -> None:
    closed = Image.open(BADGER)
    closed.load()
    closed.close()
    cases = {"closed": (closed, "Operation on closed image"),
             "0x0": (Image.new("RGB", (0, 0)), "empty image (0x0 pixels)"),
             "meta": (torch.empty(3, 8, 8, device="meta"), "'meta' device has no values")}
    for name, (value, message) in cases.items():
        with pytest.raises(SampleError) as info:
            model.encode("image", value)
        assert one_line(info).startswith("image input #0: ") and message in str(info.value), name


def test_api_embeds_premultiplied_alpha_like_straight_alpha(model) -> None:
    la = Image.open(BADGER).convert("LA")
    rgba = Image.open(BADGER).convert("RGBA")
    out = model.encode("image", [la.convert("La"), la, rgba.convert("RGBa"), rgba])
    cos = out @ out.T
    assert cos[0, 1] > 0.99 and cos[2, 3] > 0.99, cos


def test_a_bad_image_in_an_index_is_a_reject_not_an_abort(model) -> None:
    rejected: list[tuple[int, str]] = []
    closed = Image.new("RGB", (8, 8))
    closed.close()
    emb, kept = model._embed("image", [Image.open(BADGER), closed, Image.new("RGB", (0, 0))], 8, False,
                             on_error=lambda i, _x, reason: rejected.append((i, reason)))
    assert kept == [0] and emb.shape[0] == 1 and [i for i, _ in rejected] == [1, 2]


def test_video_audio_and_depth_refuse_meta_tensors(depth) -> None:
    meta = torch.empty(4, 8, 8, 3, device="meta")
    for name, modality, value in (("video", create_modality("video"), meta),
                                  ("depth", depth, torch.empty(8, 8, device="meta")),
                                  ("audio", create_modality("audio"), torch.empty(4410, device="meta"))):
        with pytest.raises(SampleError, match="'meta' device has no values") as info:
            modality.load(value)
        one_line(info)


def test_video_frames_as_odd_pil_images() -> None:
    video = create_modality("video")
    frames = [Image.open(BADGER).convert("LA").convert("La")] * 2
    clip = video.load(frames)
    assert len(clip.frames) >= 1 and clip.frames[0].shape == (75, 191, 3)
    closed = Image.new("RGB", (8, 8))
    closed.close()
    with pytest.raises(SampleError, match=r"frames\[0\].*closed") as info:
        video.load([closed])
    one_line(info)


_MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "La", "PA", "RGBa",
          "RGBX", "I;16", "I;16L", "I;16B", "I;16N"]


@settings(FUZZ, max_examples=100)
@given(mode=st.sampled_from(_MODES), width=st.sampled_from([1, 2, 3, 5, 6, 0]),
       height=st.sampled_from([1, 2, 4, 6, 0]),
       seed=st.integers(0, 2**32 - 1), closed=st.booleans())
def test_any_pil_mode_preprocesses_to_finite_pixels_or_one_sample_error(small_image, mode, width, height,
                                                                        seed, closed) -> None:
    n_bytes = len(Image.new(mode, (width, height)).tobytes())
    noise = np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()
    img = Image.frombytes(mode, (width, height), noise) if n_bytes else Image.new(mode, (width, height))
    if closed:
        img.close()
    try:
        raw = small_image.load(img)
        pixels = small_image.preprocess(raw)
    except SampleError as e:
        assert "\n" not in str(e)
        assert closed or width * height == 0 or mode == "F", (mode, str(e))  # F: NaN/inf from noise bytes
        event(f"refused: {str(e).partition(': ')[2][:30]}")
        return
    assert not closed and width * height > 0
    size = int(small_image.options["image_size"])
    assert pixels.shape == (3, size, size) and torch.isfinite(pixels).all()
    small_image.difficulty(raw, pixels)  # measurements never raise either
    event(f"accepted {mode}")


@settings(FUZZ, max_examples=40)
@given(values=st.lists(st.integers(0, 255), min_size=1, max_size=24), width=st.integers(1, 6))
def test_wide_grey_modes_keep_their_real_range(small_image, values, width) -> None:
    """16-bit grey scaled by 257, floats in [0, 1] by 255, and 0-255 ints as before: all read as 8-bit."""
    rows = -(-len(values) // width)
    grey = np.resize(np.asarray(values, np.uint8), (rows, width))
    reference = small_image.preprocess(small_image.load(Image.fromarray(grey)))
    wides = [Image.fromarray(grey.astype(np.uint16) * 257), Image.fromarray(grey.astype(np.float32) / 255),
             Image.fromarray(grey.astype(np.int32))]
    if grey.max() > 1:  # a float image whose values all lie in [0, 1] is read as a [0, 1] image
        wides.append(Image.fromarray(grey.astype(np.float32)))
    for wide in wides:
        got = small_image.preprocess(small_image.load(wide))
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-6, msg=wide.mode)
