"""Audio: the aisfx sound-event CNN (4.69 M parameters, 512-d, weights CC BY 4.0) from the
PyPI package ``aisfx`` 0.1.2, one token per ~2.3 s window of the clip.

Credit: the weights are the "X-Sequential-CE" model of Ma, Wang & Lerch (ISMIR 2021,
aiSFX), licensed CC BY 4.0.

The checkpoint is a pickled ``(state_dict, ds_dict)`` that contains numpy scalars. It is
loaded with ``torch.load(weights_only=True)`` and an explicit allow-list of the three numpy
globals it needs; it is never unpickled with ``weights_only=False``.

Input recipe (aisfx's librosa path, ``aisfx/spectrogram/spectrogram_librosa.py`` and
``aisfx/inference.py``): 44.1 kHz mono, peak-normalised; power mel spectrogram with
n_fft = win = 2048, hop = 1024, 96 HTK mel bands (0-22050 Hz, unit-sum filters);
``log10(10000 * mel + 1)``; min-max normalised with the paper's fixed range [0, 9.4578];
frames ``[T, 96]`` cut into blocks of 100 frames (about 2.3 s), the last one zero-padded.
"""

from __future__ import annotations

import functools
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oneencoder.deps import require
from oneencoder.errors import ConfigError, SampleError
from oneencoder.features.backbones import existing_path, freeze, packaged_path
from oneencoder.features.inputs import tensor_to_numpy
from oneencoder.fileio import sha256_file
from oneencoder.modality import Modality, ModalitySpec, register_modality
from oneencoder.options import AT_LEAST_1, declare, option

DEFAULT_BACKBONE = "pypi:aisfx"

# aisfx.inference constants (the model was trained on exactly these).
SAMPLE_RATE = 44100
N_FFT = 2048
HOP_LENGTH = 1024
N_MELS = 96
F_MIN, F_MAX = 0.0, 22050.0
WINDOW_FRAMES = 100  # aisfx EMB_BLOCK_LENGTH: frames per embedding window
EMBEDDING_DIM = 512  # width of EmbeddingNet("max", 3, 1, 64)
SPEC_MIN, SPEC_MAX = 0.0, 9.457798957824707  # aisfx spectrogram_normalize(spec_norm="original")
# A trailing partial window shorter than this many frames is dropped (unless it is the only one):
# it would be mostly zero padding.
_MIN_TAIL_FRAMES = WINDOW_FRAMES // 2


@dataclass
class AudioClip:
    """A decoded clip: mono float32 ``waveform`` at ``sample_rate`` (always :data:`SAMPLE_RATE`)."""

    waveform: np.ndarray
    sample_rate: int
    source: str

    @property
    def duration(self) -> float:
        return self.waveform.shape[0] / self.sample_rate


# ----- weights -----------------------------------------------------------------------


def default_weights_path() -> Path:
    """The checkpoint shipped inside the ``aisfx`` wheel."""
    return packaged_path("aisfx.inference", "aisfx", lambda m: m.get_path_modelWeights())


def _numpy_scalar_global() -> tuple[Any, str]:
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    return (core.multiarray.scalar, "numpy.core.multiarray.scalar")


def load_aisfx_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load aisfx's ``(state_dict, ds_dict)`` with ``weights_only=True`` (no arbitrary pickle).

    ``ds_dict`` maps each training dataset to ``(head index, n classes)``; it only shapes the
    classification heads, which are not used for embeddings.
    """
    allowed = [_numpy_scalar_global(), np.dtype, np.dtypes.Int64DType]
    try:
        with torch.serialization.safe_globals(allowed):
            state, ds_dict = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, truncated file...
        raise SampleError(f"{path}: cannot load aisfx weights ({type(e).__name__}: {e})") from None
    return state, ds_dict


def build_aisfx_model(path: str | Path) -> tuple[nn.Module, Any]:
    """aisfx's own ``CrossNet(EmbeddingNet('max', 3, 1, 64))`` with the checkpoint loaded strictly.

    Returns:
        The CrossNet (classification heads included) and the ``load_state_dict`` result
        (``missing_keys`` / ``unexpected_keys``, both empty).
    """
    # aisfx.models.cnn2d only imports torch; importing it has no side effects.
    cnn2d = require("aisfx.models.cnn2d", "aisfx")
    state, ds_dict = load_aisfx_checkpoint(path)
    model = cnn2d.CrossNet(cnn2d.EmbeddingNet("max", 3, 1, 64), ds_dict, "cpu")
    result = model.load_state_dict(state, strict=True)
    return model.eval(), result


class AisfxBackbone(nn.Module):
    """Frozen aisfx embedding CNN: windows ``[N, 100, 96]`` -> embeddings ``[N, 512]``."""

    def __init__(self, embedding_net: nn.Module) -> None:
        super().__init__()
        self.embedding_net = embedding_net

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.embedding_net(windows)


@functools.lru_cache(maxsize=None)
def _cached_sha(path: Path) -> str:
    return sha256_file(path)


# ----- decoding ----------------------------------------------------------------------


def _decode_file(path: Path) -> tuple[np.ndarray, int]:
    """``[channels, n]`` float32 and the file's rate: soundfile first, librosa as fallback."""
    if not path.is_file():
        raise SampleError(f"{path}: audio file not found")
    if path.stat().st_size == 0:
        raise SampleError(f"{path}: audio file is empty (0 bytes)")
    errors = []
    try:
        import soundfile

        data, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
        return data.T, int(sr)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, ...
        errors.append(f"soundfile: {e}")
    try:
        librosa = require("librosa")
        with warnings.catch_warnings():  # "PySoundFile failed. Trying audioread" and deprecations
            warnings.simplefilter("ignore")
            data, sr = librosa.load(str(path), sr=None, mono=False)
        return np.atleast_2d(np.asarray(data, dtype=np.float32)), int(sr)
    except Exception as e:  # audioread/soundfile errors have many types
        errors.append(f"librosa: {type(e).__name__}: {e}")
    raise SampleError(f"{path}: cannot decode audio ({'; '.join(errors)})")


def _as_channels_first(wave: Any, where: str) -> np.ndarray:
    if isinstance(wave, torch.Tensor):
        wave = tensor_to_numpy(wave, where)
    try:
        arr = np.asarray(wave, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise SampleError(f"{where}: waveform is not numeric ({e})") from None
    if arr.ndim == 1:
        return arr[None]
    if arr.ndim != 2:
        raise SampleError(f"{where}: waveform must be 1-D or 2-D (channels x samples), got shape {arr.shape}")
    # [n, channels] (soundfile layout) or [channels, n]: channels is the short axis.
    return arr.T if arr.shape[0] > arr.shape[1] else arr


# ----- spectrogram -------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _mel_basis() -> np.ndarray:
    librosa = require("librosa")
    # Same call as aisfx's librosa recipe: HTK mel, unit-sum (L1) filters.
    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=F_MIN, fmax=F_MAX,
                               htk=True, norm=1.0).astype(np.float32)


def log_mel(waveform: np.ndarray) -> np.ndarray:
    """aisfx input features ``[T, 96]`` of a mono 44.1 kHz clip, normalised to about [0, 1]."""
    peak = float(np.max(np.abs(waveform))) if waveform.size else 0.0
    y = torch.from_numpy(np.ascontiguousarray(waveform / (peak or 1.0), dtype=np.float32))
    # librosa.feature.melspectrogram defaults: centred frames, zero ("constant") padding, Hann.
    stft = torch.stft(y, n_fft=N_FFT, hop_length=HOP_LENGTH, win_length=N_FFT,
                      window=torch.hann_window(N_FFT), center=True, pad_mode="constant",
                      return_complex=True)
    power = stft.abs().pow(2)  # [1025, T]
    mel = torch.from_numpy(_mel_basis()) @ power  # [96, T]
    spec = torch.log10(mel * 10000.0 + 1.0)
    spec = (spec - SPEC_MIN) / (SPEC_MAX - SPEC_MIN)
    return spec.T.contiguous().numpy()


def split_windows(spec: np.ndarray, max_windows: int) -> np.ndarray:
    """Cut ``[T, 96]`` into non-overlapping ``[W, 100, 96]`` windows (zero-padded, at most ``max_windows``).

    A short clip gives one zero-padded window. A trailing partial window under half a
    window is dropped. Longer clips keep ``max_windows`` evenly spaced windows.
    """
    n_frames = spec.shape[0]
    n_full, tail = divmod(n_frames, WINDOW_FRAMES)
    n = n_full + (1 if tail >= _MIN_TAIL_FRAMES or n_full == 0 else 0)
    padded = np.zeros((n * WINDOW_FRAMES, spec.shape[1]), dtype=np.float32)
    keep = min(n_frames, padded.shape[0])
    padded[:keep] = spec[:keep]
    windows = padded.reshape(n, WINDOW_FRAMES, spec.shape[1])
    if n > max_windows:
        windows = windows[np.linspace(0, n - 1, max_windows).round().astype(int)]
    return windows


# ----- the modality ------------------------------------------------------------------


@register_modality
class AudioModality(Modality):
    """Sound effects: one 512-d aisfx embedding per 100-frame (~2.3 s) window."""

    spec = ModalitySpec(
        name="audio",
        backbone=DEFAULT_BACKBONE,
        preprocess_version="audio-v1",
        record_key="sound",
        reads_files=True,
        default_anchor="text",
        extra_deps=("aisfx", "librosa", "soundfile", "torchaudio"),
    )
    file_extensions = (".ogg", ".wav", ".flac", ".mp3", ".opus", ".m4a", ".aif", ".aiff")
    input_ndim = 1  # a mono waveform at 44.1 kHz; [N, samples] is N clips
    default_options = declare({
        "backbone": DEFAULT_BACKBONE,  # or "aisfx:<checkpoint.pth>" in aisfx's format
        "max_windows": option(8, range=AT_LEAST_1),  # tokens per clip; longer clips keep evenly spaced windows
    })

    @classmethod
    def licence_for(cls, backbone: str, options: dict[str, Any]) -> tuple[str, str] | None:
        """CC BY 4.0 for the packaged aisfx weights (credit required); None for another checkpoint."""
        if backbone != DEFAULT_BACKBONE:
            return None
        return ("CC-BY-4.0", 'the "X-Sequential-CE" model of Ma, Wang & Lerch (ISMIR 2021, aiSFX), from the PyPI '
                             "package aisfx")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        bb = self.backbone_id
        if bb != DEFAULT_BACKBONE and not bb.startswith("aisfx:"):
            raise ConfigError(f"[modalities.audio] backbone {bb!r} not understood; "
                              f"use {DEFAULT_BACKBONE!r} or 'aisfx:<checkpoint.pth>'")

    @property
    def feature_dim(self) -> int:
        return EMBEDDING_DIM  # fixed by the aisfx architecture, whatever its checkpoint

    @property
    def max_tokens(self) -> int:
        return int(self.options["max_windows"])

    def weights_path(self) -> Path:
        bb = self.backbone_id
        if bb == DEFAULT_BACKBONE:
            return default_weights_path()
        return existing_path(bb[len("aisfx:"):], "aisfx checkpoint")

    def weights_sha256(self) -> str:
        return _cached_sha(self.weights_path())

    def load_backbone(self) -> nn.Module:
        model, _ = build_aisfx_model(self.weights_path())
        return freeze(AisfxBackbone(model.embedding_net))

    def load(self, source: Any) -> AudioClip:
        """A path, ``(waveform, sample_rate)``, or a 1-D waveform already at 44.1 kHz."""
        if isinstance(source, (str, Path)):
            where = str(source)
            wave, sr = _decode_file(Path(source))
        elif isinstance(source, tuple) and len(source) == 2:
            where = "waveform"
            wave, sr = _as_channels_first(source[0], where), int(source[1])
        elif isinstance(source, (np.ndarray, torch.Tensor)):
            where = "waveform"
            wave = _as_channels_first(source, where)
            if wave.shape[0] != 1:
                raise SampleError("waveform: pass multi-channel audio as (waveform, sample_rate)")
            sr = SAMPLE_RATE
        else:
            raise SampleError(f"audio input must be a path or (waveform, sample_rate), got {type(source).__name__}")
        if sr <= 0:
            raise SampleError(f"{where}: sample rate {sr} is not positive")
        if wave.size == 0 or wave.shape[-1] == 0:
            raise SampleError(f"{where}: no audio samples")
        if not np.isfinite(wave).all():
            raise SampleError(f"{where}: audio contains NaN or infinite samples")
        mono = torch.from_numpy(np.ascontiguousarray(wave.mean(axis=0)))
        if sr != SAMPLE_RATE:
            torchaudio = require("torchaudio")
            mono = torchaudio.functional.resample(mono, sr, SAMPLE_RATE)
        out = mono.numpy().astype(np.float32, copy=False)
        if out.size == 0:
            raise SampleError(f"{where}: no audio samples after resampling to {SAMPLE_RATE} Hz")
        return AudioClip(out, SAMPLE_RATE, where)

    def preprocess(self, raw: AudioClip) -> torch.Tensor:
        """Windows ``[W, 100, 96]`` with ``1 <= W <= max_windows``."""
        windows = split_windows(log_mel(raw.waveform), self.max_tokens)
        if not np.isfinite(windows).all():
            raise SampleError(f"{raw.source}: spectrogram is not finite")
        return torch.from_numpy(windows)

    def collate(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        width = max(it.shape[0] for it in items)
        windows = torch.zeros((len(items), width, WINDOW_FRAMES, N_MELS), dtype=torch.float32)
        mask = torch.zeros((len(items), width), dtype=torch.bool)
        for row, it in enumerate(items):
            windows[row, : it.shape[0]] = it
            mask[row, : it.shape[0]] = True
        return {"windows": windows, "mask": mask}

    @torch.inference_mode()
    def encode(self, backbone: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(backbone.parameters()).device
        windows, mask = batch["windows"].to(device), batch["mask"].to(device)
        tokens = torch.zeros((*mask.shape, self.feature_dim), device=device)
        # Padding windows never go through the CNN.
        tokens[mask] = backbone(windows[mask]).float()
        return tokens, mask

    def difficulty(self, raw: AudioClip, tokens: torch.Tensor) -> dict[str, float]:
        """Acoustic measurements for curriculum scorers (a few ms per clip).

        Returns:
            ``duration`` (s), ``spectral_flatness`` (mean over frames; 1 = white noise),
            ``onset_density`` (onsets per second) and ``snr_db``: mean energy of the loudest
            10% of frames over the quietest 10%, in dB (an estimate; silence floors at -100 dB).
        """
        librosa = require("librosa")
        y, sr = raw.waveform, raw.sample_rate
        duration = raw.duration
        flatness = float(librosa.feature.spectral_flatness(y=y, n_fft=N_FFT, hop_length=HOP_LENGTH).mean())
        onsets = librosa.onset.onset_detect(y=y, sr=sr, hop_length=512, units="frames")
        energy = np.sort(librosa.feature.rms(y=y, frame_length=N_FFT, hop_length=HOP_LENGTH)[0] ** 2)
        k = max(1, int(round(0.1 * energy.size)))
        loud, quiet = float(energy[-k:].mean()), float(energy[:k].mean())
        snr = 10.0 * np.log10((loud + 1e-10) / (quiet + 1e-10))
        return {
            "duration": float(duration),
            "spectral_flatness": flatness,
            "onset_density": float(len(onsets) / duration) if duration > 0 else 0.0,
            "snr_db": float(snr),
        }

    # ----- corruptions of ``eval --robustness`` ----------------------------------------------
    def corruptions(self) -> dict[str, tuple[float, ...]]:
        """Additive white ``noise`` at an SNR of 20, 10 and 0 dB, and ``silence``: a quarter, half
        or all of the clip zeroed (one stretch at a position drawn from the rng)."""
        return {"noise": (20.0, 10.0, 0.0), "silence": (0.25, 0.5, 1.0)}

    def corrupt(self, raw: AudioClip, kind: str, strength: float, rng: random.Random) -> AudioClip:
        wave = raw.waveform.astype(np.float32, copy=True)
        if kind == "noise":
            power = float(np.mean(wave.astype(np.float64) ** 2))
            sigma = math.sqrt(power / 10.0 ** (strength / 10.0))
            wave += np.random.default_rng(rng.getrandbits(64)).normal(0.0, sigma, wave.shape).astype(np.float32)
        elif kind == "silence":
            n = wave.shape[0]
            span = min(n, round(strength * n))
            start = rng.randint(0, n - span)
            wave[start : start + span] = 0.0
        else:
            raise ConfigError(f"audio corruption {kind!r} not known; use one of {', '.join(self.corruptions())}")
        return AudioClip(wave, raw.sample_rate, raw.source)


# The name before every built-in became XModality: model directories saved earlier record
# "oneencoder.modalities.audio:Audio", which must keep loading.
Audio = AudioModality
