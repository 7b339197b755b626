"""Waveform augmentation for small audio training sets (e.g. the 99 Tux Paint training sounds).

Each training clip gets ``copies`` variants written as 44.1 kHz WAV files: a pitch shift
of up to +-2 semitones, a time stretch of 0.85-1.15x, a gain of -6..+3 dB and, half of the
time, pink-ish noise at 20-35 dB SNR. Variants keep the original's caption, group and
image and are always in the ``train`` split, so no evaluation sample is ever augmented.
Files are written atomically and an existing variant is reused, so reruns are cheap.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from ...progress import progress_bar

from ...deps import require
from ...errors import SampleError
from ...fileio import atomic_path

SAMPLE_RATE = 44100
AUGMENT_VERSION = "v1"  # bump when the recipe changes: variant file names change with it


def _rng(record_id: str, copy: int, seed: int) -> np.random.Generator:
    digest = hashlib.sha1(f"{seed}|{record_id}|{copy}|{AUGMENT_VERSION}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def augment_waveform(wave: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One random variant of a mono float waveform (same sample rate)."""
    librosa = require("librosa")
    out = librosa.effects.pitch_shift(wave, sr=sr, n_steps=float(rng.uniform(-2.0, 2.0)))
    out = librosa.effects.time_stretch(out, rate=float(rng.uniform(0.85, 1.15)))
    out = out * 10 ** (float(rng.uniform(-6.0, 3.0)) / 20)
    if rng.random() < 0.5:  # pink-ish noise: white noise through a one-pole low-pass
        noise = rng.standard_normal(out.shape[0]).astype(np.float32)
        noise = np.cumsum(noise) * 0.02
        noise -= np.convolve(noise, np.ones(64) / 64, mode="same")
        snr_db = rng.uniform(20.0, 35.0)
        power = float(np.mean(out**2)) or 1e-8
        noise *= np.sqrt(power / (float(np.mean(noise**2)) or 1e-8) / 10 ** (snr_db / 10))
        out = out + noise
    peak = float(np.abs(out).max()) or 1.0
    return (out / max(peak, 1.0)).astype(np.float32)  # never clip


def _write_wav_atomic(path: Path, wave: np.ndarray, sr: int) -> None:
    soundfile = require("soundfile")
    with atomic_path(path) as tmp:
        soundfile.write(tmp, wave, sr, subtype="PCM_16", format="WAV")


def augment_records(records: list[dict], out_dir: str | Path, copies: int, seed: int = 0,
                    field: str = "sound", drop: tuple[str, ...] = ("image",),
                    progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Augmented copies of every training record that has ``field``.

    ``drop`` lists fields set to None in the copies (inputs that do not change).

    Returns:
        The new records (ids ``<id>#aug<k>``, absolute ``field`` paths) and rejects
        (``{"id", "reason"}``) for clips that could not be decoded; those are left out, the rest go on.
    """
    if copies <= 0:
        return [], []
    from oneencoder.modality import create_modality

    audio = create_modality("audio")
    out_dir = Path(os.path.abspath(out_dir))  # absolute: records work from any folder
    todo = [r for r in records if r.get("split") == "train" and r.get(field)]
    new, rejects = [], []
    for record in progress_bar(todo, desc="augment audio", unit="clip", enabled=progress):
        paths = [out_dir / f"{record['id']}.aug{k}-{AUGMENT_VERSION}.wav" for k in range(1, copies + 1)]
        missing = [k for k, p in enumerate(paths, 1) if not p.exists()]
        if missing:
            try:
                clip = audio.load(record[field])
            except SampleError as e:
                rejects.append({"id": record["id"], "reason": str(e)})
                continue
            for k in missing:
                _write_wav_atomic(paths[k - 1], augment_waveform(clip.waveform, SAMPLE_RATE,
                                                                 _rng(record["id"], k, seed)), SAMPLE_RATE)
        for k, path in enumerate(paths, 1):
            # Only the sound changes; other inputs (an image) would just be encoded again.
            new.append({**{key: None for key in drop}, **{key: v for key, v in record.items() if key not in drop},
                        "id": f"{record['id']}#aug{k}", field: str(path), "augmented_from": record["id"]})
    return new, rejects
