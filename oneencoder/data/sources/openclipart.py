"""Openclipart (Debian ``openclipart-png`` + ``openclipart-svg``, public domain) as noisy image-text pairs.

8,121 clip-art images: ``<root>/png/<path>.png``, whose metadata lives in the SVG it was
rendered from, ``<root>/svg/<path>.svg`` (``dc:title``, ``dc:description``, keywords as
``rdf:li`` under ``dc:subject``). Both are read in place and never copied. The caption is
built from the metadata by :func:`build_caption`; the raw fields are kept beside it.
Noisy pairs are kept on purpose: telling good pairs from bad is the curriculum's job.

Every openclipart sample is a training sample (validation and test stay Tux Paint's), so
:mod:`oneencoder.data.sources.openclipart_build` leaves out near-duplicates of Tux Paint's
validation and test images.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

from ...progress import progress_bar

from ...errors import OneEncoderError
from ..manifest import caption_group

DEFAULT_ROOT = Path("/usr/share/openclipart")
INSTALL_HINT = ("run `make setup`, or `apt-get update && apt-get install -y openclipart-png openclipart-svg`")
#: Openclipart ids start with this, so they never collide with Tux Paint's (both have food/fruit/banana).
ID_PREFIX = "openclipart/"
SOURCE = "openclipart"

_DC = "http://purl.org/dc/elements/1.1/"
_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
_SEP = "}"  # expat joins namespace and local name with this: "{ns}name" as ElementTree writes it
_TITLE, _DESCRIPTION, _SUBJECT, _CREATOR, _LI = (f"{{{_DC}}}title", f"{{{_DC}}}description",
                                                 f"{{{_DC}}}subject", f"{{{_DC}}}creator", f"{{{_RDF}}}li")
# Entity guard: Illustrator SVGs declare a dozen short namespace entities; nothing legitimate
# needs nested, external or parameter entities, which are how entity-expansion attacks work.
_MAX_ENTITIES, _MAX_ENTITY_CHARS = 64, 1024
#: ``HASH(0x...)``: a Perl hash the exporter printed instead of a value (titles, keywords, descriptions).
JUNK = re.compile(r"HASH\(0x[0-9a-fA-F]+\)", re.IGNORECASE)
_INKSCAPE_ONLY = re.compile(r"^(created|create|made|drawn)\s+(with|in|using)\s+(the\s+)?inkscape\W*$", re.I)


class UnsafeXMLError(ValueError):
    """An SVG declares entities that could expand without bound or read other files."""


class _Done(Exception):
    """Raised inside the parser once the metadata has been read: the drawing is not needed."""


@dataclass
class SvgMetadata:
    """The Dublin Core metadata of one SVG's ``cc:Work``, as the author wrote it.

    Attributes:
        title: ``dc:title`` ("" when missing).
        description: ``dc:description`` ("" when missing).
        keywords: Every ``rdf:li`` under ``dc:subject``, in file order, empty ones included.
        author: The creator agent's ``dc:title`` ("" when missing).
    """

    title: str = ""
    description: str = ""
    keywords: list[str] = field(default_factory=list)
    author: str = ""


def _qualified(name: str) -> str:
    ns, _, local = name.rpartition(_SEP)
    return f"{{{ns}}}{local}" if ns else local


def read_svg_metadata(path: str | Path) -> SvgMetadata:
    """Read an SVG's metadata with expat, stopping once ``<metadata>`` closes.

    Entity declarations are checked as they are read: parameter entities, external
    entities, entities whose value refers to another entity, and more than 64 entities or
    entities longer than 1,024 characters raise :class:`UnsafeXMLError`. Expat itself never
    fetches external files.

    Raises:
        UnsafeXMLError: See above.
        xml.parsers.expat.ExpatError: The file is not well-formed XML (up to its metadata).
        OSError: The file cannot be read.
    """
    meta = SvgMetadata()
    stack: list[str] = []
    text: list[str] = []
    state = {"work": 0, "done_work": False, "entities": 0}
    parser = expat.ParserCreate(namespace_separator=_SEP)

    def entity(name, is_parameter, value, base, system_id, public_id, notation) -> None:
        state["entities"] += 1
        if is_parameter or value is None or system_id or public_id or notation:
            raise UnsafeXMLError(f"entity {name!r} is a parameter, external or unparsed entity")
        if "&" in value or "%" in value or len(value) > _MAX_ENTITY_CHARS or state["entities"] > _MAX_ENTITIES:
            raise UnsafeXMLError(f"entity {name!r} refers to other entities or is too long or too many")

    def start(name: str, attrs: dict) -> None:
        stack.append(_qualified(name))
        text.clear()
        if stack[-1].endswith("}Work") and not state["done_work"] and not state["work"]:
            state["work"] = len(stack)

    def end(name: str) -> None:
        value, tag = "".join(text), stack[-1]
        text.clear()
        depth = state["work"]
        if depth and not state["done_work"]:
            inside = stack[depth:]  # path below cc:Work
            if inside == [_TITLE]:
                meta.title = value
            elif inside == [_DESCRIPTION]:
                meta.description = value
            elif tag == _LI and _SUBJECT in inside:
                meta.keywords.append(value)
            elif tag == _TITLE and inside[:1] == [_CREATOR] and not meta.author:
                meta.author = value
            if len(stack) == depth:
                state["done_work"] = True
        stack.pop()
        if tag.endswith("}metadata") or tag == "metadata":
            raise _Done

    parser.buffer_text = True
    parser.EntityDeclHandler = entity
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text.append
    try:
        with open(path, "rb") as f:
            parser.ParseFile(f)
    except _Done:
        pass
    return meta


# ----- captions ------------------------------------------------------------------------------


def _clean(text: str) -> str:
    """Undo double HTML escaping (``&amp;#39;``), drop ``HASH(0x...)`` (a Perl hash printed by the
    exporter, not text) and collapse whitespace."""
    return " ".join(JUNK.sub(" ", html.unescape(text)).split())


def clean_keywords(keywords: list[str], title: str = "") -> list[str]:
    """Keywords as caption words: underscores to spaces, junk and empties dropped, no repeats or title."""
    out, seen = [], {title.lower()} if title else set()
    for raw in keywords:
        word = _clean(raw.replace("_", " "))
        if word and word.lower() not in seen:
            seen.add(word.lower())
            out.append(word)
    return out


def _sentence(text: str) -> str:
    """``text`` ending in one full stop (or its own ``!``/``?``/``.``)."""
    text = text.strip()
    return text if text[-1:] in ".!?" else text + "."


def caption_head(meta: SvgMetadata) -> str:
    """The caption's first part: the title, else the description's first sentence (up to 120 characters)."""
    title = _clean(meta.title)
    if title:
        return title
    description = _clean(meta.description)
    if not description or _INKSCAPE_ONLY.match(description):
        return ""
    first = re.split(r"(?<=[.!?])\s", description, maxsplit=1)[0]
    return first[:120].rstrip()


def build_caption(meta: SvgMetadata) -> str:
    """``"<title>. <keywords joined by ', '>."``, e.g. ``"Soft Blue Couch. furniture."``.

    Only formatting junk is removed: ``HASH(0x...)``, empty keywords, underscores in
    keywords, repeated keywords and a keyword equal to the title. Without a title the
    description's first sentence stands in (unless it is only "Created with Inkscape").
    Template titles, other languages and author names stay: they are the noise.
    Returns "" when nothing is left.
    """
    head = caption_head(meta)
    keywords = clean_keywords(meta.keywords, head)
    parts = ([_sentence(head)] if head else []) + ([_sentence(", ".join(keywords))] if keywords else [])
    return " ".join(parts)


# ----- records -------------------------------------------------------------------------------


def check_installed(root: str | Path = DEFAULT_ROOT) -> Path:
    """``root``, after checking it holds ``png/`` and ``svg/``; a one-line error says how to install them."""
    root = Path(root)
    missing = [sub for sub in ("png", "svg") if not (root / sub).is_dir()]
    if missing:
        raise OneEncoderError(f"openclipart not found: {root}/{missing[0]} is missing; {INSTALL_HINT}")
    return root


def list_images(root: str | Path = DEFAULT_ROOT) -> list[str]:
    """Every ``<path>`` (under png/ or svg/, without extension) in sorted order."""
    root = check_installed(root)
    stems = {str(p.relative_to(root / sub))[: -len(ext)]
             for sub, ext in (("png", ".png"), ("svg", ".svg")) for p in (root / sub).rglob(f"*{ext}")}
    return sorted(stems)


def _record(rel: str, png: Path, meta: SvgMetadata, caption: str) -> dict:
    parts = rel.split("/")
    return {
        "id": ID_PREFIX + rel,
        "image": str(png),
        "caption": caption,
        "group": caption_group(caption),
        "split": "train",
        "source": SOURCE,
        "title": meta.title,
        "description": meta.description,
        "keywords": meta.keywords,
        "author": meta.author,
        "category": parts[0] if len(parts) > 1 else "",
        "category_path": "/".join(parts[:-1]),
    }


def openclipart_records(root: str | Path = DEFAULT_ROOT, limit: int | None = None,
                        progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Read every image's SVG metadata: ``(records, rejects)``, both sorted by id.

    Args:
        root: Folder holding ``png/`` and ``svg/``.
        limit: Read only the first ``limit`` paths (sorted), for quick runs.
        progress: Show a progress bar.

    Returns:
        Records (all in the train split, ``image`` absolute) and rejects
        ``{"id", "file", "reason"}``: a PNG without its SVG, an SVG without its PNG,
        unreadable or unsafe SVG metadata, or metadata with no caption text at all.
    """
    root = check_installed(root)
    paths = list_images(root)[:limit] if limit is not None else list_images(root)
    records, rejects = [], []
    for rel in progress_bar(paths, desc="openclipart metadata", unit="image", enabled=progress):
        png, svg = root / "png" / f"{rel}.png", root / "svg" / f"{rel}.svg"
        if not png.is_file():
            rejects.append({"id": ID_PREFIX + rel, "file": str(png), "reason": f"PNG missing (SVG {svg} has none)"})
            continue
        if not svg.is_file():
            rejects.append({"id": ID_PREFIX + rel, "file": str(svg), "reason": "SVG missing, so no metadata"})
            continue
        try:
            meta = read_svg_metadata(svg)
        except (expat.ExpatError, UnsafeXMLError, OSError) as e:
            rejects.append({"id": ID_PREFIX + rel, "file": str(svg),
                            "reason": f"unreadable SVG metadata ({type(e).__name__}: {e})"})
            continue
        caption = build_caption(meta)
        if not caption:
            rejects.append({"id": ID_PREFIX + rel, "file": str(svg),
                            "reason": "no caption: empty title, description and keywords"})
            continue
        records.append(_record(rel, png, meta, caption))
    return records, rejects
