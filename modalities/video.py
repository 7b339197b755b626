"""Video: frames through the frozen image backbone, one token per sampled frame.

Decoding: a path is decoded with PyAV (``av.open`` + ``container.decode(video=0)``), frame by
frame; only the sampled frames are kept at full size, so a long video never sits in memory.
Frames can also be passed directly (a list or array of ``uint8 [H, W, 3]`` frames or PIL
images, optionally as ``(frames, fps)``).

Sampling: ``frames`` frames spread uniformly over the clip, first and last included (default);
with ``fps > 0``, frames at that rate instead, and if that gives more than ``max_frames``, that
many evenly spaced among them, so the whole clip is always covered.

Temporal tokens: every sampled frame goes through the image modality's frozen backbone (same
weights, preprocessing and ImageNet label semantics as ``image`` with ``tokens = "pooled"``) and
becomes one token, in time order. The tokens carry no time stamp: the adapter's learned
per-position embeddings (``AdapterConfig.positions``) tell the projection which frame is which.
With ``summary_token`` the first token is the mean of the frame tokens, so its semantic part
lives in the text backbone's sentence space like the image modality's pooled token
(:meth:`language_slice`). Clips of different lengths are padded and masked.

Motion features (``motion = true``): each frame token is extended by the change of the frozen
features since the previous sampled frame (``feat_t - feat_{t-1}``; zeros for the first frame),
and the summary token by the mean absolute change, so even a linear read-out sees how much and
how the scene changes. Frozen image features describe *what* is in a frame; the action of a
clip lives mostly in how they change.

Choice of defaults (linear probes, logistic regression on standardised features, pybullet video
set with 16 clips per combination: 481 train / 72 val clips, test never used). "val" fits on
train and scores val; "LCO" is 5-fold leave-combination-out on train (the action or object of a
clip whose action-object pair the probe never saw, the harder, compositional read-out):

=====================================  =========  =========  =========  =========
summary token (8 frames)               action     object     action     object
                                       val        val        LCO        LCO
=====================================  =========  =========  =========  =========
semantic=false, motion=false           0.972      0.972      0.530      0.636
semantic=true,  motion=false           0.986      0.944      0.493      0.626
semantic=false, motion=true            1.000      0.972      0.626      0.599
semantic=true,  motion=true (default)  1.000      0.972      0.605      0.584
=====================================  =========  =========  =========  =========

With all 8 frame tokens concatenated, motion moves action LCO 0.563 -> 0.613 and object LCO
0.611 -> 0.549 (semantic=true). So motion is on: it lifts the unseen-combination action
read-out by 4-11 points while both stay recoverable. Label semantics change the probes by at
most a few points either way (one val clip is 1.4 points); they stay on because they give the
summary token a sentence-space slice (:meth:`language_slice`), which ``language_prior`` models
(Stage 1 uses 0.65) need to place videos near captions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from oneencoder.deps import require
from oneencoder.errors import ConfigError, SampleError
from oneencoder.features.inputs import tensor_to_numpy
from oneencoder.modalities.image import (IMAGE_CORRUPTIONS, ImageBackboneMixin, corrupted_image, occlusion_box,
                                        standard_mode)
from oneencoder.modality import Modality, ModalitySpec, create_modality, register_modality
from oneencoder.options import AT_LEAST_1, NON_NEGATIVE, declare, option

DEFAULT_FPS = 8.0  # frame rate assumed for bare frames (the pybullet clips' rate)
_THUMB = 64  # side (px) at which motion energy is measured: cheap, and blind to codec noise
_ENCODE_CHUNK = 64  # frames per backbone call: bounds memory for big batches
_BLOB_MIN_FRACTION = 0.002  # a foreground blob smaller than this share of the frame is noise
_LEVELS = 8  # colour quantisation (per channel) of the background palette


@dataclass
class VideoClip:
    """A decoded clip: the sampled frames plus measurements of the whole clip.

    Attributes:
        frames: Sampled frames, RGB ``uint8 [H, W, 3]``, in time order.
        indices: Their positions among all frames of the clip.
        n_frames: Frames in the whole clip.
        fps: Frame rate of the clip.
        source: File name (or "frames") for error messages.
        motion_energy: Mean absolute difference between consecutive frames (pixels in [0, 1]).
    """

    frames: list[np.ndarray]
    indices: list[int]
    n_frames: int
    fps: float
    source: str
    motion_energy: float = field(default=float("nan"))

    @property
    def duration(self) -> float:
        return self.n_frames / self.fps


def sample_indices(n_total: int, clip_fps: float, frames: int, fps: float, max_frames: int) -> list[int]:
    """Which of ``n_total`` frames to keep (see the module docstring for the rule)."""
    if n_total <= 0:
        return []
    if fps > 0:
        picked = np.unique(np.floor(np.arange(0.0, n_total, clip_fps / fps)).astype(int))
        picked = picked[picked < n_total]
        if len(picked) > max_frames:
            picked = picked[np.linspace(0, len(picked) - 1, max_frames).round().astype(int)]
        return picked.tolist()
    n = min(frames, n_total)
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(int)).tolist()


def _thumb(frame: np.ndarray) -> np.ndarray:
    img = Image.fromarray(frame).resize((_THUMB, _THUMB), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


class _MotionMeter:
    """Running mean of ``|frame_t - frame_{t-1}|`` over consecutive frames, at thumbnail size."""

    def __init__(self) -> None:
        self.prev: np.ndarray | None = None
        self.total, self.count = 0.0, 0

    def add(self, thumb: np.ndarray) -> None:
        if self.prev is not None:
            self.total += float(np.abs(thumb - self.prev).mean())
            self.count += 1
        self.prev = thumb

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else 0.0


def _stream_info(av: Any, path: Path) -> tuple[int, float]:
    """Frame count and rate of the first video stream (counting packets if the header has no count)."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise SampleError(f"{path}: file has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        n = int(stream.frames or 0)
        if n <= 0:
            n = sum(1 for packet in container.demux(stream) if packet.size)
    return n, float(rate) if rate else DEFAULT_FPS


def _decode_file(path: Path, pick: Callable[[int, float], list[int]]) -> VideoClip:
    """Decode ``path``; ``pick(n_total, fps)`` gives the indices to keep."""
    if not path.is_file():
        raise SampleError(f"{path}: video file not found")
    if path.stat().st_size == 0:
        raise SampleError(f"{path}: cannot decode video (empty file, 0 bytes)")
    av = require("av")
    require("av.logging", "av")
    try:
        # FFmpeg's own log lines ("moov atom not found") stay out of the terminal: the
        # exception message already carries the last one, and it goes to the rejects file.
        with av.logging.Capture():
            n_total, rate = _stream_info(av, path)
            keep = set(pick(n_total, rate))
            frames, indices, meter, i = [], [], _MotionMeter(), -1
            with av.open(str(path)) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    rgb = frame.to_ndarray(format="rgb24")
                    meter.add(_thumb(rgb))
                    if i in keep:
                        frames.append(rgb)
                        indices.append(i)
    except SampleError:
        raise
    except Exception as e:  # PyAV/FFmpeg raise many error types for broken files
        raise SampleError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from None
    n_decoded = i + 1
    if n_decoded == 0:
        raise SampleError(f"{path}: video has no frames")
    if not frames:  # only if the header claimed no frames at all and decoding found some
        raise SampleError(f"{path}: cannot decode video (header says {n_total} frames, decoded {n_decoded})")
    return VideoClip(frames, indices, n_decoded, rate, str(path), meter.value)


def _as_rgb(frame: Any, where: str) -> np.ndarray:
    if isinstance(frame, Image.Image):
        try:  # standard_mode: closed images, 16-bit grey and premultiplied alpha in one line each
            return np.asarray(standard_mode(frame, where).convert("RGB"))
        except (ValueError, OSError) as e:
            raise SampleError(f"{where}: image mode {frame.mode!r} cannot be converted to RGB ({e})") from None
    if isinstance(frame, torch.Tensor):
        frame = tensor_to_numpy(frame, where)
    try:
        arr = np.asarray(frame)
    except (TypeError, ValueError) as e:  # ragged nested lists
        raise SampleError(f"{where}: frame is not an image array ({e})") from None
    if arr.dtype.kind not in "biuf":
        raise SampleError(f"{where}: frame is not numeric (dtype {arr.dtype})")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise SampleError(f"{where}: frame contains NaN or infinite values")
        arr = (np.clip(arr, 0.0, 1.0) * 255).round()
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or min(arr.shape[:2]) < 1:
        raise SampleError(f"{where}: each frame must be [H, W, 3] RGB, got shape {arr.shape}")
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


@register_modality
class VideoModality(ImageBackboneMixin, Modality):
    """Short video clips: one frozen image-backbone token per sampled frame."""

    spec = ModalitySpec(
        name="video",
        backbone="timm:tf_efficientnet_lite0",
        preprocess_version="video-v1",
        record_key="video",
        reads_files=True,
        default_anchor="text",
        extra_deps=("timm", "av"),
    )
    file_extensions = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
    input_ndim = 4  # frames [T, H, W, 3]; [N, T, H, W, 3] is N clips
    default_options = declare({
        "backbone": "timm:tf_efficientnet_lite0",
        "frames": option(8, range=AT_LEAST_1),  # frames sampled uniformly over the clip
        "fps": option(0.0, range=NON_NEGATIVE),  # > 0: sample at this rate instead (at most max_frames)
        "max_frames": option(16, range=AT_LEAST_1),
        # Label semantics: probes neutral (within a few points), needed by language_prior (docstring table)
        "semantic": True,
        "summary_token": True,  # first token = mean of the frame tokens (mean |change| for motion dims)
        # Frame differences: action read-out of unseen combinations 0.49 -> 0.61 (docstring table)
        "motion": True,
        "image": {},  # further options of the image modality (not tokens/semantic)
    })

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if "tokens" in o["image"]:
            raise ConfigError("[modalities.video] image.tokens cannot be set: every frame is one pooled token")
        if "semantic" in o["image"]:
            raise ConfigError("[modalities.video] image.semantic cannot be set: use [modalities.video] semantic")
        if o["image"].get("backbone", o["backbone"]) != o["backbone"]:
            raise ConfigError(f"[modalities.video] backbone {o['backbone']!r} differs from image.backbone "
                              f"{o['image']['backbone']!r}; set one of them")
        image = {**o["image"], "backbone": o["backbone"], "semantic": bool(o["semantic"]), "tokens": "pooled"}
        try:  # the frozen frame encoder is the image modality, with these options
            self._image = create_modality("image", **image)
        except ConfigError as e:
            raise ConfigError(f"[modalities.video] image options: {e}") from None

    def bind(self, peers: dict[str, Modality]) -> None:
        """Label semantics of the frames live in the space of the stage's text backbone, as for images;
        recorded in ``image.text_backbone`` so a reloaded model encodes frames the same way."""
        self._image.bind(peers)
        chosen = self._image.options["text_backbone"]
        if chosen and self.options["image"].get("text_backbone") != chosen:
            self.options["image"] = {**self.options["image"], "text_backbone": chosen}

    # ----- identity -----------------------------------------------------------------
    @property
    def frame_dim(self) -> int:
        """Width of the frozen per-frame feature (before motion features)."""
        return self._image.feature_dim

    @property
    def feature_dim(self) -> int:
        return self.frame_dim * (2 if self.options["motion"] else 1)

    @property
    def max_frames(self) -> int:
        """Most frames one clip gives."""
        return int(self.options["max_frames"] if self.options["fps"] > 0 else self.options["frames"])

    @property
    def max_tokens(self) -> int:
        return self.max_frames + (1 if self.options["summary_token"] else 0)

    def language_slice(self) -> tuple[int, int] | None:
        # The summary token's label semantics (frame tokens keep them at the same dims).
        return self._image.language_slice() if self.options["summary_token"] else None

    # ----- hooks --------------------------------------------------------------------
    def _pick(self, n_total: int, clip_fps: float) -> list[int]:
        o = self.options
        return sample_indices(n_total, clip_fps, int(o["frames"]), float(o["fps"]), int(o["max_frames"]))

    def load(self, source: Any) -> VideoClip:
        """A video file path, a list/array of frames, or ``(frames, fps)``."""
        if isinstance(source, (str, Path)):
            return _decode_file(Path(source), self._pick)
        fps = DEFAULT_FPS
        if isinstance(source, tuple) and len(source) == 2 and np.isscalar(source[1]):
            source, fps = source[0], float(source[1])
            if not fps > 0:
                raise SampleError(f"frames: frame rate {fps} is not positive")
        if isinstance(source, torch.Tensor):
            source = tensor_to_numpy(source, "frames")
        if not isinstance(source, (list, tuple, np.ndarray)):
            raise SampleError(f"video input must be a path or a list of frames, got {type(source).__name__}")
        if len(source) == 0:
            raise SampleError("frames: video has no frames")
        frames = [_as_rgb(f, f"frames[{i}]") for i, f in enumerate(source)]
        meter = _MotionMeter()
        for f in frames:
            meter.add(_thumb(f))
        keep = self._pick(len(frames), fps)
        return VideoClip([frames[i] for i in keep], keep, len(frames), fps, "frames", meter.value)

    def preprocess(self, raw: VideoClip) -> torch.Tensor:
        """Frames ``[N, 3, S, S]`` with ``1 <= N <= max_frames``, normalised like the image modality."""
        if not raw.frames:
            raise SampleError(f"{raw.source}: video has no frames")
        return torch.stack([self._image.preprocess(Image.fromarray(f)) for f in raw.frames[: self.max_frames]])

    def collate(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        width = max(it.shape[0] for it in items)
        frames = torch.zeros((len(items), width, *items[0].shape[1:]), dtype=items[0].dtype)
        mask = torch.zeros((len(items), width), dtype=torch.bool)
        for row, it in enumerate(items):
            frames[row, : it.shape[0]] = it
            mask[row, : it.shape[0]] = True
        return {"frames": frames, "mask": mask}

    @torch.inference_mode()
    def encode(self, backbone: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        frames, mask = batch["frames"], batch["mask"]
        device = next(backbone.parameters()).device
        real = frames[mask]  # padding frames never go through the backbone
        feats = torch.cat([self._image.encode(backbone, chunk)[0][:, 0] for chunk in real.split(_ENCODE_CHUNK)])
        mask = mask.to(device)
        frame = torch.zeros((*mask.shape, self.frame_dim), device=device)
        frame[mask] = feats.float()
        tokens, summary = frame, [_masked_mean(frame, mask)]
        if self.options["motion"]:
            moved = torch.zeros_like(mask)
            moved[:, 1:] = mask[:, 1:] & mask[:, :-1]
            diff = torch.zeros_like(frame)
            diff[:, 1:] = frame[:, 1:] - frame[:, :-1]
            diff = diff * moved.unsqueeze(-1)
            tokens = torch.cat([frame, diff], dim=-1)
            # Mean |change|, not mean change: the signed mean telescopes to (last - first) / N
            # and forgets the motion in between (probe: see default_options).
            summary.append(_masked_mean(diff.abs(), moved))
        if self.options["summary_token"]:
            tokens = torch.cat([torch.cat(summary, dim=-1).unsqueeze(1), tokens], dim=1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        return tokens, mask

    def difficulty(self, raw: VideoClip, tokens: torch.Tensor) -> dict[str, float]:
        """Clip measurements for curriculum scorers (never raises; NaN where unmeasurable).

        Returns:
            ``motion_energy`` (mean absolute change between consecutive frames, pixels in
            [0, 1], measured at 64 px over every frame of the clip), ``objects_in_view``
            (median over the sampled frames of the foreground blobs: connected regions whose
            colour is not among the frame border's, i.e. not floor, wall or sky),
            ``clip_length`` (s) and ``n_frames`` (frames in the whole clip).
        """
        out = {"motion_energy": float("nan"), "objects_in_view": float("nan"),
               "clip_length": float("nan"), "n_frames": float("nan")}
        try:
            out["motion_energy"] = float(raw.motion_energy)
            out["clip_length"] = float(raw.duration)
            out["n_frames"] = float(raw.n_frames)
            out["objects_in_view"] = float(np.median([count_blobs(f) for f in raw.frames]))
        except Exception:  # measurements must never reject a sample that encoded fine
            pass
        return out

    # ----- corruptions of ``eval --robustness`` ----------------------------------------------
    def corruptions(self) -> dict[str, tuple[float, ...]]:
        """The image corruptions on every sampled frame, the same in each (one blur radius, one
        occluder rectangle), and ``frame_drop``: 25, 50 or 75 % of the sampled frames left out (at
        least one stays), as a stuttering stream would lose them."""
        return {**IMAGE_CORRUPTIONS, "frame_drop": (0.25, 0.5, 0.75)}

    def corrupt(self, raw: VideoClip, kind: str, strength: float, rng: random.Random) -> VideoClip:
        if kind == "frame_drop":
            n = len(raw.frames)
            keep = sorted(rng.sample(range(n), max(1, n - round(strength * n))))
            return replace(raw, frames=[raw.frames[i] for i in keep], indices=[raw.indices[i] for i in keep])
        if kind not in IMAGE_CORRUPTIONS:
            raise ConfigError(f"video corruption {kind!r} not known; use one of {', '.join(self.corruptions())}")
        height, width = raw.frames[0].shape[:2]
        box = occlusion_box(width, height, strength, rng) if kind == "occlusion" else None
        size = int(self._image.options["image_size"])
        frames = [np.asarray(corrupted_image(Image.fromarray(f), kind, strength, rng, size, box)) for f in raw.frames]
        return replace(raw, frames=frames)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [B, N, D]`` over the positions where ``mask [B, N]`` is True (zeros if none)."""
    w = mask.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def count_blobs(frame: np.ndarray) -> int:
    """Foreground blobs of one RGB frame: connected regions of colours absent from its border.

    The border (floor, wall, sky in most shots) defines a background palette of quantised
    colours; blobs under ``_BLOB_MIN_FRACTION`` of the frame are ignored.
    """
    ndimage = require("scipy.ndimage", "scipy")
    q = (frame.astype(np.int32) * _LEVELS) // 256
    codes = (q[..., 0] * _LEVELS + q[..., 1]) * _LEVELS + q[..., 2]
    border = np.concatenate([codes[0], codes[-1], codes[:, 0], codes[:, -1]])
    counts = np.bincount(border, minlength=_LEVELS**3)
    background = counts >= max(1, 0.01 * border.size)
    foreground = ~background[codes]
    labels, n = ndimage.label(foreground)
    if n == 0:
        return 0
    sizes = np.bincount(labels.ravel())[1:]
    return int((sizes >= _BLOB_MIN_FRACTION * frame.shape[0] * frame.shape[1]).sum())
