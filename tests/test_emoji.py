"""Emoji (real Debian and PyPI data): captions, Noto rendering, the held-out EmojiOne style, the CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.data.manifest import caption_group, caption_split, read_manifest
from oneencoder.data.sources import emoji as em

STAMPS = Path("/usr/share/tuxpaint/stamps")
_MISSING = [what for what, ok in (
    ("PyPI package emoji (`make setup`)", importlib.util.find_spec("emoji") is not None),
    (f"Debian fonts-noto-color-emoji ({em.NOTO_FONT})", em.NOTO_FONT.is_file()),
    (f"Debian ruby-gemojione ({em.EMOJIONE_ROOT})", em.EMOJIONE_ROOT.is_dir()),
) if not ok]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"not installed: {', '.join(_MISSING)}")

runner = CliRunner()
LIMIT = 60  # the first 60 emoji by code point: keycaps and symbols, "Sun." among them
FOX, GERMANY, TEACHER = "\U0001F98A", "\U0001F1E9\U0001F1EA", "\U0001F469\u200d\U0001F3EB"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _entry(chars: str) -> em.EmojiEntry:
    return next(e for e in em.emoji_catalog()[0] if e.chars == chars)


def test_caption_rule() -> None:
    assert em.build_caption("\U0001F34E", "red apple") == "Red apple."
    assert em.build_caption(GERMANY, "Germany") == "Flag of Germany."
    assert em.build_caption("\U0001F996", "T-Rex") == "T-Rex."
    assert em.build_caption("\U0001F3F4\U000E0067\U000E0062\U000E0065\U000E006E\U000E0067\U000E007F",
                            "England") == "Flag of England."
    assert em.short_name(":Mrs._Claus:") == "Mrs. Claus"
    assert em.alias_keywords([":fox_face:", ":fox:"], "fox") == ("fox face",)
    assert em.caption_core("  A Frog. ") == "frog" == em.caption_core("Frog.")

    entries, left_out = em.emoji_catalog()
    fox = _entry(FOX)
    assert (fox.caption, fox.keywords, fox.codepoints) == ("Fox.", ("fox face",), "1F98A")
    assert _entry(TEACHER).caption == "Woman teacher."
    assert left_out["skin tone"] > 1500 and left_out["component"] > 0  # skin tones are left out by rule
    assert not any(em.has_skin_tone(tuple(ord(c) for c in e.chars)) for e in entries)
    assert all(e.caption == em.build_caption(e.chars, e.name) and e.caption.endswith(".") for e in entries)
    assert len({e.caption.lower() for e in entries}) == len(entries) > 1800  # one concept per caption


def test_rendering_is_deterministic_and_resumable(tmp_path: Path) -> None:
    entries = [_entry(c) for c in (FOX, GERMANY, TEACHER)]
    first, second = em.NotoRenderer(tmp_path / "a"), em.NotoRenderer(tmp_path / "b")
    assert first.folder.name == second.folder.name and first.folder.name.startswith("noto-")  # same settings
    for entry in entries:
        (p1, drawn1, why1), (p2, drawn2, _) = first.render(entry), second.render(entry)
        assert drawn1 and drawn2 and why1 is None and p1.name == f"{entry.codepoints}.png"
        assert p1.read_bytes() == p2.read_bytes()
        with Image.open(p1) as img:
            assert img.size == (136, 128) and img.mode == "RGBA" and img.getbbox() is not None
        assert first.render(entry) == (p1, False, None)  # a rerun reuses the file
    assert json.loads((first.folder / "settings.json").read_text())["font_size"] == em.NOTO_SIZE


def test_emoji_the_font_cannot_draw_are_rejected(tmp_path: Path) -> None:
    renderer = em.NotoRenderer(tmp_path)
    # Emoji 16 (face with bags under eyes) is newer than the font; ballet dancer is a sequence it cannot
    # join; the flag of Sark (Emoji 16) would be drawn as the font's white "?" flag.
    for chars, reason in (("\U0001FAE9", "no glyph"), ("\U0001F9D1\u200d\U0001FA70", "no single glyph"),
                          ("\U0001F1E8\U0001F1F6", "unknown-flag placeholder")):
        path, drawn, why = renderer.render(_entry(chars))
        assert path is None and not drawn and reason in why


def _emojione_root(tmp_path: Path, broken: str) -> Path:
    """EmojiOne's real PNGs (symbolic links), one of them replaced by junk, plus a misnamed file."""
    root = tmp_path / "emojione"
    root.mkdir()
    for png in em.EMOJIONE_ROOT.glob("*.png"):
        if png.stem != broken:
            (root / png.name).symlink_to(png)
    (root / f"{broken}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 16)
    (root / "notes.png").symlink_to(em.EMOJIONE_ROOT / "1F98A.png")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not STAMPS.is_dir():
        pytest.skip(f"Tux Paint stamps are not installed at {STAMPS}")
    tmp = tmp_path_factory.mktemp("emoji")
    root = _emojione_root(tmp, broken="0031-20E3")  # keycap 1, a test emoji
    out = tmp / "out" / "manifest.jsonl"
    result = invoke("data", "emoji", "--emojione-root", root, "--limit", LIMIT, "--out", out)
    assert result.exit_code == 0, result.output
    return {"out": out, "output": result.output, "root": root}


def test_held_out_style_never_meets_training(built: dict, stamps: list[dict]) -> None:
    rows = read_manifest(built["out"])
    noto = [r for r in rows if r["style"] == "noto"]
    held = [r for r in rows if r["style"] == em.HELDOUT_STYLE]
    assert len(noto) == LIMIT and held and f"{LIMIT} drawn + 0 reused" in built["output"]
    assert all(r["split"] == "test" and r["heldout"] == "style" and r["license"] == "CC-BY-SA-4.0" for r in held)
    assert all(Path(r["image"]).parent == built["root"] for r in held)  # read in place, never copied
    train = [r for r in rows if r["split"] == "train"]
    assert train and {r["style"] for r in train} == {"noto"}
    for key in ("id", "caption", "group", "image"):
        assert not {r[key] for r in held} & {r[key] for r in train}, key
    # Noto splits are the caption-hash split, except concepts that Tux Paint holds out.
    matches = {m["caption"]: m for m in map(json.loads, built["out"].with_name(
        "manifest.tuxpaint_matches.jsonl").read_text().splitlines())}
    assert matches["Sun."] == {"id": "emoji/noto/2600-FE0F", "caption": "Sun.", "hash_split": "train",
                               "split": "test", "tuxpaint_id": "space/planets/0_sun", "tuxpaint_caption": "The Sun."}
    for r in noto:
        expected = matches[r["caption"]]["split"] if r["caption"] in matches else caption_split(r["caption"])
        assert r["split"] == expected
        assert r["heldout"] == ("concept" if r["split"] == "test" else None)
        assert r["group"] == caption_group(r["caption"]) and Path(r["image"]).is_file()
    held_out_cores = {em.caption_core(s["caption"]) for s in stamps if s["split"] != "train" and s["caption"]}
    assert not {em.caption_core(r["caption"]) for r in train} & held_out_cores
    keycap = next(r for r in rows if r["id"] == "emoji/noto/31-FE0F-20E3")
    assert keycap["caption"] == "Keycap 1." and keycap["keywords"] == ["one"] and keycap["split"] == "test"


def test_rejects_are_written_and_reruns_are_identical(built: dict) -> None:
    out = built["out"]
    rejects = {r["id"]: r for r in map(json.loads, out.with_name("manifest.rejects.jsonl").read_text().splitlines())}
    assert "cannot decode image" in rejects["emoji/emojione/31-FE0F-20E3"]["reason"]
    assert rejects["emoji/emojione/notes"]["reason"] == "file name is not hex code points"
    assert f"2 rejected (see {out.with_name('manifest.rejects.jsonl')})" in built["output"]
    stats = json.loads(out.with_name("manifest.stats.json").read_text())
    assert stats["rejected"] == 2 and stats["per_style"]["noto"]["train"] > 0 and stats["emoji_package"]

    names = ["manifest.jsonl", "manifest.rejects.jsonl", "manifest.tuxpaint_matches.jsonl", "manifest.stats.json"]
    before = {n: out.with_name(n).read_bytes() for n in names}
    result = invoke("data", "emoji", "--emojione-root", built["root"], "--limit", LIMIT, "--out", out)
    assert result.exit_code == 0 and f"0 drawn + {LIMIT} reused" in result.output, result.output
    assert {n: out.with_name(n).read_bytes() for n in names} == before


def test_missing_font_is_one_line(tmp_path: Path) -> None:
    result = invoke("data", "emoji", "--font", tmp_path / "none.ttf", "--out", tmp_path / "m.jsonl")
    assert result.exit_code == 2 and "\n" not in result.output.strip()
    assert "apt-get install -y fonts-noto-color-emoji ruby-gemojione" in result.output
