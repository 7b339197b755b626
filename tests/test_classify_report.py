"""``classify FOLDER`` / ``classify --manifest M --label-field F``: accuracy with chance, a per-class table,
a confusion-matrix PNG, ``--json``, and every input checked before the model loads (issue 25)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from oneencoder.apps.zeroshot import DEFAULT_TEMPERATURE, Classification, probability_scale
from oneencoder.apps.zeroshot_report import classification_report, expected_calibration_error
from oneencoder.cli.main import app
from oneencoder.fileio import write_jsonl_atomic

CLASSES = ("birds", "fish", "insects", "mammals")
PER_CLASS = 5
runner = CliRunner()


@pytest.fixture(scope="module")
def folder(small_records: list[dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<class>/<stamp>.png``: real stamps of four animal kinds (links to the installed files)."""
    root = tmp_path_factory.mktemp("classify") / "animals"
    for label in CLASSES:
        rows = [r for r in small_records if r["id"].split("/")[1] == label and r["image"].endswith(".png")]
        for r in rows[:PER_CLASS]:
            (root / label).mkdir(parents=True, exist_ok=True)
            (root / label / Path(r["image"]).name).symlink_to(r["image"])
    return root


@pytest.fixture(scope="module")
def broken_model(trained_model: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained model without its projection weights: loading it fails, reading its
    ``oneencoder.json`` does not. A command that reports an input error with it checked inputs first."""
    model = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(trained_model["dir"], model, ignore=shutil.ignore_patterns("runs"))
    (model / "projection.safetensors").unlink()
    return model


def _invoke(*args: str):
    return runner.invoke(app, ["classify", *map(str, args)])


def test_folder_report_prints_accuracy_with_chance_and_writes_the_confusion_png(folder: Path, trained_model: dict,
                                                                                tmp_path: Path) -> None:
    png = tmp_path / "out" / "confusion.png"
    result = _invoke(folder, "--model", trained_model["dir"], "--confusion", png, "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = result.stdout.splitlines()
    n = len(list(folder.rglob("*.png")))
    assert out[0] == f"{folder} (all files): {n} image inputs, {len(CLASSES)} labels, templates 'A {{}}.'", out[0]
    top1 = next(line for line in out if line.startswith("top-1 accuracy"))
    assert "(chance 0.250, always the most common label" in top1, top1
    assert any(line.startswith("top-4 accuracy 1.000 (chance 1.000)") for line in out), out
    for label in CLASSES + ("macro avg", "weighted avg"):
        assert any(line.startswith(label) for line in out), label
    assert any(line.startswith("probabilities uncalibrated: softmax of the cosines at logit scale 100")
               for line in out), out
    with Image.open(png) as image:
        assert image.format == "PNG" and min(image.size) > 200
    assert out[-1] == f"confusion matrix: {png}"


def test_json_parses_and_agrees_with_its_own_predictions(folder: Path, trained_model: dict, tmp_path: Path) -> None:
    result = _invoke(folder, "--model", trained_model["dir"], "--confusion", tmp_path / "c.png", "--json",
                     "--template", "A {}.", "--template", "A picture of {}.", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    predictions = report["predictions"]
    assert report["labels"] == list(CLASSES) and report["templates"] == ["A {}.", "A picture of {}."]
    assert report["n"] == len(predictions) == sum(c["support"] for c in report["per_class"])
    assert [c["label"] for c in report["per_class"]] == list(CLASSES)
    truth = [p["label"] for p in predictions]
    guess = [p["predicted"] for p in predictions]
    assert report["accuracy"]["top1"] == pytest.approx(np.mean([t == g for t, g in zip(truth, guess)]))
    assert report["chance"] == {"top1": 0.25, "top4": 1.0, "majority": pytest.approx(max(map(truth.count, CLASSES))
                                                                                       / len(truth))}
    assert np.array(report["confusion"]).sum() == report["n"]
    assert report["probabilities"]["temperature"] == DEFAULT_TEMPERATURE
    assert report["confusion_png"] == str(tmp_path / "c.png") and (tmp_path / "c.png").is_file()
    metrics = pytest.importorskip("sklearn.metrics")  # locked in requirements/lock.txt; not a dependency
    p, r, f, s = metrics.precision_recall_fscore_support(truth, guess, labels=list(CLASSES), zero_division=0)
    for i, row in enumerate(report["per_class"]):
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))


def test_manifest_with_label_field(folder: Path, trained_model: dict, tmp_path: Path) -> None:
    rows = [{"id": f"{p.parent.name}/{p.stem}", "image": str(p), "kind": p.parent.name,
             "split": "test" if i % 2 else "train"} for i, p in enumerate(sorted(folder.rglob("*.png")))]
    manifest = tmp_path / "m.jsonl"
    write_jsonl_atomic(manifest, rows)
    result = _invoke("--manifest", manifest, "--label-field", "kind", "--model", trained_model["dir"],
                     "--confusion", tmp_path / "c.png", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == sum(r["split"] == "test" for r in rows) and "split test" in report["source"]


def test_inputs_are_checked_before_the_model_loads(folder: Path, broken_model: Path, tmp_path: Path) -> None:
    control = _invoke(folder, "--model", broken_model, "--confusion", tmp_path / "c.png")
    assert control.exit_code != 0 and "file not found" not in control.output  # this model cannot load

    missing = tmp_path / "gone.png"
    rows = [{"id": "a", "image": str(next(folder.rglob("*.png"))), "kind": "birds"},
            {"id": "b", "image": str(missing), "kind": "fish"}]
    write_jsonl_atomic(tmp_path / "m.jsonl", rows)
    shutil.copytree(folder / CLASSES[0], tmp_path / "one" / CLASSES[0], symlinks=True)
    checks = [
        (["--manifest", tmp_path / "m.jsonl", "--label-field", "kind"], f"image file not found: {missing}"),
        (["--manifest", tmp_path / "m.jsonl", "--label-field", "colour"], "no row has the field 'colour'"),
        ([tmp_path / "one"], "1 label(s) (birds); classifying needs at least two"),
        ([folder / CLASSES[0]], "no labelled image files; put them in one subfolder per class"),
        ([missing, "--labels", "a,b"], f"{missing}: no such file"),
        ([folder, "--labels", "a,b"], "drop --labels"),
        ([folder, "--template", "A photo."], "exactly once"),
    ]
    for args, message in checks:
        result = _invoke(*args, "--model", broken_model, "--confusion", tmp_path / "c.png")
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.stderr)


def test_report_numbers_by_hand() -> None:
    labels = ["cat", "dog", "owl"]
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.8], [0.5, 0.4, 0.1]])
    probs = np.exp(scores / 0.1) / np.exp(scores / 0.1).sum(1, keepdims=True)
    result = Classification(labels, scores, probs, [])
    report = classification_report(["cat", "dog", "dog", "owl", "owl"], result, labels, k=2)
    assert report["accuracy"] == {"top1": 0.6, "top2": 0.8}
    assert report["chance"] == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3), "majority": 0.4}
    assert report["confusion"] == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    cat, dog, owl = report["per_class"]
    assert (cat["precision"], cat["recall"], cat["support"]) == (pytest.approx(1 / 3), 1.0, 1)
    assert (dog["precision"], dog["recall"], owl["recall"]) == (1.0, 0.5, 0.5)
    assert report["averages"]["macro avg"]["recall"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    # ECE: one bin holds confidences 0.95 (right) and 0.95 (wrong): |0.5 - 0.95| = 0.45.
    assert expected_calibration_error(np.array([0.95, 0.95]), np.array([True, False])) == pytest.approx(0.45)


def test_probability_scale_names_a_stored_calibration_and_otherwise_says_uncalibrated() -> None:
    temperature, meaning = probability_scale({"calibration": {"temperature": 0.05, "fitted_on": "val split"}})
    assert temperature == 0.05 and meaning.startswith("probabilities calibrated") and "val split" in meaning
    for meta in ({}, {"calibration": {"temperature": -1}}, {"calibration": "yes"}):
        temperature, meaning = probability_scale(meta)
        assert temperature == DEFAULT_TEMPERATURE and meaning.startswith("probabilities uncalibrated")
