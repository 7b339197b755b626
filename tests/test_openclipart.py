"""Openclipart (real Debian data): SVG metadata, captions, near-duplicates, the corrupt tool, the CLI."""

from __future__ import annotations

import json
import random
import tomllib
from pathlib import Path
from xml.parsers import expat

import pytest
from PIL import Image
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.data.manifest import caption_group, read_manifest
from oneencoder.data.sources import openclipart_build as build
from oneencoder.data.sources.corrupt import corrupt_rows
from oneencoder.data.sources.imagehash import distance, file_signature, is_near_duplicate, nearest_duplicates, signature
from oneencoder.data.sources.openclipart import (ID_PREFIX, SvgMetadata, UnsafeXMLError, build_caption,
                                                 read_svg_metadata)

ROOT = Path("/usr/share/openclipart")
PNG, SVG = ROOT / "png", ROOT / "svg"
STAMPS = Path("/usr/share/tuxpaint/stamps")
REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not (PNG.is_dir() and SVG.is_dir()),
    reason="Debian packages openclipart-png and openclipart-svg are not installed (`make setup` installs them)")

runner = CliRunner()

# Real images: (path under png/ and svg/, without extension); the shamrock is a copy of
# the Tux Paint validation/test stamp seasonal/clover.
REAL = ["science/scale_01", "food/fruit/pesca_architetto_frances_01", "plants/shamrock_for_march_natha_01",
        "computer/icons/flat-theme/action/italic", "recreation/holiday/sunshine_matthew_gates_01"]
BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY a "lol"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">'
                  ']><svg xmlns="http://www.w3.org/2000/svg"><metadata>&b;</metadata></svg>')
EXTERNAL = ('<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            '<svg xmlns="http://www.w3.org/2000/svg"><metadata>&x;</metadata></svg>')


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ----- metadata and captions ------------------------------------------------------------------


def test_metadata_of_real_svgs() -> None:
    scale = read_svg_metadata(SVG / "science/scale_01.svg")
    assert scale == SvgMetadata("scale", "", ["", "tool", "mass", "scale", "work"], "Feth AREZKI")
    # Publisher and rights agents are titled HASH(0x...) here: never taken as the work's title.
    sun = read_svg_metadata(SVG / "recreation/holiday/sunshine_matthew_gates_01.svg")
    assert sun.title == "Sunshine" and sun.author == "Matthew Gates"
    assert "hash(0x8589f20)" in sun.keywords
    # Adobe Illustrator SVGs declare short namespace entities: allowed.
    assert read_svg_metadata(SVG / "office/floppy_frederic_moser_01.svg").title == "Floppy"
    icon = read_svg_metadata(SVG / "computer/icons/flat-theme/action/italic.svg")
    assert icon.title == "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)"


def test_unsafe_or_broken_svgs_raise(tmp_path: Path) -> None:
    for name, text in (("laughs", BILLION_LAUGHS), ("external", EXTERNAL)):
        (tmp_path / f"{name}.svg").write_text(text)
        with pytest.raises(UnsafeXMLError):
            read_svg_metadata(tmp_path / f"{name}.svg")
    (tmp_path / "cut.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><metadata><rdf:RDF')
    with pytest.raises(expat.ExpatError):
        read_svg_metadata(tmp_path / "cut.svg")


def test_caption_rule() -> None:
    sun = read_svg_metadata(SVG / "recreation/holiday/sunshine_matthew_gates_01.svg")
    assert build_caption(sun) == "Sunshine. holiday, sunny, crepuscular, sun, weather, weathersym, recreation, hot."
    # Junk and empties dropped, underscores spaced, repeats and the title removed; nothing else.
    meta = SvgMetadata("Clock", "", ["", "signs_and_symbols", "clock", "HASH(0x89c79d4)", "Symbol", "symbol"])
    assert build_caption(meta) == "Clock. signs and symbols, Symbol."
    assert build_caption(SvgMetadata("Lemon SVG theme", "", ["icon"])) == "Lemon SVG theme. icon."
    # No title: the description's first sentence, unless it is only "Created with Inkscape".
    assert build_caption(SvgMetadata("", "A red kite. Drawn by hand.", ["bird"])) == "A red kite. bird."
    assert build_caption(SvgMetadata("", "Created with Inkscape", ["bird"])) == "bird."
    assert build_caption(SvgMetadata("HASH(0x8a41038)", "", [""])) == ""


def test_noise_heuristics() -> None:
    if not STAMPS.is_dir():
        pytest.skip(f"Tux Paint stamps are not installed at {STAMPS}")
    english, other = build.vocabularies(STAMPS)
    assert {"badger", "apple"} <= english and {"farfalla", "pomme"} <= other and not english & other
    assert build.is_non_english("Farfalla contorno", english, other)
    assert not build.is_non_english("A red apple", english, other)
    assert build.template_keys(["A b.", "a B. ", "c"], minimum=2) == {"a b."}


# ----- near-duplicate hash --------------------------------------------------------------------


def test_resized_recompressed_copy_is_a_near_duplicate(tmp_path: Path) -> None:
    if not STAMPS.is_dir():
        pytest.skip(f"Tux Paint stamps are not installed at {STAMPS}")
    badger = STAMPS / "animals/mammals/badger.png"
    with Image.open(badger) as im:
        rgba = im.convert("RGBA")
    flat = Image.new("RGBA", rgba.size, "white")
    flat.alpha_composite(rgba)
    copy = tmp_path / "badger.jpg"
    flat.convert("RGB").resize((rgba.width * 3 // 5, rgba.height * 3 // 5)).save(copy, quality=60)
    original, resized = file_signature(badger), file_signature(copy)
    assert is_near_duplicate(original, resized), distance(original, resized)
    other = file_signature(STAMPS / "food/fruit/cartoon/apple.png")
    assert not is_near_duplicate(original, other), distance(original, other)
    assert nearest_duplicates({"copy": resized}, {"badger": original, "apple": other})["copy"]["match"] == "badger"


def test_real_pairs_the_hash_must_tell_apart() -> None:
    if not STAMPS.is_dir():
        pytest.skip(f"Tux Paint stamps are not installed at {STAMPS}")
    clover = file_signature(STAMPS / "seasonal/clover.svg")
    assert is_near_duplicate(file_signature(PNG / "plants/shamrock_for_march_natha_01.png"), clover)
    # Tall thin objects on white share a dHash; the colour and shape checks separate them.
    lighthouse = file_signature(PNG / "buildings/lighthouse_matthew_gates_.png")
    assert not is_near_duplicate(lighthouse, file_signature(STAMPS / "household/dishes/utensils/pepper_grinder.png"))
    blank = signature(Image.new("RGBA", (40, 20), (0, 0, 0, 0)))  # nothing drawn: the whole canvas
    assert blank.aspect == 2.0 and blank.dhash == 0


# ----- the corrupt tool ---------------------------------------------------------------------


def _rows(n: int = 40) -> list[dict]:
    captions = ["A cat.", "A dog.", "A star."] * 4 + [f"Caption {i}." for i in range(n - 12)]
    return [{"id": f"s{i}", "caption": c, "group": caption_group(c), "split": ("train", "val", "test")[i % 3]
             if i >= 30 else "train"} for i, c in enumerate(captions)]


def test_corrupt_shuffles_a_fraction_of_training_captions() -> None:
    rows = _rows()
    eligible = [r for r in rows if r["split"] == "train"]
    out, n_eligible, corrupted, unmoved = corrupt_rows(rows, 0.5, seed=3)
    assert n_eligible == len(eligible) and corrupted == round(0.5 * len(eligible)) and unmoved == 0
    changed = [(old, new) for old, new in zip(rows, out) if new != old]
    assert len(changed) == corrupted
    for old, new in changed:
        assert old["split"] == "train" and new["corrupted"] is True and new["true_caption"] == old["caption"]
        assert new["caption"].lower() != old["caption"].lower()  # templates never get their own text back
        assert new["group"] == caption_group(new["caption"]) and new["clean_id"] == old["id"]
        # A new id per (row, caption): the id-keyed feature cache never serves the clean caption's features.
        assert new["id"] == f"{old['id']}#corrupt-{new['group'][:8]}"
    # A derangement: the chosen rows' captions are the same multiset, moved.
    assert sorted(o["caption"] for o, _ in changed) == sorted(n["caption"] for _, n in changed)
    assert all(new == old for old, new in zip(rows, out) if old["split"] != "train")
    assert out == corrupt_rows(rows, 0.5, seed=3)[0] and out != corrupt_rows(rows, 0.5, seed=4)[0]
    assert rows == _rows()  # the input is not modified
    assert corrupt_rows(rows, 0.0, seed=0)[0] == rows


def test_corrupt_when_one_caption_dominates() -> None:
    rows = [{"id": f"s{i}", "caption": "Same." if i < 4 else "Other.", "split": "train"} for i in range(5)]
    out, _, corrupted, unmoved = corrupt_rows(rows, 1.0, seed=0)
    assert corrupted == 2 and unmoved == 3  # only one "Other." to trade with
    assert all(r["caption"] != r["true_caption"] for r in out if r.get("corrupted"))


def test_corrupt_command(tmp_path: Path) -> None:
    src = tmp_path / "m.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = tmp_path / "c.jsonl"
    result = invoke("data", "corrupt", src, "--fraction", "0.25", "--seed", "1", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 40 samples, captions shuffled among 8 of 34 training pairs" in result.output
    assert sum(bool(r.get("corrupted")) for r in read_manifest(out)) == 8
    for args in ((out, "--out", tmp_path / "again.jsonl"), (src, "--out", src)):
        again = invoke("data", "corrupt", args[0], "--fraction", "0.25", *args[1:])
        assert again.exit_code == 2 and again.output.startswith("error: ") and "\n" not in again.output.strip()


# ----- the data command ---------------------------------------------------------------------


def _fake_root(tmp_path: Path) -> Path:
    """A small openclipart folder: real files (symbolic links) plus five bad ones."""
    root = tmp_path / "openclipart"
    for rel in REAL + ["bad/broken", "bad/bomb", "bad/corrupt_png", "bad/empty"]:
        for sub in ("png", "svg"):
            (root / sub / rel).parent.mkdir(parents=True, exist_ok=True)
    for rel in REAL:
        (root / "png" / f"{rel}.png").symlink_to(PNG / f"{rel}.png")
        (root / "svg" / f"{rel}.svg").symlink_to(SVG / f"{rel}.svg")
    good_png, good_svg = PNG / f"{REAL[0]}.png", SVG / f"{REAL[0]}.svg"
    for rel in ("bad/broken", "bad/bomb", "bad/empty"):
        (root / "png" / f"{rel}.png").symlink_to(good_png)
    (root / "svg/bad/broken.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><metadata><a>')
    (root / "svg/bad/bomb.svg").write_text(BILLION_LAUGHS)
    (root / "svg/bad/empty.svg").symlink_to(SVG / "electronics/navigation_display_panel_01.svg")
    (root / "png/bad/corrupt_png.png").write_bytes(random.Random(0).randbytes(512))
    (root / "svg/bad/corrupt_png.svg").symlink_to(good_svg)
    (root / "svg/bad/no_png.svg").symlink_to(good_svg)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not STAMPS.is_dir():
        pytest.skip(f"Tux Paint stamps are not installed at {STAMPS}")
    tmp = tmp_path_factory.mktemp("openclipart")
    out = tmp / "out" / "manifest.jsonl"
    result = invoke("data", "openclipart", "--root", _fake_root(tmp), "--out", out)
    assert result.exit_code == 0, result.output
    return {"out": out, "output": result.output, "root": tmp / "openclipart"}


def test_data_openclipart_writes_manifest_rejects_and_near_duplicates(built: dict, stamps: list[dict]) -> None:
    out = built["out"]
    assert (f"wrote {out}: {len(stamps) + 4} samples" in built["output"]
            and "openclipart 4 train), 1 near-duplicates of Tux Paint val/test left out" in built["output"]
            and "5 rejected" in built["output"] and "templates" in built["output"])
    rows = read_manifest(out)
    assert rows[:len(stamps)] == stamps  # Tux Paint exactly as `data tuxpaint` writes it, own splits
    ours = rows[len(stamps):]
    assert [r["id"] for r in ours] == [ID_PREFIX + r for r in sorted(REAL) if "shamrock" not in r]
    assert {r["split"] for r in ours} == {"train"} and {r["source"] for r in ours} == {"openclipart"}
    scale = next(r for r in ours if r["id"].endswith("scale_01"))
    assert scale["caption"] == "scale. tool, mass, work." and scale["category"] == "science"
    assert scale["keywords"] == ["", "tool", "mass", "scale", "work"]
    assert scale["image"] == str(built["root"] / "png/science/scale_01.png")
    assert scale["group"] == caption_group(scale["caption"]) and scale["category_path"] == "science"
    near = [json.loads(line) for line in out.with_name("manifest.near_duplicates.jsonl").read_text().splitlines()]
    assert near == [{"id": ID_PREFIX + "plants/shamrock_for_march_natha_01", "match": "seasonal/clover",
                     "dhash_distance": 0, "colour_distance": near[0]["colour_distance"]}]
    rejects = {json.loads(line)["id"]: json.loads(line)["reason"]
               for line in out.with_name("manifest.rejects.jsonl").read_text().splitlines()}
    assert set(rejects) == {ID_PREFIX + f"bad/{n}" for n in ("broken", "bomb", "corrupt_png", "empty", "no_png")}
    assert "unreadable SVG metadata" in rejects[ID_PREFIX + "bad/broken"]
    assert "UnsafeXMLError" in rejects[ID_PREFIX + "bad/bomb"]
    assert "cannot decode image" in rejects[ID_PREFIX + "bad/corrupt_png"]
    assert "no caption" in rejects[ID_PREFIX + "bad/empty"] and "PNG missing" in rejects[ID_PREFIX + "bad/no_png"]
    stats = json.loads(out.with_name("manifest.stats.json").read_text())
    assert stats["images"] == 10 and stats["noise_measured_on"] == 6 and stats["near_duplicates"] == 1


def test_rerun_and_resume_write_identical_files(built: dict) -> None:
    out = built["out"]
    names = ["manifest.jsonl", "manifest.rejects.jsonl", "manifest.near_duplicates.jsonl", "manifest.stats.json"]
    before = {n: out.with_name(n).read_bytes() for n in names}
    store = out.with_name("manifest.signatures.jsonl")
    lines = store.read_text().splitlines()
    store.write_text("\n".join(lines[: len(lines) // 2]) + "\n" + lines[-1][:20])  # as if interrupted mid-write
    result = invoke("data", "openclipart", "--root", built["root"], "--out", out)
    assert result.exit_code == 0, result.output
    assert {n: out.with_name(n).read_bytes() for n in names} == before


def test_limit_on_the_installed_data(tmp_path: Path) -> None:
    if not STAMPS.is_dir():
        pytest.skip(f"Tux Paint stamps are not installed at {STAMPS}")
    out = tmp_path / "m.jsonl"
    result = invoke("data", "openclipart", "--limit", "3", "--openclipart-only", "--out", out)
    assert result.exit_code == 0, result.output
    rows = read_manifest(out)
    assert len(rows) == 3 and all(r["id"].startswith(ID_PREFIX) and r["split"] == "train" for r in rows)


def test_missing_packages_is_one_line(tmp_path: Path) -> None:
    result = invoke("data", "openclipart", "--root", tmp_path / "nothing", "--out", tmp_path / "m.jsonl")
    assert result.exit_code == 2 and "\n" not in result.output.strip()
    assert "make setup" in result.output and "apt-get install -y openclipart-png openclipart-svg" in result.output


def test_stage_file_is_the_demo_stage_on_other_data() -> None:
    demo = tomllib.loads((REPO / "stages/image_text.toml").read_text())
    ours = tomllib.loads((REPO / "stages/image_text_openclipart.toml").read_text())
    assert ours["data"] == {"manifest": "outputs/openclipart/manifest.jsonl", "cache_dir": "outputs/openclipart/cache"}
    assert ours["stage"]["name"] == "image_text_openclipart"
    # The one setting chosen for this data (docs/results.md): caption-group balance.
    assert ours["curriculum"] == {**demo["curriculum"], "weighting": "none", "group_balance": 1.0}
    for raw in (demo, ours):
        raw.pop("data"), raw["stage"].pop("name"), raw["stage"].pop("description"), raw.pop("curriculum")
    assert ours == demo
