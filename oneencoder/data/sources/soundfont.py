"""Named sounds: the General MIDI instruments, drums and effects of a SoundFont, rendered with fluidsynth.

* **Sounds**: Debian ``fluid-soundfont-gm`` (FluidR3_GM.sf2, MIT, by Frank Wen), rendered by
  Debian ``fluidsynth`` from one-note MIDI files this module writes byte by byte. Clips go to
  ``<out folder>/clips/<settings hash>/``; the hash covers the SoundFont file, fluidsynth's
  version and the rendering recipe, so a rerun reuses exactly the clips made the same way.
* **Captions**: the General MIDI name as a short sentence (:data:`PROGRAMS`, :data:`DRUMS`):
  "A violin.", "Applause.", "A snare drum.". Variants a listener cannot name apart share one
  caption (grand and bright piano are "A piano."), so they form one caption group. The 24
  synth leads, pads and effects (programs 81-104) are left out: their names ("Pad 3
  (polysynth)") do not describe a sound.
* **Splits by rendering condition**: every named sound is in every split; what is held out is
  how it is played. Pitched instruments train on notes 48, 60, 72 at velocities 64 and 112,
  validate on note 54 and test on note 66, both at velocity 88 (an unseen pitch and
  velocity). Drums keep their key and vary velocity: train 48, 80, 127; val 64; test 100.
  Test rows carry ``heldout: "unseen-pitch"`` or ``"unseen-velocity"``.
* A caption that Tux Paint holds out (a validation or test stamp caption such as "A violin.")
  keeps only its validation and test rows, so a combined audio stage never trains on a
  concept Tux Paint evaluates; these are counted in the summary.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection

import numpy as np

from ...deps import require
from ...errors import OneEncoderError
from ...fileio import atomic_path, write_jsonl_atomic
from ...progress import progress_bar
from ..manifest import SPLITS, caption_group, write_manifest
from .emoji import caption_core
from .tuxpaint import DEFAULT_ROOT as TUXPAINT_ROOT, tuxpaint_records

SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
INSTALL_HINT = ("run `make setup`, or `apt-get update && apt-get install -y fluidsynth fluid-soundfont-gm`")
ID_PREFIX = "gm/"
SOURCE = "soundfont"
LICENSE = "MIT"
CREDIT = "FluidR3_GM SoundFont by Frank Wen (Debian fluid-soundfont-gm)"
SAMPLE_RATE = 22050
NOTE_SECONDS, CLIP_SECONDS = 1.5, 2.5  # note held for 1.5 s, then 1 s of release in the clip
RENDER_VERSION = 1
DRUM_CHANNEL = 9

#: (split, note, velocity) of a pitched instrument; the test condition is the held-out one.
PITCHED = [("train", n, v) for n in (48, 60, 72) for v in (64, 112)] + [("val", 54, 88), ("test", 66, 88)]
#: (split, velocity) of a drum, whose key is its sound.
STRUCK = [("train", v) for v in (48, 80, 127)] + [("val", 64), ("test", 100)]

_PIANO, _EPIANO, _AGUIT, _EGUIT, _DGUIT = "A piano.", "An electric piano.", "An acoustic guitar.", \
    "An electric guitar.", "A distorted electric guitar."
_EBASS, _SBASS, _STRINGS, _SYNSTR, _BRASS = "An electric bass guitar.", "A synth bass.", "A string orchestra.", \
    "Synth strings.", "Synth brass."
#: General MIDI program (0-based) -> caption. Programs 80-103 (synth leads, pads, effects) are absent.
PROGRAMS: dict[int, str] = {
    0: _PIANO, 1: _PIANO, 2: _EPIANO, 3: "A honky-tonk piano.", 4: _EPIANO, 5: _EPIANO, 6: "A harpsichord.",
    7: "A clavinet.", 8: "A celesta.", 9: "A glockenspiel.", 10: "A music box.", 11: "A vibraphone.",
    12: "A marimba.", 13: "A xylophone.", 14: "Tubular bells.", 15: "A dulcimer.", 16: "An electric organ.",
    17: "An electric organ.", 18: "A rock organ.", 19: "A church organ.", 20: "A reed organ.", 21: "An accordion.",
    22: "A harmonica.", 23: "An accordion.", 24: _AGUIT, 25: _AGUIT, 26: _EGUIT, 27: _EGUIT, 28: _EGUIT,
    29: _DGUIT, 30: _DGUIT, 31: "Guitar harmonics.", 32: "A double bass.", 33: _EBASS, 34: _EBASS,
    35: "A fretless bass.", 36: "A slap bass.", 37: "A slap bass.", 38: _SBASS, 39: _SBASS, 40: "A violin.",
    41: "A viola.", 42: "A cello.", 43: "A double bass.", 44: "Tremolo strings.", 45: "Pizzicato strings.",
    46: "A harp.", 47: "Timpani.", 48: _STRINGS, 49: _STRINGS, 50: _SYNSTR, 51: _SYNSTR, 52: "A choir singing.",
    53: "A voice singing oo.", 54: "A synth voice.", 55: "An orchestra hit.", 56: "A trumpet.", 57: "A trombone.",
    58: "A tuba.", 59: "A muted trumpet.", 60: "A French horn.", 61: "A brass section.", 62: _BRASS, 63: _BRASS,
    64: "A soprano saxophone.", 65: "An alto saxophone.", 66: "A tenor saxophone.", 67: "A baritone saxophone.",
    68: "An oboe.", 69: "An English horn.", 70: "A bassoon.", 71: "A clarinet.", 72: "A piccolo.", 73: "A flute.",
    74: "A recorder.", 75: "A pan flute.", 76: "Blowing across a bottle.", 77: "A shakuhachi.", 78: "Whistling.",
    79: "An ocarina.", 104: "A sitar.", 105: "A banjo.", 106: "A shamisen.", 107: "A koto.", 108: "A kalimba.",
    109: "A bagpipe.", 110: "A fiddle.", 111: "A shehnai.", 112: "A tinkling bell.", 113: "An agogo bell.",
    114: "A steel drum.", 115: "A wood block.", 116: "A taiko drum.", 117: "A tom drum.", 118: "A synth drum.",
    119: "A reversed cymbal.", 120: "Guitar fret noise.", 121: "Breathing.", 122: "Waves on a seashore.",
    123: "A bird tweeting.", 124: "A telephone ringing.", 125: "A helicopter.", 126: "Applause.", 127: "A gunshot.",
}
#: Programs 120-127 are recorded sound effects, not instruments.
EFFECTS = range(120, 128)
#: General MIDI percussion key -> caption.
DRUMS: dict[int, str] = {
    35: "A bass drum.", 36: "A bass drum.", 37: "A drum rim click.", 38: "A snare drum.", 39: "A hand clap.",
    40: "A snare drum.", 41: "A tom drum.", 42: "A closed hi-hat.", 43: "A tom drum.", 44: "A closed hi-hat.",
    45: "A tom drum.", 46: "An open hi-hat.", 47: "A tom drum.", 48: "A tom drum.", 49: "A crash cymbal.",
    50: "A tom drum.", 51: "A ride cymbal.", 52: "A Chinese cymbal.", 53: "A ride cymbal bell.",
    54: "A tambourine.", 55: "A splash cymbal.", 56: "A cowbell.", 57: "A crash cymbal.", 58: "A vibraslap.",
    59: "A ride cymbal.", 60: "A bongo drum.", 61: "A bongo drum.", 62: "A conga drum.", 63: "A conga drum.",
    64: "A conga drum.", 65: "A timbale.", 66: "A timbale.", 67: "An agogo bell.", 68: "An agogo bell.",
    69: "A cabasa shaker.", 70: "Maracas.", 71: "A short whistle blow.", 72: "A long whistle blow.",
    73: "A guiro scrape.", 74: "A guiro scrape.", 75: "Claves.", 76: "A wood block.", 77: "A wood block.",
    78: "A cuica.", 79: "A cuica.", 80: "A triangle.", 81: "A triangle.",
}


@dataclass(frozen=True)
class Take:
    """One clip to render: a program (or a drum key on the drum channel) played one way."""

    kind: str  # "instrument", "effect" or "drum"
    number: int  # GM program, or drum key
    caption: str
    split: str
    note: int
    velocity: int

    @property
    def channel(self) -> int:
        return DRUM_CHANNEL if self.kind == "drum" else 0

    @property
    def stem(self) -> str:
        return f"{self.kind}-{self.number:03d}-n{self.note}-v{self.velocity}"


def takes() -> list[Take]:
    """Every clip of the data set, in a fixed order."""
    out = []
    for program, caption in sorted(PROGRAMS.items()):
        kind = "effect" if program in EFFECTS else "instrument"
        out += [Take(kind, program, caption, split, note, velocity) for split, note, velocity in PITCHED]
    for key, caption in sorted(DRUMS.items()):
        out += [Take("drum", key, caption, split, key, velocity) for split, velocity in STRUCK]
    return out


def _vlq(value: int) -> bytes:
    """MIDI variable-length quantity."""
    out = [value & 0x7F]
    while value > 0x7F:
        value >>= 7
        out.append(0x80 | (value & 0x7F))
    return bytes(reversed(out))


def midi_file(batch: list[Take], ticks_per_second: int = 960) -> bytes:
    """A type-0 MIDI file playing each take in turn, one every ``CLIP_SECONDS`` (tempo 120: 960 ticks/s)."""
    events, clock = bytearray(), 0
    for i, take in enumerate(batch):
        start, stop = round(i * CLIP_SECONDS * ticks_per_second), round((i * CLIP_SECONDS + NOTE_SECONDS) * ticks_per_second)
        status = take.channel
        if take.kind != "drum":
            events += _vlq(start - clock) + bytes([0xC0 | status, take.number])
            clock = start
        events += _vlq(start - clock) + bytes([0x90 | status, take.note, take.velocity])
        events += _vlq(stop - start) + bytes([0x80 | status, take.note, 0])
        clock = stop
    end = round(len(batch) * CLIP_SECONDS * ticks_per_second)
    events += _vlq(end - clock) + b"\xff\x2f\x00"
    header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, ticks_per_second // 2)
    return header + b"MTrk" + struct.pack(">I", len(events)) + bytes(events)


def fluidsynth_version(binary: str) -> str:
    result = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return (result.stdout.splitlines() or ["unknown"])[0].strip()


def check_installed(soundfont: Path) -> str:
    """The fluidsynth binary; one clear error naming the missing package otherwise."""
    binary = shutil.which("fluidsynth")
    if binary is None:
        raise OneEncoderError(f"fluidsynth is not installed; {INSTALL_HINT}")
    if not soundfont.is_file():
        raise OneEncoderError(f"SoundFont not found at {soundfont}; {INSTALL_HINT}")
    return binary


class Renderer:
    """Renders takes in batches (one fluidsynth run each) into one FLAC clip per take."""

    def __init__(self, out_dir: Path, soundfont: Path = SOUNDFONT) -> None:
        self.binary = check_installed(soundfont)
        self.soundfont = soundfont
        stat = soundfont.stat()
        self.settings = {"soundfont": str(soundfont), "size": stat.st_size, "mtime": int(stat.st_mtime),
                         "fluidsynth": fluidsynth_version(self.binary), "rate": SAMPLE_RATE,
                         "note_seconds": NOTE_SECONDS, "clip_seconds": CLIP_SECONDS, "version": RENDER_VERSION}
        digest = hashlib.sha256(repr(sorted(self.settings.items())).encode()).hexdigest()[:12]
        self.folder = Path(out_dir) / f"fluidr3-{digest}"

    def path(self, take: Take) -> Path:
        return self.folder / f"{take.stem}.flac"

    def render(self, batch: list[Take]) -> list[tuple[Take, str]]:
        """Writes every missing clip of ``batch``; returns (take, reason) for clips that came out silent."""
        soundfile = require("soundfile")
        todo = [t for t in batch if not self.path(t).exists()]
        if not todo:
            return []
        self.folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="oneencoder-gm-") as tmp:
            mid, wav = Path(tmp) / "takes.mid", Path(tmp) / "takes.wav"
            mid.write_bytes(midi_file(todo))
            cmd = [self.binary, "-ni", "-q", "-R", "0", "-C", "0", "-r", str(SAMPLE_RATE), "-F", str(wav),
                   str(self.soundfont), str(mid)]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if result.returncode != 0 or not wav.exists():
                raise OneEncoderError(f"fluidsynth failed on {self.soundfont}: {result.stderr.strip()[-300:]}")
            audio, rate = soundfile.read(wav, dtype="float32", always_2d=True)
        mono, step, silent = audio.mean(axis=1), round(CLIP_SECONDS * rate), []
        for i, take in enumerate(todo):
            clip = mono[i * step:(i + 1) * step]
            if clip.size == 0 or float(np.abs(clip).max()) < 1e-4:
                silent.append((take, "fluidsynth rendered silence for this program and note"))
                continue
            with atomic_path(self.path(take)) as tmp_path:
                soundfile.write(tmp_path, clip, rate, format="FLAC")
        return silent


@dataclass
class SoundfontReport:
    manifest: Path
    render_folder: Path
    samples: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    tuxpaint_held: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rejects_path(self) -> Path:
        return self.manifest.with_name(self.manifest.stem + ".rejects.jsonl")

    def summary(self) -> str:
        splits = Counter(r["split"] for r in self.samples)
        kinds = Counter(r["category"] for r in self.samples)
        line = (f"wrote {self.manifest}: {len(self.samples)} clips of {len({r['group'] for r in self.samples})} "
                f"named sounds (" + ", ".join(f"{s} {splits.get(s, 0)}" for s in SPLITS) + "; "
                + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + f"), clips in {self.render_folder}")
        if self.tuxpaint_held:
            line += f"; {len(self.tuxpaint_held)} captions Tux Paint holds out kept out of train"
        return line + f", {len(self.rejects)} rejected" + (f" (see {self.rejects_path})" if self.rejects else "")


def _record(take: Take, path: Path) -> dict:
    heldout = None
    if take.split == "test":
        heldout = "unseen-velocity" if take.kind == "drum" else "unseen-pitch"
    return {"id": f"{ID_PREFIX}{take.stem}", "sound": str(path), "caption": take.caption,
            "group": caption_group(take.caption), "category": take.kind, "split": take.split, "heldout": heldout,
            "note": take.note, "velocity": take.velocity, "source": SOURCE, "license": LICENSE}


def planned_takes(tuxpaint_root: str | Path = TUXPAINT_ROOT) -> tuple[list[Take], list[str]]:
    """Every take but the training takes of captions Tux Paint holds out; and those captions."""
    held = {caption_core(r["caption"]) for r in tuxpaint_records(tuxpaint_root)
            if r["split"] != "train" and r["caption"]}
    held_captions = sorted({t.caption for t in takes() if caption_core(t.caption) in held})
    return [t for t in takes() if not (t.split == "train" and t.caption in held_captions)], held_captions


def build_soundfont(out: str | Path, soundfont: str | Path = SOUNDFONT, tuxpaint_root: str | Path = TUXPAINT_ROOT,
                    only: Collection[str] | None = None, batch: int = 40, progress: bool = True) -> SoundfontReport:
    """Render the named sounds and write their manifest and rejects file (module docstring).

    Args:
        only: Keep only these captions ("A piano."), for quick runs.
    """
    start, out = time.perf_counter(), Path(out)
    renderer = Renderer(out.parent / "clips", Path(soundfont))
    report = SoundfontReport(manifest=out, render_folder=renderer.folder)
    wanted, report.tuxpaint_held = planned_takes(tuxpaint_root)
    if only is not None:
        unknown = set(only) - {t.caption for t in takes()}
        if unknown:
            raise OneEncoderError(f"no named sound has the caption {sorted(unknown)[0]!r}")
        wanted = [t for t in wanted if t.caption in only]
    silent: list[tuple[Take, str]] = []
    chunks = [wanted[i:i + batch] for i in range(0, len(wanted), batch)]
    for chunk in progress_bar(chunks, desc="render", unit="batch", enabled=progress):
        silent += renderer.render(chunk)
    bad = {t for t, _ in silent}
    report.rejects = [{"id": f"{ID_PREFIX}{t.stem}", "caption": t.caption, "file": str(renderer.soundfont),
                       "reason": why} for t, why in silent]
    report.samples = [_record(t, renderer.path(t)) for t in wanted if t not in bad]
    write_jsonl_atomic(report.rejects_path, report.rejects)
    if not report.samples:
        raise OneEncoderError(f"no named sound was rendered; see {report.rejects_path}")
    write_manifest(out, report.samples)
    report.seconds = round(time.perf_counter() - start, 2)
    return report
