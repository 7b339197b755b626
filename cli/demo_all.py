"""``oneencoder demo-all``: one model directory with six modalities, built progressively.

Stage 1 aligns image and text on Tux Paint stamps (the stage `make demo` trains); then audio
(stamp sounds and named General MIDI sounds), molecules
(PubChem names), depth (pybullet RGB-D renders) and video (pybullet physics clips) are
added one at a time, each training only its own adapter. Every step resumes.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from oneencoder.evaluation.summary import format_results, write_results
from oneencoder.training.add_modality import add_modality

from ._common import echo, note, quiet_libraries, user_errors
from .data import build_audio_with_sounds, build_chemicals, build_pybullet_rgbd, build_pybullet_video
from .demo import DEMO_STAGE, run_stage1


#: Stage 1 of demo-all: the one `make demo` trains (the locked mpnet text space).
DEMO_ALL_STAGE1 = DEMO_STAGE


@user_errors
def demo_all(
    out: Path = typer.Option(Path("outputs/demo-all"), "--out", "-o", help="Folder for data, caches and the model."),
    molecules: int = typer.Option(20000, min=100, help="Rows of the PubChem table for the molecule stage."),
    renders: int = typer.Option(60, min=2, help="RGB-D renders per object for the depth stage."),
    clips: int = typer.Option(8, min=2, help="Clips per action-object combination for the video stage."),
    workers: int = typer.Option(2, min=0, help="DataLoader workers for decoding."),
) -> None:
    """Image+text, then audio, molecule, depth and video: one table of held-out retrieval.

    Writes <out>/model (the six-modality model), <out>/results.json and <out>/results.png.

    Example:  oneencoder demo-all --out outputs/demo-all
    """
    quiet_libraries()
    start, timings = time.time(), {}
    model = out / "model"
    tic = time.time()
    if (model / "runs" / "image_text" / "test.json").exists():  # retraining it would orphan later adapters
        note(f"== stage 1: image + text already trained in {model}")
    else:
        note("== stage 1: image + text (Tux Paint stamps)")
        run_stage1(out / "tuxpaint", stage=DEMO_ALL_STAGE1, step="  [{i}/3]", model_dir=model, workers=workers)
    timings["image+text"] = time.time() - tic
    # (modality, anchor, manifest builder, cache root). The audio manifest holds the same stamp
    # ids as Stage 1's, so it shares that cache: images and captions are not encoded twice. The
    # named sounds lift held-out Tux Paint audio->text from 0.063 to 0.254 (docs/audio.md).
    steps = [
        ("audio", "text", lambda: build_audio_with_sounds(out / "audio-sounds.jsonl"), out / "tuxpaint" / "cache"),
        ("molecule", "text", lambda: build_chemicals(out / "chemicals" / "manifest.jsonl", molecules), None),
        ("depth", "image", lambda: build_pybullet_rgbd(out / "rgbd" / "manifest.jsonl", renders), None),
        ("video", "text", lambda: build_pybullet_video(out / "video" / "manifest.jsonl", clips), None),
    ]
    for modality, anchor, build, cache_dir in steps:
        tic = time.time()
        note(f"== add {modality} (aligned to {anchor})")
        manifest = build()
        summary = add_modality(modality, model, manifest, anchor=anchor, cache_dir=cache_dir, workers=workers,
                               restart_if_changed=True, log=note)
        note(f"  best epoch {summary['best_epoch']} of {summary['epochs_run']} ({summary['train_seconds']} s)")
        timings[modality] = time.time() - tic
    rows, json_path, png_path = write_results(model, out)
    echo("\nheld-out retrieval, every stage (chance level in brackets):")
    echo(format_results(rows))
    echo("\ntime per stage: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()))
    echo(f"done in {(time.time() - start) / 60:.1f} min. Wrote {json_path} and {png_path}. Try:\n"
         f"  .venv/bin/oneencoder info {model}")
