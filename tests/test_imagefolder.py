"""``data import FOLDER``: a Hugging Face imagefolder made of real Tux Paint stamps, imported and run
through ``cache build``, ``train --init-from``, ``eval`` and ``classify`` (issue 25, done-when)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.data.folder_import import import_folder
from oneencoder.data.manifest import read_manifest
from oneencoder.errors import ConfigError

STAMPS = Path("/usr/share/tuxpaint/stamps")
CLASSES = ("animals", "food", "town", "vehicles")
PER_SPLIT = {"train": 4, "validation": 2, "test": 2}
SPLIT_OF = {"train": "train", "validation": "val", "test": "test"}
runner = CliRunner()


def _caption(png: Path) -> str:
    return png.with_suffix(".txt").read_text(encoding="utf-8", errors="replace").splitlines()[0].strip()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``data/{train,validation,test}/<class>/*.png`` (real stamps), a metadata.csv giving the stamp's
    own caption to half of the training images, one truncated PNG and one stray file."""
    if not STAMPS.is_dir():
        pytest.skip(f"Tux Paint stamps are not installed at {STAMPS}")
    root = tmp_path_factory.mktemp("imagefolder") / "data"
    expected = {}
    for label in CLASSES:
        pngs = sorted(p for p in (STAMPS / label).rglob("*.png") if p.with_suffix(".txt").is_file())
        start = 0
        for split, n in PER_SPLIT.items():
            for png in pngs[start: start + n]:
                (root / split / label).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(png, root / split / label / png.name)
                expected[f"{split}/{label}/{png.stem}"] = (SPLIT_OF[split], label, _caption(png))
            start += n
    captioned = sorted(k for k in expected if k.startswith("train/"))[::2]
    with open(root / "train" / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        table = csv.writer(f)
        table.writerow(["file_name", "text", "source"])
        for key in captioned:
            table.writerow([key.removeprefix("train/") + ".png", expected[key][2], "tuxpaint"])
    good = root / "train" / CLASSES[0] / "badger.png"
    whole = next(STAMPS.rglob("badger.png")).read_bytes()
    good.write_bytes(whole)
    (root / "test" / CLASSES[1] / "truncated.png").write_bytes(whole[: len(whole) // 3])
    (root / "notes.txt").write_text("not an image: ignored\n", encoding="utf-8")
    expected["train/animals/badger"] = ("train", CLASSES[0], None)
    return {"root": root, "expected": expected, "captioned": set(captioned)}


@pytest.fixture(scope="module")
def imported(folder: dict) -> dict:
    out = folder["root"].parent / "manifest.jsonl"
    result = runner.invoke(app, ["data", "import", str(folder["root"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return {"out": out, "stdout": result.stdout, "stderr": result.stderr, "rows": read_manifest(out)}


def test_labels_splits_and_captions_come_from_the_layout(folder: dict, imported: dict) -> None:
    rows = {r["id"]: r for r in imported["rows"]}
    assert set(rows) == set(folder["expected"])
    for sid, (split, label, caption) in folder["expected"].items():
        row = rows[sid]
        assert (row["split"], row["label"]) == (split, label), row
        if sid in folder["captioned"]:  # metadata.csv's text column is the caption; other columns kept
            assert row["caption"] == caption and row["source"] == "tuxpaint", row
        else:  # no text: the label through the default template
            assert row["caption"] == f"A {label}." and "source" not in row, row
    n = {s: sum(r["split"] == s for r in imported["rows"]) for s in ("train", "val", "test")}
    assert imported["stdout"].strip() == (f"wrote {imported['out']}: {len(rows)} samples (train {n['train']}, val "
                                          f"{n['val']}, test {n['test']}), 1 rejected (see "
                                          f"{imported['out'].with_name('manifest.rejects.jsonl')})")
    assert "4 labels: animals 9, food 8, town 8, vehicles 8" in imported["stderr"]
    rejects = [json.loads(x) for x in imported["out"].with_name("manifest.rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["field"]) for r in rejects] == [("test/food/truncated", "image")]
    assert "cannot decode image" in rejects[0]["reason"]


def test_a_folder_without_split_folders_spreads_every_class_over_the_splits(folder: dict, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    for label in CLASSES:
        shutil.copytree(folder["root"] / "train" / label, flat / label)
    (flat / "stray.png").write_bytes((flat / CLASSES[0] / "badger.png").read_bytes())
    report = import_folder(flat, tmp_path / "flat.jsonl", template="a photo of a {label}", progress=False)
    by_id = {r["id"]: r for r in report.samples}
    assert by_id["stray"].get("label") is None and "caption" not in by_id["stray"]  # no label, no caption
    assert by_id["animals/badger"]["caption"] == "a photo of a animals"
    again = import_folder(flat, tmp_path / "again.jsonl", template="a photo of a {}", progress=False)
    assert [(r["id"], r["split"]) for r in again.samples] == [(r["id"], r["split"]) for r in report.samples]
    with pytest.raises(ConfigError, match="exactly once"):
        import_folder(flat, tmp_path / "x.jsonl", template="a photo", progress=False)
    with pytest.raises(ConfigError, match="split folders"):
        import_folder(folder["root"], tmp_path / "x.jsonl", val=0.2, test=0.2, progress=False)


def test_table_options_with_a_folder_are_one_clear_error(folder: dict, tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "import", str(folder["root"]), "--map", "image=path",
                                 "--out", str(tmp_path / "m.jsonl")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "--map applies to a table" in \
        result.stderr, result.output
    assert not (tmp_path / "m.jsonl").exists()


def test_cache_build_train_init_from_eval_and_classify(folder: dict, imported: dict, trained_model: dict,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest, cache, model = imported["out"], tmp_path / "cache", tmp_path / "model"
    built = runner.invoke(app, ["cache", "build", "--manifest", str(manifest), "--cache-dir", str(cache),
                                "--device", "cpu"])
    assert built.exit_code == 0, built.output
    trained = runner.invoke(app, ["train", "--stage", "image_text", "--manifest", str(manifest), "--cache-dir",
                                  str(cache), "--model", str(model), "--init-from", str(trained_model["dir"]),
                                  "--epochs", "1", "--device", "cpu"])
    assert trained.exit_code == 0, trained.output
    baseline = [line for line in trained.stderr.splitlines() if line.startswith("baseline (--init-from")]
    assert len(baseline) == 1 and "validation score" in baseline[0], trained.stderr
    assert "held-out test split" in trained.stdout
    evaluated = runner.invoke(app, ["eval", "--model", str(model), "--manifest", str(manifest), "--cache-dir",
                                    str(cache), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["directions"]
    monkeypatch.chdir(tmp_path)  # the confusion matrix goes to ./confusion.png by default
    classified = runner.invoke(app, ["classify", str(folder["root"]), "--model", str(model)])
    assert classified.exit_code == 0, classified.output
    assert "top-1 accuracy" in classified.stdout and "(chance 0.250" in classified.stdout
    for label in CLASSES:
        assert any(line.startswith(label) for line in classified.stdout.splitlines()), classified.stdout
    assert "split test" in classified.stdout and (tmp_path / "confusion.png").stat().st_size > 1000
    assert "cannot be read left out" in classified.stderr  # the truncated test PNG, found before the model loads
