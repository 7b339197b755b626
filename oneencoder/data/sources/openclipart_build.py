"""Write the openclipart manifest: metadata, near-duplicate filter, noise report, rejects.

:func:`build_openclipart` runs the whole job behind ``oneencoder data openclipart``:

1. read every SVG's metadata and build the captions (:mod:`.openclipart`);
2. compute a perceptual signature of every PNG and of every Tux Paint validation and
   test image (:mod:`.imagehash`), remembered in ``<out stem>.signatures.jsonl`` so a rerun
   or an interrupted run does not hash again;
3. leave out openclipart images that are near-duplicates of a Tux Paint validation or
   test image (they would leak test images into training);
4. measure the captions' noise on every image whose metadata was read (below);
5. write the manifest (with ``with_tuxpaint``: every Tux Paint stamp with its own split,
   then the openclipart training samples), ``<out stem>.rejects.jsonl``,
   ``<out stem>.near_duplicates.jsonl`` and ``<out stem>.stats.json``.

The same inputs always give byte-identical files.

Caption noise is measured, never filtered (which pairs are good is the curriculum's job):

* **template**: a caption shared (after ``strip().lower()``) by at least
  :data:`TEMPLATE_MIN` images;
* **non-English**: a heuristic on the caption's head (the title): it has more words found
  only in the Tux Paint stamps' Italian, French, Spanish, German, Portuguese or Dutch
  captions than words found in their English captions. The vocabularies are small (about
  1,100 English and 5,600 other words), so it misses titles whose words the stamps never
  use and flags some English ones ("Photo", "Europe");
* **junk**: an empty title, or ``HASH(0x...)`` in the title, description or keywords.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ...progress import progress_bar

from ...errors import OneEncoderError
from ...fileio import write_json_atomic, write_jsonl_atomic
from ..manifest import SPLITS, caption_key, write_manifest
from .imagehash import ASPECT_MAX, COLOUR_MAX, DHASH_MAX, SignatureStore, nearest_duplicates
from .openclipart import DEFAULT_ROOT, JUNK, SvgMetadata, caption_head, check_installed, openclipart_records
from .tuxpaint import DEFAULT_ROOT as TUXPAINT_ROOT, tuxpaint_records

# ----- caption noise: measurements for reports, never filters ----------------------------------

#: A caption shared by at least this many images is a template: it cannot tell them apart.
TEMPLATE_MIN = 20
#: Tux Paint translation languages whose words count as "not English" (those openclipart's titles use).
OTHER_LANGUAGES = ("it", "fr", "es", "de", "pt", "nl")
_WORD = re.compile(r"[^\W\d_]{2,}")  # runs of two or more letters, any script
_TRANSLATION = re.compile(r"^([A-Za-z]+)(?:[_@][A-Za-z@_]*)?\.utf8=(.*)$")


def words(text: str) -> list[str]:
    """Lower-case words of two or more letters (digits and punctuation split them)."""
    return _WORD.findall(text.lower())


def vocabularies(stamps_root: str | Path) -> tuple[frozenset[str], frozenset[str]]:
    """``(English words, words of the other languages that are not English words)`` of the stamps.

    Each stamp's ``name.txt`` has its English caption on the first line, then
    ``<lang>.utf8=<caption>`` lines (``en_GB.utf8=`` counts as English).
    """
    english: set[str] = set()
    other: set[str] = set()
    for txt in sorted(Path(stamps_root).rglob("*.txt")):
        try:
            lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        if not lines:
            continue
        english.update(words(lines[0]))
        for line in lines[1:]:
            m = _TRANSLATION.match(line.strip())
            if not m:
                continue
            if m.group(1) == "en":
                english.update(words(m.group(2)))
            elif m.group(1) in OTHER_LANGUAGES:
                other.update(words(m.group(2)))
    return frozenset(english), frozenset(other - english)


def is_non_english(text: str, english: frozenset[str], other: frozenset[str]) -> bool:
    """Heuristic: ``text`` has more words only the other languages use than English words."""
    ws = words(text)
    return sum(w in other for w in ws) > sum(w in english for w in ws)


def template_keys(captions: Iterable[str], minimum: int = TEMPLATE_MIN) -> set[str]:
    """Normalised captions (:func:`~oneencoder.data.manifest.caption_key`) shared by ``minimum`` or more."""
    counts = Counter(caption_key(c) for c in captions)
    return {k for k, n in counts.items() if n >= minimum}


def noise_shares(flags: list[list[str]]) -> dict[str, float]:
    """Share of samples carrying each flag (``template``, ``non_english``, ``junk``) and any of them."""
    n = max(len(flags), 1)
    shares = {kind: sum(kind in f for f in flags) / n for kind in ("template", "non_english", "junk")}
    shares["any"] = sum(bool(f) for f in flags) / n
    return shares


# ----- the build ---------------------------------------------------------------------------------

#: Tux Paint splits whose images no openclipart training image may duplicate.
HELD_OUT_SPLITS = ("val", "test")


def beside(out: str | Path, suffix: str) -> Path:
    """``manifest.jsonl`` -> ``manifest.<suffix>`` in the same folder."""
    out = Path(out)
    return out.with_name(f"{out.stem if out.suffix else out.name}.{suffix}")


@dataclass
class OpenclipartReport:
    """What :func:`build_openclipart` wrote and measured.

    Attributes:
        manifest: The manifest file.
        samples: Its rows (openclipart ones after the near-duplicate filter, plus Tux Paint's).
        openclipart: How many openclipart rows it holds.
        rejects: ``{"id", "file", "reason"}`` per bad openclipart file.
        near_duplicates: ``{"id", "match", "dhash_distance", "colour_distance"}`` per image left out.
        noise: Shares of captions that are templates, non-English (heuristic) or junk.
        images: Openclipart paths looked at (PNG or SVG present).
        measured: Images whose noise was measured (metadata read, caption not empty).
        tuxpaint_skipped: Tux Paint val/test images that could not be decoded (so not compared).
        seconds: Wall time of the metadata pass and of the signature pass.
    """

    manifest: Path
    samples: list[dict] = field(default_factory=list)
    openclipart: int = 0
    rejects: list[dict] = field(default_factory=list)
    near_duplicates: list[dict] = field(default_factory=list)
    noise: dict[str, float] = field(default_factory=dict)
    images: int = 0
    measured: int = 0
    tuxpaint_skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def rejects_path(self) -> Path:
        return beside(self.manifest, "rejects.jsonl")

    @property
    def near_duplicates_path(self) -> Path:
        return beside(self.manifest, "near_duplicates.jsonl")

    @property
    def stats_path(self) -> Path:
        return beside(self.manifest, "stats.json")

    def summary(self) -> str:
        """One line: samples per split, openclipart rows, near-duplicates, rejects and caption noise."""
        counts = Counter(r["split"] for r in self.samples)
        splits = ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS)
        line = (f"wrote {self.manifest}: {len(self.samples)} samples ({splits}; openclipart {self.openclipart} "
                f"train), {len(self.near_duplicates)} near-duplicates of Tux Paint val/test left out")
        if self.near_duplicates:
            line += f" (see {self.near_duplicates_path})"
        line += f", {len(self.rejects)} rejected" + (f" (see {self.rejects_path})" if self.rejects else "")
        n = self.noise
        return line + (f"; captions of {self.measured} images: {n['template']:.1%} templates, "
                       f"{n['non_english']:.1%} non-English (heuristic), {n['junk']:.1%} junk")


def _noise_flags(records: list[dict], stamps_root: Path) -> list[list[str]]:
    english, other = vocabularies(stamps_root)
    templates = template_keys(r["caption"] for r in records)
    flags = []
    for rec in records:
        meta = SvgMetadata(rec["title"], rec["description"], rec["keywords"], rec["author"])
        raw = [rec["title"], rec["description"], *rec["keywords"]]
        kinds = []
        if caption_key(rec["caption"]) in templates:
            kinds.append("template")
        if is_non_english(caption_head(meta), english, other):
            kinds.append("non_english")
        if not rec["title"].strip() or any(JUNK.search(t) for t in raw):
            kinds.append("junk")
        flags.append(kinds)
    return flags


def _signatures(paths: dict[str, str], store: SignatureStore, desc: str,
                progress: bool) -> tuple[dict, dict[str, str]]:
    """``({id: signature}, {id: reason})`` for ``{id: image path}``."""
    sigs, failed = {}, {}
    for key, path in progress_bar(sorted(paths.items()), desc=desc, unit="image", enabled=progress):
        try:
            sigs[key] = store.get(path)
        except Exception as e:  # noqa: BLE001 - Pillow, cairosvg and XML errors have many types
            failed[key] = f"cannot decode image ({type(e).__name__}: {e})"
    return sigs, failed


def build_openclipart(out: str | Path, root: str | Path = DEFAULT_ROOT, tuxpaint_root: str | Path = TUXPAINT_ROOT,
                      limit: int | None = None, with_tuxpaint: bool = True,
                      progress: bool = True) -> OpenclipartReport:
    """Build the openclipart manifest and its side files (see the module docstring).

    Args:
        out: Manifest to write.
        root: Openclipart folder holding ``png/`` and ``svg/``.
        tuxpaint_root: Tux Paint stamps folder (validation/test images, and the vocabularies
            of the non-English heuristic).
        limit: Read only the first ``limit`` openclipart paths (sorted).
        with_tuxpaint: Also write every Tux Paint record (own splits) into the manifest.
        progress: Show progress bars.

    Raises:
        OneEncoderError: Openclipart or the Tux Paint stamps are not installed, or no sample is left.
    """
    out = Path(out)
    check_installed(root)
    stamps = tuxpaint_records(tuxpaint_root)  # raises with an install hint when missing
    report = OpenclipartReport(manifest=out)

    start = time.perf_counter()
    records, report.rejects = openclipart_records(root, limit=limit, progress=progress)
    report.seconds["metadata"] = round(time.perf_counter() - start, 2)
    report.images = len(records) + len(report.rejects)

    flags = _noise_flags(records, Path(tuxpaint_root))
    report.noise, report.measured = noise_shares(flags), len(records)
    for rec, kinds in zip(records, flags):
        rec["noise"] = kinds  # for analysis only: training reads the modality fields, never this

    start = time.perf_counter()
    store = SignatureStore(beside(out, "signatures.jsonl"))
    held_out = {r["id"]: r["image"] for r in stamps if r["split"] in HELD_OUT_SPLITS}
    ref_sigs, ref_failed = _signatures(held_out, store, "Tux Paint val/test signatures", progress)
    report.tuxpaint_skipped = sorted(ref_failed)
    sigs, failed = _signatures({r["id"]: r["image"] for r in records}, store, "openclipart signatures", progress)
    report.seconds["signatures"] = round(time.perf_counter() - start, 2)

    by_id = {r["id"]: r for r in records}
    report.rejects += [{"id": key, "file": by_id[key]["image"], "reason": reason} for key, reason in failed.items()]
    report.rejects.sort(key=lambda r: r["id"])
    matches = nearest_duplicates(sigs, ref_sigs)
    report.near_duplicates = [{"id": key, **match} for key, match in sorted(matches.items())]
    kept = [r for r in records if r["id"] in sigs and r["id"] not in matches]
    report.openclipart = len(kept)
    report.samples = (stamps if with_tuxpaint else []) + kept

    write_jsonl_atomic(report.rejects_path, report.rejects)
    if not report.samples:
        raise OneEncoderError(f"no openclipart image under {root} made a sample; see {report.rejects_path}")
    write_manifest(out, report.samples)
    write_jsonl_atomic(report.near_duplicates_path, report.near_duplicates)
    write_json_atomic(report.stats_path, _stats(report, records, flags, limit, with_tuxpaint))
    return report


def _stats(report: OpenclipartReport, records: list[dict], flags: list[list[str]], limit: int | None,
           with_tuxpaint: bool) -> dict:
    """Counts for docs and later analysis (no timings, so reruns write the same file)."""
    kinds = ("template", "non_english", "junk")
    return {
        "images": report.images,
        "limit": limit,
        "with_tuxpaint": with_tuxpaint,
        "openclipart_samples": report.openclipart,
        "manifest_samples": len(report.samples),
        "rejected": len(report.rejects),
        "near_duplicates": len(report.near_duplicates),
        "near_duplicate_rule": {"dhash_max": DHASH_MAX, "colour_max": COLOUR_MAX, "aspect_max": ASPECT_MAX},
        "tuxpaint_val_test_not_compared": report.tuxpaint_skipped,
        "noise_measured_on": len(records),
        "noise_counts": {k: sum(k in f for f in flags) for k in kinds} | {"any": sum(bool(f) for f in flags)},
        "noise_shares": {k: round(v, 4) for k, v in report.noise.items()},
        "template_min_images": TEMPLATE_MIN,
        "unique_captions": len({r["caption"].strip().lower() for r in records}),
        "categories": dict(sorted(Counter(r["category"] for r in records).items())),
    }
