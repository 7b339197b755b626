"""Emoji in two art styles as image-text pairs, one style held out for testing.

* **Noto** (Debian ``fonts-noto-color-emoji``, OFL-1.1): every emoji is drawn from the
  colour font with Pillow into ``<out folder>/images/noto-<settings hash>/<codepoints>.png``.
  The folder name hashes every setting that can change a pixel (font file, size, Pillow,
  FreeType and Raqm versions), so a rerun reuses exactly the files made the same way.
* **EmojiOne** (Debian ``ruby-gemojione``, art CC-BY-SA-4.0): 64x64 PNGs named by code
  point (``1F98A.png``), read in place and never copied. It is the held-out style.

Names and aliases come from the PyPI package ``emoji`` (CLDR short names). One emoji is one
concept: its caption is its name as a sentence (:func:`build_caption`), and its split is the
caption-hash split every manifest uses (:func:`~oneencoder.data.manifest.caption_split`):

* train and val concepts: Noto images only;
* test concepts: the Noto image (``heldout: "concept"``: new emoji, seen style) and the
  EmojiOne image (``heldout: "style"``: new emoji, new style). EmojiOne images of train and
  val concepts are never written, so the held-out style shares no caption with training.

An emoji whose caption, without article and final stop, equals a Tux Paint validation or
test caption ("Frog." and "A frog.") takes that caption's split, so a combined stage never
trains on a concept that Tux Paint holds out. Skin-tone variants, components and
not-fully-qualified spellings are left out by rule and counted; emoji the font cannot draw
and EmojiOne files that match no emoji go to the rejects file with the reason.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

from ...deps import require
from ...errors import OneEncoderError
from ...fileio import atomic_path, sha256_file, write_json_atomic, write_jsonl_atomic
from ...progress import progress_bar
from ..manifest import SPLITS, caption_group, caption_split, write_manifest
from .tuxpaint import DEFAULT_ROOT as TUXPAINT_ROOT, tuxpaint_records

NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
#: The font's one bitmap strike: Pillow refuses any other size for a CBDT font.
NOTO_SIZE = 109
EMOJIONE_ROOT = Path("/usr/share/rubygems-integration/all/gems/gemojione-3.3.0/assets/png")
INSTALL_HINT = ("run `make setup`, or `apt-get update && apt-get install -y fonts-noto-color-emoji "
                "ruby-gemojione`")
ID_PREFIX = "emoji/"
SOURCE = "emoji"
#: The art style that is only ever test data.
HELDOUT_STYLE = "emojione"
#: Per style: the Debian package, the licence of the images and whom to credit.
STYLES = {
    "noto": {"package": "fonts-noto-color-emoji", "license": "OFL-1.1",
             "credit": "Noto Color Emoji, Copyright 2013-2017 Google Inc."},
    HELDOUT_STYLE: {"package": "ruby-gemojione", "license": "CC-BY-SA-4.0",
                    "credit": "Emoji art supplied by EmojiOne, Copyright 2014 Ranks.com Inc."},
}
#: Bump when the drawing recipe changes: it is part of the render folder's hash.
RENDER_VERSION = 2
#: Tux Paint splits whose concepts no emoji may train on.
HELD_OUT_SPLITS = ("val", "test")

_SKIN_TONES = range(0x1F3FB, 0x1F400)
_IGNORED = (0xFE0F, 0x200D)  # variation selector and ZWJ: EmojiOne's file names often omit both
_REGIONAL = range(0x1F1E6, 0x1F200)
_TAGS = range(0xE0020, 0xE0080)
_STATUS = {1: "component", 3: "minimally qualified", 4: "unqualified"}
_ARTICLE = re.compile(r"^(a|an|the)\s+")
_NO_COUNTRY = "\U0001F1E6\U0001F1E6"  # regional indicators "AA": no country, so the font's unknown-flag glyph


@dataclass(frozen=True)
class EmojiEntry:
    """One fully qualified emoji without a skin tone, as the ``emoji`` package names it.

    Attributes:
        chars: The emoji itself, fully qualified.
        name: Its CLDR short name ("red apple", "Germany").
        caption: :func:`build_caption` of it.
        keywords: Its aliases as words (:func:`alias_keywords`).
        version: The Emoji version that introduced it.
    """

    chars: str
    name: str
    caption: str
    keywords: tuple[str, ...]
    version: float

    @property
    def codepoints(self) -> str:
        """``"1F98A"``, or ``"1F468-200D-1F469"`` for a sequence: the file and id stem."""
        return codepoints(self.chars)


def codepoints(chars: str) -> str:
    """Upper-case hex code points joined by ``-``."""
    return "-".join(f"{ord(c):X}" for c in chars)


def match_key(points: str | tuple[int, ...]) -> tuple[int, ...]:
    """Code points without variation selectors and ZWJs: how EmojiOne files and emoji are matched."""
    seq = tuple(ord(c) for c in points) if isinstance(points, str) else points
    return tuple(p for p in seq if p not in _IGNORED)


def has_skin_tone(seq: tuple[int, ...]) -> bool:
    return any(p in _SKIN_TONES for p in seq)


def is_flag(chars: str) -> bool:
    """A country flag (two regional indicators) or a subdivision flag (black flag + tags)."""
    seq = [ord(c) for c in chars]
    return (len(seq) == 2 and all(p in _REGIONAL for p in seq)) or (
        len(seq) > 2 and seq[0] == 0x1F3F4 and all(p in _TAGS for p in seq[1:]))


def short_name(shortcode: str) -> str:
    """``":red_apple:"`` -> ``"red apple"`` (the ``emoji`` package writes CLDR names this way)."""
    return " ".join(shortcode.strip(":").replace("_", " ").split())


def build_caption(chars: str, name: str) -> str:
    """The CLDR name as a sentence: ``"Red apple."``, ``"OK hand."``, ``"Flag of Germany."``.

    No article is added: CLDR names include plurals and mass nouns ("eyes", "jeans",
    "popcorn"). The ``emoji`` package names a flag by its country alone, so flags get
    "Flag of". Capitals inside the name stay ("T-Rex", "ATM sign").
    """
    text = f"flag of {name}" if is_flag(chars) else name
    text = text[:1].upper() + text[1:]
    return text if text[-1:] in ".!?" else text + "."


def alias_keywords(aliases: list[str], name: str) -> tuple[str, ...]:
    """Aliases (``":fox_face:"``) as words, without repeats or the name itself (ignoring case)."""
    seen, out = {name.lower()}, []
    for alias in aliases:
        word = short_name(alias)
        if word and word.lower() not in seen:
            seen.add(word.lower())
            out.append(word)
    return tuple(out)


def caption_core(caption: str) -> str:
    """A caption without case, article and final punctuation: ``"A frog."`` -> ``"frog"``."""
    return _ARTICLE.sub("", " ".join(caption.lower().split()).rstrip(".!?").strip())


def emoji_catalog() -> tuple[list[EmojiEntry], Counter]:
    """Every fully qualified emoji without a skin tone, sorted by code points, and what was left out.

    Returns:
        ``(entries, left_out)``: ``left_out`` counts the ``emoji`` package's other entries by
        reason ("skin tone", "component", "minimally qualified", "unqualified").
    """
    data = require("emoji").EMOJI_DATA
    entries, left_out = [], Counter()
    for chars, info in data.items():
        if info["status"] != 2:
            left_out[_STATUS.get(info["status"], f"status {info['status']}")] += 1
        elif has_skin_tone(tuple(ord(c) for c in chars)):
            left_out["skin tone"] += 1
        else:
            name = short_name(info["en"])
            entries.append(EmojiEntry(chars, name, build_caption(chars, name),
                                      alias_keywords(info.get("alias", []), name), float(info["E"])))
    entries.sort(key=lambda e: [ord(c) for c in e.chars])
    return entries, left_out


# ----- the Noto style: rendered with Pillow ---------------------------------------------------


class NotoRenderer:
    """Draws emoji from the Noto colour font into a folder named by the render settings.

    Args:
        out_dir: Folder that receives ``noto-<hash>/``.
        font: The font file.
    """

    def __init__(self, out_dir: str | Path, font: str | Path = NOTO_FONT) -> None:
        self.font_path = Path(font)
        try:
            self.font = ImageFont.truetype(str(self.font_path), NOTO_SIZE)
        except OSError as e:
            raise OneEncoderError(f"cannot load the emoji font {font} at size {NOTO_SIZE} ({e}); "
                                  f"{INSTALL_HINT}") from None
        # Every emoji glyph has this one advance and box; a sequence the font cannot join is wider.
        left, top, right, bottom = self.font.getbbox("\U0001F98A")
        self.size = (right - left, bottom - top)
        self.advance = self.font.getlength("\U0001F98A")
        self.settings = {
            "render_version": RENDER_VERSION, "font": self.font_path.name,
            "font_sha256": sha256_file(self.font_path), "font_size": NOTO_SIZE,
            "canvas": list(self.size), "pillow": Image.__version__,
            "freetype": features.version("freetype2"), "raqm": features.version("raqm"),
        }
        digest = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:12]
        self.folder = Path(out_dir).absolute() / f"noto-{digest}"
        # A flag the font does not know is drawn as a white flag with "?": not a picture of it.
        self._unknown_flag = self._draw(_NO_COUNTRY).tobytes()

    def _draw(self, chars: str) -> Image.Image:
        image = Image.new("RGBA", self.size, (0, 0, 0, 0))
        ImageDraw.Draw(image).text((0, 0), chars, font=self.font, embedded_color=True)
        return image

    def path(self, entry: EmojiEntry) -> Path:
        return self.folder / f"{entry.codepoints}.png"

    def problem(self, entry: EmojiEntry) -> str | None:
        """Why the font cannot draw ``entry`` as one glyph, or None."""
        glyphs = self.font.getlength(entry.chars) / self.advance
        if round(glyphs) > 1:
            return f"the font has no single glyph for this sequence (it would draw {glyphs:.0f} glyphs side by side)"
        return None

    def render(self, entry: EmojiEntry) -> tuple[Path | None, bool, str | None]:
        """Draw ``entry`` unless its file exists: ``(path or None, newly drawn, reject reason)``."""
        path = self.path(entry)
        if path.is_file():
            return path, False, None
        reason = self.problem(entry)
        if reason:
            return None, False, reason
        image = self._draw(entry.chars)
        if image.getbbox() is None:
            return None, False, "the font has no glyph for it (draws nothing)"
        if is_flag(entry.chars) and image.tobytes() == self._unknown_flag:
            return None, False, "the font does not know this flag (draws its unknown-flag placeholder)"
        if not (self.folder / "settings.json").is_file():
            write_json_atomic(self.folder / "settings.json", self.settings)
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        return path, True, None


# ----- the EmojiOne style: PNGs read in place -------------------------------------------------


def emojione_images(root: str | Path = EMOJIONE_ROOT) -> tuple[dict[tuple[int, ...], Path], int, list[dict]]:
    """EmojiOne PNGs by :func:`match_key`: ``(images, skin-tone files left out, rejects)``.

    A file name that is not hex code points is a reject; matching against the catalog is
    the build's job.
    """
    images, skin, rejects = {}, 0, []
    for png in sorted(Path(root).glob("*.png")):
        try:
            seq = tuple(int(part, 16) for part in png.stem.split("-"))
        except ValueError:
            rejects.append({"id": f"{ID_PREFIX}{HELDOUT_STYLE}/{png.stem}", "style": HELDOUT_STYLE,
                            "file": str(png), "reason": "file name is not hex code points"})
            continue
        if has_skin_tone(seq):
            skin += 1
        else:
            images[match_key(seq)] = png
    return images, skin, rejects


def _decodes(path: Path) -> str | None:
    """Why ``path`` is not a usable image, or None."""
    try:
        with Image.open(path) as img:
            visible = img.convert("RGBA").getbbox()  # the box of pixels that are not fully transparent
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f"cannot decode image ({type(e).__name__}: {e})"
    return None if visible is not None else "image is fully transparent"


# ----- the build ------------------------------------------------------------------------------


def beside(out: str | Path, suffix: str) -> Path:
    """``manifest.jsonl`` -> ``manifest.<suffix>`` in the same folder."""
    out = Path(out)
    return out.with_name(f"{out.stem if out.suffix else out.name}.{suffix}")


def check_installed(font: str | Path = NOTO_FONT, emojione_root: str | Path = EMOJIONE_ROOT) -> None:
    """Raise one line with the install command when the font or the EmojiOne PNGs are missing."""
    if not Path(font).is_file():
        raise OneEncoderError(f"Noto Color Emoji not found at {font}; {INSTALL_HINT}")
    if not Path(emojione_root).is_dir():
        raise OneEncoderError(f"EmojiOne PNGs not found at {emojione_root}; {INSTALL_HINT}")


def tuxpaint_splits(entries: list[EmojiEntry], stamps: list[dict]) -> dict[str, dict]:
    """Emoji (by caption) whose :func:`caption_core` equals a Tux Paint val/test caption's.

    Returns:
        ``{emoji caption: {"split", "tuxpaint_id", "tuxpaint_caption"}}``; a concept that is
        test in Tux Paint wins over val.
    """
    held: dict[str, dict] = {}
    for rec in sorted(stamps, key=lambda r: (r["split"] != "test", r["id"])):
        if rec["split"] in HELD_OUT_SPLITS and rec["caption"]:
            held.setdefault(caption_core(rec["caption"]), rec)
    return {e.caption: {"split": held[core]["split"], "tuxpaint_id": held[core]["id"],
                        "tuxpaint_caption": held[core]["caption"]}
            for e in entries if (core := caption_core(e.caption)) in held}


def _record(entry: EmojiEntry, style: str, image: Path, split: str) -> dict:
    heldout = ("style" if style == HELDOUT_STYLE else "concept") if split == "test" else None
    return {
        "id": f"{ID_PREFIX}{style}/{entry.codepoints}",
        "image": str(image),
        "caption": entry.caption,
        "group": caption_group(entry.caption),
        "split": split,
        "heldout": heldout,
        "source": SOURCE,
        "style": style,
        "license": STYLES[style]["license"],
        "emoji": entry.chars,
        "codepoints": entry.codepoints,
        "name": entry.name,
        "keywords": list(entry.keywords),
        "emoji_version": entry.version,
    }


@dataclass
class EmojiReport:
    """What :func:`build_emoji` wrote and counted.

    Attributes:
        manifest: The manifest file.
        samples: Its rows: Noto train, val and test, then EmojiOne test.
        rejects: ``{"id", "style", "file", "reason"}`` (and ``caption`` when the emoji is known) per
            emoji or file that made no sample.
        tuxpaint_matches: Emoji given a Tux Paint val/test caption's split.
        left_out: Counts left out by rule (skin tones, components, other spellings, EmojiOne
            images of train/val concepts).
        drawn: Noto images drawn by this run; ``reused``: found from an earlier run.
        render_folder: Where the Noto images are.
        tuxpaint_trained: Emoji in val/test whose concept Tux Paint trains on ("Frog." vs "A frog."):
            a combined stage has seen them, though this source's own training has not.
        seconds: Wall time of the whole build.
    """

    manifest: Path
    samples: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    tuxpaint_matches: list[dict] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=dict)
    drawn: int = 0
    reused: int = 0
    render_folder: Path | None = None
    tuxpaint_trained: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rejects_path(self) -> Path:
        return beside(self.manifest, "rejects.jsonl")

    @property
    def matches_path(self) -> Path:
        return beside(self.manifest, "tuxpaint_matches.jsonl")

    @property
    def stats_path(self) -> Path:
        return beside(self.manifest, "stats.json")

    def counts(self) -> dict[str, dict[str, int]]:
        """``{style: {split: rows}}``."""
        out: dict[str, dict[str, int]] = {}
        for rec in self.samples:
            out.setdefault(rec["style"], Counter())[rec["split"]] += 1
        return {style: {s: c[s] for s in SPLITS if c[s]} for style, c in out.items()}

    def summary(self) -> str:
        """One line: rows per split and style, renders, Tux Paint matches and rejects."""
        split_counts = Counter(r["split"] for r in self.samples)
        splits = ", ".join(f"{s} {split_counts.get(s, 0)}" for s in SPLITS)
        styles = "; ".join(f"{style} " + " ".join(f"{s} {n}" for s, n in c.items())
                           for style, c in self.counts().items())
        line = (f"wrote {self.manifest}: {len(self.samples)} samples ({splits}; {styles}; "
                f"{HELDOUT_STYLE} is the held-out style), Noto images {self.drawn} drawn + {self.reused} reused, "
                f"{len(self.tuxpaint_matches)} given a Tux Paint val/test split")
        if self.tuxpaint_matches:
            line += f" (see {self.matches_path})"
        return line + f", {len(self.rejects)} rejected" + (f" (see {self.rejects_path})" if self.rejects else "")


def build_emoji(out: str | Path, font: str | Path = NOTO_FONT, emojione_root: str | Path = EMOJIONE_ROOT,
                tuxpaint_root: str | Path = TUXPAINT_ROOT, limit: int | None = None,
                progress: bool = True) -> EmojiReport:
    """Render the Noto images and write the emoji manifest and its side files (module docstring).

    Args:
        out: Manifest to write; the Noto images go to ``<out folder>/images/``.
        font: The Noto Color Emoji font file.
        emojione_root: Folder of EmojiOne's ``<codepoints>.png`` files.
        tuxpaint_root: Tux Paint stamps folder (its val/test captions).
        limit: Use only the first ``limit`` emoji (sorted by code points), for quick runs.
        progress: Show a progress bar.

    Raises:
        OneEncoderError: A package is missing, or no sample is left.
    """
    start = time.perf_counter()
    out = Path(out)
    check_installed(font, emojione_root)
    stamps = tuxpaint_records(tuxpaint_root)  # raises with an install hint when missing
    entries, left_out = emoji_catalog()
    entries = entries[:limit] if limit is not None else entries
    emojione, skin, rejects = emojione_images(emojione_root)
    renderer = NotoRenderer(out.parent / "images", font)
    report = EmojiReport(manifest=out, render_folder=renderer.folder)
    matches = tuxpaint_splits(entries, stamps)

    noto, held, used_keys = [], [], set()
    for entry in progress_bar(entries, desc="emoji", unit="emoji", enabled=progress):
        split = matches[entry.caption]["split"] if entry.caption in matches else caption_split(entry.caption)
        if entry.caption in matches:
            report.tuxpaint_matches.append({"id": f"{ID_PREFIX}noto/{entry.codepoints}", "caption": entry.caption,
                                            "hash_split": caption_split(entry.caption), **matches[entry.caption]})
        path, drawn, reason = renderer.render(entry)
        if path is None:
            rejects.append({"id": f"{ID_PREFIX}noto/{entry.codepoints}", "style": "noto", "caption": entry.caption,
                            "file": str(renderer.font_path), "reason": reason})
        else:
            report.drawn, report.reused = report.drawn + drawn, report.reused + (not drawn)
            noto.append(_record(entry, "noto", path, split))
        png = emojione.get(match_key(entry.chars))
        if png is not None:
            used_keys.add(match_key(entry.chars))
            if split != "test":
                left_out["emojione image of a train/val emoji"] += 1
            elif (why := _decodes(png)) is not None:
                rejects.append({"id": f"{ID_PREFIX}{HELDOUT_STYLE}/{entry.codepoints}", "style": HELDOUT_STYLE,
                                "caption": entry.caption, "file": str(png), "reason": why})
            else:
                held.append(_record(entry, HELDOUT_STYLE, png, "test"))
    if limit is None:  # with a limit, unmatched files are simply outside the range looked at
        rejects += [{"id": f"{ID_PREFIX}{HELDOUT_STYLE}/{png.stem}", "style": HELDOUT_STYLE, "file": str(png),
                     "reason": "no fully qualified emoji in the emoji package has these code points"}
                    for key, png in sorted(emojione.items()) if key not in used_keys]
    left_out["emojione skin tone"] = skin
    report.left_out = dict(sorted(left_out.items()))
    report.rejects = sorted(rejects, key=lambda r: r["id"])
    report.samples = sorted(noto, key=lambda r: SPLITS.index(r["split"])) + held
    trained = {caption_core(r["caption"]) for r in stamps if r["split"] == "train" and r["caption"]}
    report.tuxpaint_trained = sorted({r["caption"] for r in noto
                                      if r["split"] != "train" and caption_core(r["caption"]) in trained})

    write_jsonl_atomic(report.rejects_path, report.rejects)
    if not report.samples:
        raise OneEncoderError(f"no emoji made a sample; see {report.rejects_path}")
    write_manifest(out, report.samples)
    write_jsonl_atomic(report.matches_path, report.tuxpaint_matches)
    write_json_atomic(report.stats_path, _stats(report, renderer, limit))
    report.seconds = round(time.perf_counter() - start, 2)
    return report


def _stats(report: EmojiReport, renderer: NotoRenderer, limit: int | None) -> dict:
    """Counts for docs and later analysis (no timings or drawn/reused counts: reruns write the same file)."""
    return {
        "limit": limit,
        "emoji_package": require("emoji").__version__,
        "samples": len(report.samples),
        "per_style": report.counts(),
        "heldout": dict(Counter(r["heldout"] for r in report.samples if r["heldout"])),
        "rejected": len(report.rejects),
        "rejects_by_style": dict(Counter(r["style"] for r in report.rejects)),
        "left_out": report.left_out,
        "tuxpaint_matches": len(report.tuxpaint_matches),
        "val_test_captions_tuxpaint_trains_on": report.tuxpaint_trained,
        "with_keywords": sum(bool(r["keywords"]) for r in report.samples if r["style"] == "noto"),
        "noto_render": renderer.settings,
        "styles": STYLES,
    }
