"""``encode`` ergonomics: arrays and tensors as inputs, batches, progress bars, numpy output, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import oneencoder
from oneencoder.errors import ConfigError, SampleError
from oneencoder.features.inputs import as_batch, image_from_array
from oneencoder.modality import get_modality_class


@pytest.fixture(scope="module")
def model(trained_model):
    return oneencoder.load(trained_model["dir"], device="cpu")


@pytest.fixture(scope="module")
def stamp(small_records) -> str:
    return small_records[0]["image"]


def test_image_arrays_and_tensors_embed_like_the_file(model, stamp) -> None:
    from_path = model.encode("image", stamp)
    rgba = np.asarray(Image.open(stamp).convert("RGBA"))  # HWC uint8, as PIL and imageio give
    np.testing.assert_allclose(model.encode("image", rgba), from_path, atol=1e-5)

    rgb = Image.open(stamp).convert("RGBA")
    white = Image.alpha_composite(Image.new("RGBA", rgb.size, "white"), rgb).convert("RGB")
    chw = torch.from_numpy(np.asarray(white).copy()).permute(2, 0, 1).float() / 255  # torchvision's ToTensor
    batch = np.stack([np.asarray(white), np.asarray(white)[::-1]])  # NHWC: two images
    out = model.encode("image", batch)
    assert out.shape == (2, model.model.embed_dim)
    mixed = model.encode("image", [chw, white])  # a list may mix kinds
    np.testing.assert_allclose(mixed, out[:1].expand(2, -1), atol=1e-5)


def test_numpy_output_and_progress_bar(model, small_records, capsys) -> None:
    captions = [r["caption"] for r in small_records[:6]]
    as_numpy = model.encode("text", captions, numpy=True)
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32 and as_numpy.shape[0] == 6
    np.testing.assert_array_equal(as_numpy, model.encode("text", np.array(captions)).numpy())  # array of str
    capsys.readouterr()
    model.encode("text", captions, batch_size=2, progress=True)
    assert "encode text" in capsys.readouterr().err
    model.encode("text", captions, batch_size=2, progress=False)
    model.encode("text", captions, batch_size=2)  # a short input: no bar by default
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bad, message", [
    (np.full((8, 8, 3), 2.0, dtype=np.float32), r"float pixels must lie in \[0, 1\]"),
    (np.zeros((8, 8, 7), dtype=np.uint8), "neither HWC nor CHW"),
    (np.zeros(8, dtype=np.uint8), r"an image is \[H, W\]"),
    (np.full((4, 4), np.nan), "NaN"),
    (np.full((4, 4), 300, dtype=np.int32), "0-255"),
    (12, "an image input is a path, a PIL image or an array, got int"),
    (np.zeros((2, 8, 8, 8, 3), dtype=np.uint8), r"an image is \[H, W\]"),
])
def test_bad_image_arrays_are_one_clear_error(model, bad, message) -> None:
    with pytest.raises(SampleError, match=message) as info:
        model.encode("image", [bad] if isinstance(bad, int) else bad)
    assert str(info.value).startswith("image input #0: ")


def test_batches_split_along_the_first_axis_where_they_make_sense() -> None:
    def n(modality: str, x) -> int:
        return len(as_batch(x, get_modality_class(modality).input_ndim))

    assert n("image", np.zeros((4, 8, 8, 3))) == 4 and n("image", np.zeros((8, 8, 3))) == 1
    assert n("image", np.zeros((8, 8))) == 1 and n("image", torch.zeros(2, 3, 8, 8)) == 2
    assert n("audio", np.zeros(44100)) == 1 and n("audio", np.zeros((3, 44100))) == 3  # [N, samples]: N clips
    assert n("audio", (np.zeros((2, 16000)), 16000)) == 1  # (waveform, sample rate): one clip
    assert n("depth", np.ones((5, 6, 7))) == 5 and n("depth", [np.ones((6, 7, 1))]) == 1
    assert n("video", np.zeros((2, 4, 8, 8, 3))) == 2 and n("video", np.zeros((4, 8, 8, 3))) == 1
    assert n("video", (np.zeros((4, 8, 8, 3)), 12.0)) == 1  # (frames, fps)
    assert n("text", "one caption") == 1 and n("text", np.array(["a", "b"])) == 2
    assert as_batch(s for s in ["C", "CCO"]) == ["C", "CCO"]
    assert image_from_array(torch.rand(3, 5, 4)).size == (4, 5)  # tensors are CHW
    assert image_from_array(np.zeros((5, 4, 3), np.uint8)).size == (4, 5)  # numpy arrays are HWC


def test_an_unavailable_device_is_one_clear_error(trained_model) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ConfigError, match="device 'cuda': this machine has no CUDA GPU that torch can use"):
        oneencoder.load(trained_model["dir"], device="cuda")
    with pytest.raises(ConfigError, match="is not a device"):
        oneencoder.load(trained_model["dir"], device="gpu0")
