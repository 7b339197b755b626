"""``oneencoder data ...``: write JSONL manifests from real, locally installed data.

Each command is a thin wrapper over a ``build_*`` function that ``demo-all`` reuses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from oneencoder.data.folder_import import DEFAULT_TEMPLATE
from oneencoder.data.manifest import write_manifest
from oneencoder.data.sources.emoji import EMOJIONE_ROOT, NOTO_FONT as EMOJI_FONT
from oneencoder.data.sources.openclipart import DEFAULT_ROOT as OPENCLIPART_ROOT
from oneencoder.data.sources.soundfont import SOUNDFONT
from oneencoder.data.sources.tuxpaint import DEFAULT_ROOT, summarize, tuxpaint_records
from oneencoder.errors import OneEncoderError
from oneencoder.fileio import ensure_writable

from ._common import echo, note, user_errors

#: ``--tuxpaint-root`` of a builder that keeps Tux Paint's held-out concepts out of training.
TUXPAINT_HELD_OUT = typer.Option(DEFAULT_ROOT, "--tuxpaint-root",
                                 help="Tux Paint stamps folder (its val/test captions are never trained on).")

app = typer.Typer(help="Build dataset manifests (JSONL) from installed data.", no_args_is_help=True)


def _write(out: Path, records: list[dict], summarize_fn: Callable[[list[dict]], dict]) -> Path:
    # Paths under the manifest's folder are written relative to it, so the folder can move.
    write_manifest(out, records)
    echo(f"wrote {out}: " + ", ".join(f"{k}={v}" for k, v in summarize_fn(records).items()))
    return out


def build_tuxpaint_audio(out: Path, root: Path = DEFAULT_ROOT, augment: int = 4, all_stamps: bool = True) -> Path:
    """Sound stamps (plus, with ``all_stamps``, every other stamp) and augmented training sounds."""
    records = tuxpaint_records(root)
    base = records if all_stamps else [r for r in records if r["sound"]]
    extra, rejects = [], []
    if augment:
        from oneencoder.data.sources.audio_augment import augment_records

        extra, rejects = augment_records(base, out.parent / "augmented", augment)
        for reject in rejects:
            note(f"skipped {reject['id']}: {reject['reason']}")
    return _write(out, base + extra, lambda rows: {**summarize(base), "augmented": len(extra),
                                                   "rejected": len(rejects)})


def build_audio_with_sounds(out: Path, augment: int = 4) -> Path:
    """The combined audio data of ``demo-all``: Tux Paint's stamp sounds (``<out folder>/audio/``) and
    the named sounds (``<out folder>/sounds/``) in one manifest ``out``, Tux Paint's test rows held out
    as ``tuxpaint``."""
    from oneencoder.data.combine import combine_manifests

    stamps = build_tuxpaint_audio(out.parent / "audio" / "manifest.jsonl", augment=augment)
    sounds = build_soundfont(out.parent / "sounds" / "manifest.jsonl")
    combine_manifests([stamps, sounds], out, names=["tuxpaint", None])
    return out


def build_chemicals(out: Path, limit: int = 20000) -> Path:
    from oneencoder.data.sources.chemicals import chemicals_records, summarize as summarize_chemicals

    return _write(out, chemicals_records(limit=limit), summarize_chemicals)


def build_pybullet_rgbd(out: Path, renders: int = 60, seed: int = 0) -> Path:
    from oneencoder.data.sources.pybullet_rgbd import rgbd_records, summarize as summarize_rgbd

    return _write(out, rgbd_records(out.parent, renders_per_object=renders, seed=seed), summarize_rgbd)


def build_pybullet_video(out: Path, clips: int = 8, seed: int = 0) -> Path:
    from oneencoder.data.sources.pybullet_video import summarize as summarize_video, video_records

    return _write(out, video_records(out.parent, clips_per_combo=clips, seed=seed), summarize_video)


def build_openclipart(out: Path, root: Path = OPENCLIPART_ROOT, tuxpaint_root: Path = DEFAULT_ROOT,
                      limit: Optional[int] = None, with_tuxpaint: bool = True) -> Path:
    """Openclipart training pairs (plus, with ``with_tuxpaint``, every Tux Paint stamp); prints the summary."""
    from oneencoder.data.sources.openclipart_build import build_openclipart as run_build

    report = run_build(out, root, tuxpaint_root, limit=limit, with_tuxpaint=with_tuxpaint)
    echo(report.summary())
    return out


def build_emoji(out: Path, font: Path = EMOJI_FONT, emojione_root: Path = EMOJIONE_ROOT,
                tuxpaint_root: Path = DEFAULT_ROOT, limit: Optional[int] = None) -> Path:
    """Emoji in two art styles (Noto rendered, EmojiOne held out as test); prints the summary."""
    from oneencoder.data.sources.emoji import build_emoji as run_build

    echo(run_build(out, font, emojione_root, tuxpaint_root, limit=limit).summary())
    return out


def build_soundfont(out: Path, soundfont: Path = SOUNDFONT, tuxpaint_root: Path = DEFAULT_ROOT) -> Path:
    """General MIDI instruments, drums and effects rendered with fluidsynth; prints the summary."""
    from oneencoder.data.sources.soundfont import build_soundfont as run_build

    echo(run_build(out, soundfont, tuxpaint_root).summary())
    return out


def build_corrupt(src: Path, out: Path, fraction: float, seed: int = 0) -> Path:
    """A copy of ``src`` with captions shuffled among ``fraction`` of its training pairs; prints the summary."""
    from oneencoder.data.sources.corrupt import corrupt_manifest

    echo(corrupt_manifest(src, out, fraction, seed).summary())
    return out


@app.command("tuxpaint")
@user_errors
def tuxpaint(
    out: Path = typer.Option(Path("outputs/demo/manifest.jsonl"), "--out", "-o", help="Manifest to write."),
    root: Path = typer.Option(DEFAULT_ROOT, help="Tux Paint stamps folder."),
) -> None:
    """Image-caption(-sound) pairs from the Debian package tuxpaint-stamps-default.

    Splits by caption hash (test 20%, val 10%): no test caption is ever trained on.

    Example:  oneencoder data tuxpaint --out outputs/demo/manifest.jsonl
    """
    ensure_writable(out)  # before reading and decoding the data
    _write(out, tuxpaint_records(root), summarize)


@app.command("tuxpaint-audio")
@user_errors
def tuxpaint_audio(
    out: Path = typer.Option(Path("outputs/audio/manifest.jsonl"), "--out", "-o", help="Manifest to write."),
    root: Path = typer.Option(DEFAULT_ROOT, help="Tux Paint stamps folder."),
    augment: int = typer.Option(4, min=0, max=16,
                                help="Augmented copies of each training sound (pitch, tempo, gain, noise)."),
    all_stamps: bool = typer.Option(True, "--all-stamps/--sound-only",
                                    help="Keep stamps without a sound too, so audio->text ranks every "
                                         "test caption (as in Stage 1), not only those with a sound."),
) -> None:
    """Stamps that have a sound effect: sound + caption + image, same caption-hash split.

    Augmented sounds are written next to the manifest (<out folder>/augmented/) and
    only ever join the train split. Rerunning reuses them.

    Example:  oneencoder data tuxpaint-audio --augment 4 --out outputs/audio/manifest.jsonl
    """
    ensure_writable(out)  # before reading and decoding the data
    build_tuxpaint_audio(out, root, augment, all_stamps)


@app.command("chemicals")
@user_errors
def chemicals(
    out: Path = typer.Option(Path("outputs/chemicals/manifest.jsonl"), "--out", "-o", help="Manifest to write."),
    limit: int = typer.Option(20000, min=10, help="Rows of the PubChem table to read."),
) -> None:
    """Molecule-name pairs from the PubChem table in the PyPI package `chemicals`; scaffold-disjoint split.

    Example:  oneencoder data chemicals --out outputs/chemicals/manifest.jsonl --limit 20000
    """
    ensure_writable(out)  # before reading and decoding the data
    build_chemicals(out, limit)


@app.command("pybullet-rgbd")
@user_errors
def pybullet_rgbd(
    out: Path = typer.Option(Path("outputs/rgbd/manifest.jsonl"), "--out", "-o", help="Manifest to write."),
    renders: int = typer.Option(60, min=1, help="Renders per object."),
    seed: int = typer.Option(0, help="Seed of poses, cameras and lights."),
) -> None:
    """RGB + metric depth renders of pybullet_data meshes (duck, teddy, mug...), CPU renderer.

    Held-out poses of seen objects and wholly held-out objects are both in the test
    split, marked by `heldout` so they are scored separately. Rerunning resumes.

    Example:  oneencoder data pybullet-rgbd --out outputs/rgbd/manifest.jsonl --renders 60
    """
    ensure_writable(out)  # before reading and decoding the data
    build_pybullet_rgbd(out, renders, seed)


@app.command("pybullet-video")
@user_errors
def pybullet_video(
    out: Path = typer.Option(Path("outputs/video/manifest.jsonl"), "--out", "-o", help="Manifest to write."),
    clips: int = typer.Option(8, min=1, help="Clips per action-object combination."),
    seed: int = typer.Option(0, help="Seed of poses, pushes, cameras and lights."),
) -> None:
    """Physics clips (drops, bounces, rolls, slides, spins, topples) of pybullet objects as MP4.

    Captions come from the script ("A soccer ball bounces on the floor."). Some
    action-object combinations are held out: their clips are test only. Rerunning resumes.

    Example:  oneencoder data pybullet-video --out outputs/video/manifest.jsonl --clips 8
    """
    ensure_writable(out)  # before reading and decoding the data
    build_pybullet_video(out, clips, seed)


@app.command("openclipart")
@user_errors
def openclipart(
    out: Path = typer.Option(Path("outputs/openclipart/manifest.jsonl"), "--out", "-o",
                             help="Manifest to write; side files <out stem>.rejects.jsonl, .near_duplicates.jsonl, "
                                  ".stats.json and .signatures.jsonl go beside it."),
    root: Path = typer.Option(OPENCLIPART_ROOT, help="Openclipart folder holding png/ and svg/."),
    tuxpaint_root: Path = typer.Option(DEFAULT_ROOT, "--tuxpaint-root", help="Tux Paint stamps folder."),
    limit: Optional[int] = typer.Option(None, min=1, help="Read only the first N openclipart images (sorted paths)."),
    with_tuxpaint: bool = typer.Option(True, "--with-tuxpaint/--openclipart-only",
                                       help="Also write every Tux Paint stamp with its own split, so training "
                                            "validates and tests on Tux Paint as the demo does."),
) -> None:
    """Noisy image-caption pairs from the Debian packages openclipart-png and openclipart-svg.

    Captions are "<title>. <keywords>." from each SVG's metadata; every openclipart pair
    is a training pair. Images that are near-duplicates of a Tux Paint validation or test
    image (perceptual hash) are left out and listed in <out stem>.near_duplicates.jsonl.
    Bad files go to <out stem>.rejects.jsonl. Rerunning reuses the image hashes.

    Example:  oneencoder data openclipart --out outputs/openclipart/manifest.jsonl
    """
    ensure_writable(out)  # before reading and decoding the data
    build_openclipart(out, root, tuxpaint_root, limit, with_tuxpaint)


@app.command("emoji")
@user_errors
def emoji(
    out: Path = typer.Option(Path("outputs/emoji/manifest.jsonl"), "--out", "-o",
                             help="Manifest to write; Noto images go to <out folder>/images/, side files "
                                  "<out stem>.rejects.jsonl, .tuxpaint_matches.jsonl and .stats.json beside it."),
    font: Path = typer.Option(EMOJI_FONT, help="Noto Color Emoji font (Debian fonts-noto-color-emoji)."),
    emojione_root: Path = typer.Option(EMOJIONE_ROOT, "--emojione-root",
                                       help="Folder of EmojiOne <codepoints>.png files (Debian ruby-gemojione)."),
    tuxpaint_root: Path = TUXPAINT_HELD_OUT,
    limit: Optional[int] = typer.Option(None, min=1, help="Use only the first N emoji (sorted by code point)."),
) -> None:
    """Emoji image-caption pairs in two art styles; one style is held out as test data.

    Noto Color Emoji images are drawn with Pillow (train/val/test by caption hash);
    EmojiOne images are read in place and are test only, for the test emoji, marked
    `heldout: "style"` (Noto test rows: `heldout: "concept"`). Captions are the emoji's
    CLDR name as a sentence ("Red apple."); its aliases are kept as `keywords`.
    Skin-tone variants are left out. Rerunning reuses the drawn images.

    Example:  oneencoder data emoji --out outputs/emoji/manifest.jsonl
    """
    ensure_writable(out)  # before reading and drawing the data
    build_emoji(out, font, emojione_root, tuxpaint_root, limit)


@app.command("soundfont")
@user_errors
def soundfont(
    out: Path = typer.Option(Path("outputs/sounds/manifest.jsonl"), "--out", "-o",
                             help="Manifest to write; clips go to <out folder>/clips/, rejects to "
                                  "<out stem>.rejects.jsonl."),
    soundfont_file: Path = typer.Option(SOUNDFONT, "--soundfont",
                                        help="General MIDI SoundFont (Debian fluid-soundfont-gm)."),
    tuxpaint_root: Path = TUXPAINT_HELD_OUT,
) -> None:
    """Named sounds: General MIDI instruments, drums and effects, rendered with fluidsynth.

    Captions are the instrument's name as a sentence ("A violin.", "Applause.").
    Every sound is in every split; the rendering condition is held out: instruments
    test on an unseen pitch and velocity (`heldout: "unseen-pitch"`), drums on an
    unseen velocity (`heldout: "unseen-velocity"`). Rerunning reuses the clips.

    Example:  oneencoder data soundfont --out outputs/sounds/manifest.jsonl
    """
    ensure_writable(out)  # before rendering
    build_soundfont(out, soundfont_file, tuxpaint_root)


@app.command("combine")
@user_errors
def combine(
    inputs: List[str] = typer.Argument(..., help="Manifests to combine, each as PATH or PATH=NAME: the source's "
                                                 "test rows without a heldout value get NAME."),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest to write."),
) -> None:
    """One manifest from several sources, each source's test rows scored apart.

    A test row with no `heldout` value gets its source's NAME, so eval reports every
    source on its own gallery (as a test subset) besides the whole test split.

    Example:  oneencoder data combine outputs/audio/manifest.jsonl=tuxpaint \\
                  outputs/sounds/manifest.jsonl --out outputs/audio-sounds/manifest.jsonl
    """
    from oneencoder.data.combine import combine_manifests

    ensure_writable(out)
    paths, names = [], []
    for item in inputs:
        path, sep, name = item.rpartition("=")
        if not sep or Path(item).exists():
            path, name = item, None
        paths.append(Path(path))
        names.append(name or None)
    counts = combine_manifests(paths, out, names)
    echo(f"wrote {out}: " + "; ".join(f"{p} " + ", ".join(f"{k} {v}" for k, v in c.items())
                                       for p, c in counts.items()))


@app.command("corrupt")
@user_errors
def corrupt(
    src: Path = typer.Argument(..., metavar="IN", help="Manifest to corrupt (not modified)."),
    fraction: float = typer.Option(..., "--fraction", "-p", min=0.0, max=1.0,
                                   help="Share of the training pairs whose captions are shuffled among themselves."),
    seed: int = typer.Option(0, help="Seed of which pairs are chosen and how their captions move."),
    out: Path = typer.Option(..., "--out", "-o", help="Corrupted manifest to write."),
) -> None:
    """Shuffle the captions among a fraction of a manifest's training pairs (none keeps its own).

    Corrupted rows get "corrupted": true, "true_caption" and "clean_id" (training never
    reads them), a group from their new caption and a new id <id>#corrupt-<hash>, so
    the id-keyed feature cache never serves them their clean caption's features.
    Validation and test rows are left as they are.

    Example:  oneencoder data corrupt manifest.jsonl --fraction 0.2 --seed 0 --out corrupt20.jsonl
    """
    ensure_writable(out)  # before reading and decoding the data
    build_corrupt(src, out, fraction, seed)


def _import_folder(folder: Path, out: Path, maps: Optional[List[str]], split_col: Optional[str],
                   group_col: Optional[str], id_col: Optional[str], fmt: Optional[str], val: Optional[float],
                   test: Optional[float], template: str, modalities: Optional[List[str]]) -> Any:
    """``data import FOLDER``: the table-only options are refused by name."""
    from oneencoder.data.folder_import import import_folder

    given = [name for name, value in (("--map", maps), ("--split-col", split_col), ("--group-col", group_col),
                                      ("--id-col", id_col), ("--format", fmt)) if value]
    if given:
        raise OneEncoderError(f"{folder} is a folder: {', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} "
                              "to a table (a folder's modalities come from file extensions, ids from file names)")
    return import_folder(folder, out, template=template, modalities=modalities, val=val, test=test)


@app.command("import")
@user_errors
def import_table(
    file: Path = typer.Argument(..., metavar="TABLE|FOLDER",
                                help="CSV, TSV or JSONL table, one sample per row (CSV/TSV: header line); or a "
                                     "folder in the imagefolder/audiofolder layout (class subfolders, "
                                     "metadata.csv/.jsonl, train/ val/ test/)."),
    maps: Optional[List[str]] = typer.Option(None, "--map", "-m", metavar="MODALITY=COLUMN",
                                             help="Table: put COLUMN in MODALITY's manifest field; repeat per "
                                                  "modality."),
    out: Path = typer.Option(Path("manifest.jsonl"), "--out", "-o",
                             help="Manifest to write; rejected rows go to <out stem>.rejects.jsonl beside it."),
    split_col: Optional[str] = typer.Option(None, "--split-col", help="Column holding train/val/test."),
    val: Optional[float] = typer.Option(None, "--val", min=0.0, max=1.0,
                                        help="Share of groups in val (stable hash of the group; with --test)."),
    test: Optional[float] = typer.Option(None, "--test", min=0.0, max=1.0,
                                         help="Share of groups in test (stable hash of the group; with --val)."),
    group_col: Optional[str] = typer.Option(None, "--group-col",
                                            help="Column holding group ids (default: the caption's group)."),
    id_col: Optional[str] = typer.Option(None, "--id-col",
                                         help="Column holding sample ids (default: the first file's path "
                                              "without extension)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="csv, tsv or jsonl (default: from the file name)."),
    template: str = typer.Option(DEFAULT_TEMPLATE, "--template",
                                 help="Folder: caption of a labelled file without text; {} (or {label}) stands "
                                      "for the class folder's name in words (hot_dog -> hot dog)."),
    modality: Optional[List[str]] = typer.Option(None, "--modality",
                                                 help="Folder: import only this modality's files (repeatable; "
                                                      "default: every modality that recognises its extension)."),
) -> None:
    """Your own data: a CSV, TSV or JSONL table, or a folder as it is, as a checked manifest.

    Table: relative paths are read relative to the table's folder. Without --split-col or
    --val/--test, the split is the caption-hash split (test 20%, val 10%), so samples that
    share a caption share a split.

    Folder (Hugging Face imagefolder/audiofolder): every file a modality recognises is a
    sample; class subfolders become `label` (and the caption --template when there is no
    text); metadata.csv/.jsonl rows (file_name, text, ...) add fields; train/, validation/
    or val/, test/ subfolders are the splits.

    Every file is opened and decoded by its modality; bad rows or files go to the rejects
    file and the import goes on.

    Example:  oneencoder data import pairs.csv --map image=path --map text=caption --out manifest.jsonl

    Example:  oneencoder data import my_photos/ --out my_photos.jsonl
    """
    ensure_writable(out)  # before reading and decoding the data
    if file.is_dir():
        report = _import_folder(file, out, maps, split_col, group_col, id_col, fmt, val, test, template, modality)
    else:
        from oneencoder.data.table_import import import_table as run_import

        if modality or template != DEFAULT_TEMPLATE:
            raise OneEncoderError(f"{file}: --modality and --template apply to a folder; a table names its "
                                  "modalities with --map")
        report = run_import(file, out, maps or [], fmt=fmt, split_col=split_col, val=val, test=test,
                            group_col=group_col, id_col=id_col)
    for line in report.notes:
        note(f"note: {line}")
    if report.straddling:
        note(f"note: {report.straddling} group(s) lie in more than one split (column {split_col!r}): "
             "some test samples share a group, e.g. a caption, with training ones")
    echo(report.summary())
