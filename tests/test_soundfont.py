"""Named sounds rendered from the real FluidR3 SoundFont with the real fluidsynth."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from oneencoder.data.manifest import read_manifest
from oneencoder.data.sources import soundfont as sf
from oneencoder.errors import OneEncoderError

pytestmark = pytest.mark.skipif(not sf.SOUNDFONT.is_file() or sf.shutil.which("fluidsynth") is None,
                                reason="needs Debian fluidsynth + fluid-soundfont-gm (make setup)")


def test_midi_file_is_well_formed():
    batch = [sf.Take("instrument", 40, "A violin.", "train", 60, 100), sf.Take("drum", 38, "A snare drum.", "val", 38, 64)]
    data = sf.midi_file(batch)
    assert data[:4] == b"MThd" and data[14:18] == b"MTrk"
    assert int.from_bytes(data[18:22], "big") == len(data) - 22  # track length matches the events
    assert bytes([0xC0, 40]) in data  # program change on channel 0
    assert bytes([0x99, 38, 64]) in data  # the drum plays on channel 10
    assert data.endswith(b"\xff\x2f\x00")
    assert sf._vlq(0) == b"\x00" and sf._vlq(0x80) == b"\x81\x00" and sf._vlq(2400) == b"\x92\x60"


def test_splits_hold_out_a_rendering_condition_and_tuxpaint_concepts():
    wanted, held = sf.planned_takes()
    assert "A violin." in held  # a Tux Paint test stamp: never trained on here either
    by_split = Counter(t.split for t in wanted)
    assert by_split["train"] > by_split["val"] > 0 and by_split["test"] > 0
    assert not any(t.split == "train" and t.caption in held for t in wanted)
    assert any(t.split == "test" and t.caption == "A violin." for t in wanted)
    # every test condition is unseen in training, for that very sound
    train = {(t.kind, t.number, t.note, t.velocity) for t in wanted if t.split == "train"}
    assert not any((t.kind, t.number, t.note, t.velocity) in train for t in wanted if t.split != "train")
    assert {t.note for t in wanted if t.kind == "instrument" and t.split == "test"} == {66}


def test_render_writes_audible_clips_and_rejects_silence(tmp_path: Path):
    soundfile = pytest.importorskip("soundfile")
    renderer = sf.Renderer(tmp_path)
    piano, drum = sf.Take("instrument", 0, "A piano.", "test", 66, 88), sf.Take("drum", 56, "A cowbell.", "val", 56, 64)
    contrabass_high = sf.Take("instrument", 43, "A double bass.", "train", 72, 112)  # outside its samples
    silent = renderer.render([piano, drum, contrabass_high])
    assert [t for t, _ in silent] == [contrabass_high]
    for take in (piano, drum):
        audio, rate = soundfile.read(renderer.path(take))
        assert rate == sf.SAMPLE_RATE and audio.shape == (round(sf.CLIP_SECONDS * rate),)
        assert np.abs(audio[: rate // 2]).max() > 1e-3  # the note starts at the clip's start
    before = renderer.path(piano).stat().st_mtime_ns
    assert renderer.render([piano]) == [] and renderer.path(piano).stat().st_mtime_ns == before  # reused


def test_build_writes_manifest_and_rejects(tmp_path: Path):
    # the piano, and the double bass whose contrabass program has no samples above its range
    report = sf.build_soundfont(tmp_path / "m.jsonl", only={"A piano.", "A double bass."}, progress=False)
    rows = read_manifest(tmp_path / "m.jsonl")
    assert len(rows) == len(report.samples) and {r["caption"] for r in rows} == {"A piano.", "A double bass."}
    assert {r["heldout"] for r in rows if r["split"] == "test"} == {"unseen-pitch"}
    assert all(Path(r["sound"]).is_file() for r in rows)
    assert report.rejects and all("silence" in r["reason"] for r in report.rejects)
    assert "rejected" in report.summary() and report.rejects_path.is_file()


def test_missing_soundfont_or_unknown_caption_is_one_clear_error(tmp_path: Path):
    with pytest.raises(OneEncoderError, match="fluid-soundfont-gm"):
        sf.Renderer(tmp_path, tmp_path / "absent.sf2")
    with pytest.raises(OneEncoderError, match="A kazoo"):
        sf.build_soundfont(tmp_path / "m.jsonl", only={"A kazoo."}, progress=False)
