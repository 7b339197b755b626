"""``preprocess.py`` beside the ONNX graphs: numpy + Pillow only, equal to the library's preprocessing.

Real Tux Paint stamps of every kind the library meets (RGBA, grey + alpha, palette with and
without transparency, RGB with a transparent colour key, SVG), a 16-bit grey image made from
one, and captions; the generated file runs in a subprocess that must not import torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import oneencoder
from oneencoder.apps.export import PREPROCESS_TOLERANCE, write_preprocess
from oneencoder.cli.main import app
from oneencoder.modality import create_modality

STAMPS = Path("/usr/share/tuxpaint/stamps")
IMAGES = ["animals/amphibians/frog.png",            # RGBA
          "animals/insects/bee.png",                # LA, 671x538: padded, then downscaled
          "cartoon/tux/tux-yay2.png",               # P with a transparent index, 67x60: upscaled
          "seasonal/easter/chick-hatched.png",      # RGB with a tRNS colour key (the library ignores it)
          "town/roadsigns/stoplight_01_red.png",    # P, opaque, tall
          "symbols/money/00_symbols/gbp_1_pound.svg"]  # rendered by cairosvg
TEXTS = ["A badger.", "  A red   apple on a wooden table,\nseen from above. ", "Two cats."]

pytestmark = pytest.mark.skipif(not STAMPS.is_dir(), reason="needs the tuxpaint-stamps-default package")

# Run by a fresh interpreter: the generated file, the expected arrays, and nothing of oneencoder or torch.
_CHILD = r"""
import json, sys
import numpy as np
folder, cases = sys.argv[1], json.load(open(sys.argv[2]))
sys.path.insert(0, folder)
import preprocess
expected = np.load(cases["expected"])
worst = {}
for i, path in enumerate(cases["images"]):
    got = preprocess.preprocess_image(path)
    assert got.dtype == np.float32 and got.shape == expected[f"image{i}"].shape, (path, got.dtype, got.shape)
    worst[path] = float(np.abs(got - expected[f"image{i}"]).max())
tokens = preprocess.preprocess_text(cases["texts"])
same_ids = all(np.array_equal(tokens[k], expected[k]) and tokens[k].dtype == np.int64 for k in tokens)
print(json.dumps({"worst": worst, "same_ids": same_ids, "keys": sorted(tokens),
                  "torch": "torch" in sys.modules, "oneencoder": any(m.startswith("oneencoder") for m in sys.modules)}))
"""


def _python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


@pytest.fixture(scope="module")
def written(trained_model, tmp_path_factory) -> dict:
    """``oneencoder export preprocess`` of the session's model: preprocess.py alone, no graphs
    (``export onnx --with-backbone`` writes the same file beside its graphs)."""
    out = tmp_path_factory.mktemp("onnx-preprocess")
    result = CliRunner().invoke(app, ["export", "preprocess", "--model", str(trained_model["dir"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return {"out": out, "output": result.output, "model": oneencoder.load(trained_model["dir"], device="cpu")}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """The stamps above, and one of them as 16-bit grey (scaled by its bit depth, not clipped)."""
    grey = tmp_path_factory.mktemp("grey16") / "frog-16bit.png"
    frog = np.asarray(Image.open(STAMPS / IMAGES[0]).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(frog).save(grey)
    assert Image.open(grey).mode.startswith("I;16")
    return [str(STAMPS / p) for p in IMAGES] + [str(grey)]


def test_export_preprocess_writes_the_model_recipes(written) -> None:
    out, m = written["out"], written["model"]
    assert f"wrote {out / 'preprocess.py'}: image, text inputs with numpy + Pillow" in written["output"]
    spec = importlib.util.spec_from_file_location("written_preprocess", out / "preprocess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    image, text = module.RECIPES["image"], module.RECIPES["text"]
    options = m.modality("image").options
    assert (image["image_size"], image["mean"], image["std"], image["resample"]) == (
        options["image_size"], list(options["mean"]), list(options["std"]), "BICUBIC")
    assert image["graph"] == "image-full.onnx" and image["max_abs_diff"] <= PREPROCESS_TOLERANCE
    assert text["max_tokens"] == m.modality("text").options["max_tokens"]
    assert (out / text["tokenizer"]).is_file()  # the tokenizer it reads, saved beside it


def test_preprocess_py_matches_the_library_in_a_process_without_torch(written, images) -> None:
    out, m = written["out"], written["model"]
    image, text = m.modality("image"), m.modality("text")
    expected = {f"image{i}": image.collate([image.prepare(p)[1]]).numpy() for i, p in enumerate(images)}
    expected.update({k: v.numpy() for k, v in text.collate([text.prepare(t)[1] for t in TEXTS]).items()})
    np.savez(out / "expected.npz", **expected)
    (out / "cases.json").write_text(json.dumps({"expected": str(out / "expected.npz"), "images": images,
                                                "texts": TEXTS}))
    ran = _python("-c", _CHILD, str(out), str(out / "cases.json"), cwd=out)
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads(ran.stdout)
    assert report["torch"] is False and report["oneencoder"] is False
    assert max(report["worst"].values()) <= PREPROCESS_TOLERANCE, report["worst"]
    assert report["same_ids"] and report["keys"] == ["attention_mask", "input_ids"]


def test_preprocess_py_command_line(written, images) -> None:
    """``python preprocess.py FILE... --out x.npy`` writes the batch; a missing file is one line, exit 2."""
    out, image = written["out"], written["model"].modality("image")
    ran = _python(str(out / "preprocess.py"), *images[:3], "--out", str(out / "batch.npy"), cwd=out)
    assert ran.returncode == 0, ran.stderr
    batch = np.load(out / "batch.npy")
    expected = image.collate([image.prepare(p)[1] for p in images[:3]]).numpy()
    assert batch.shape == expected.shape and float(np.abs(batch - expected).max()) <= PREPROCESS_TOLERANCE
    assert ran.stdout.strip() == f"wrote {out / 'batch.npy'}: float32 {list(expected.shape)} for image-full.onnx"
    missing = _python(str(out / "preprocess.py"), str(out / "no-such.png"), cwd=out)
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: {out / 'no-such.png'}: image file not found"
    assert missing.stdout == ""


def test_another_backbone_size_and_normalisation_are_written_into_the_file(images, tmp_path: Path) -> None:
    """An EfficientNet-Lite2 image modality at 260 px with ImageNet mean/std gets its own numbers."""
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    lite2 = create_modality("image", backbone="timm:tf_efficientnet_lite2", image_size=260, mean=mean, std=std)
    report = write_preprocess({"image": lite2}, tmp_path, "a Lite2 model")
    assert report["file"] == "preprocess.py" and not report["skipped"]
    assert report["recipes"]["image"]["max_abs_diff"] <= PREPROCESS_TOLERANCE  # checked when written
    spec = importlib.util.spec_from_file_location("lite2_preprocess", tmp_path / "preprocess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (module.RECIPES["image"]["image_size"], module.RECIPES["image"]["mean"]) == (260, mean)
    for path in images[:4]:
        got = module.preprocess_image(path)
        expected = lite2.collate([lite2.prepare(path)[1]]).numpy()
        assert got.shape == (1, 3, 260, 260) and float(np.abs(got - expected).max()) <= PREPROCESS_TOLERANCE


def test_export_preprocess_user_errors(trained_model, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["export", "preprocess", "--model", str(trained_model["dir"]), "--out",
                                 str(tmp_path), "--modality", "audio"])
    assert result.exit_code == 2 and result.output.startswith("error: this model holds no 'audio' modality")
    afile = tmp_path / "a-file"
    afile.write_text("")
    result = runner.invoke(app, ["export", "preprocess", "--model", str(trained_model["dir"]), "--out", str(afile)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: --out {afile} is a file; name a folder for preprocess.py"
    assert not (tmp_path / "preprocess.py").exists()


def test_a_modality_without_a_recipe_is_left_out_with_the_reason(tmp_path: Path) -> None:
    """Molecules are featurised by RDKit: no numpy/Pillow recipe, so no preprocess.py for them."""
    from oneencoder.errors import OneEncoderError

    molecule = create_modality("molecule")
    report = write_preprocess({"molecule": molecule}, tmp_path, "a model")
    assert report["file"] is None and report["skipped"]["molecule"].startswith("no numpy/Pillow recipe")
    with pytest.raises(OneEncoderError, match=r"^no torch-free preprocessing for molecule: no numpy/Pillow recipe"):
        write_preprocess({"molecule": molecule}, tmp_path, "a model", strict=True)
    assert not (tmp_path / "preprocess.py").exists()
