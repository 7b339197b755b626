"""Depth: metric depth maps encoded as 3-channel images for the frozen image backbone.

Depth goes through the frozen image backbone, as ImageBind binds depth to images
(Girdhar et al., 2023, which feeds single-view depth to a ViT as disparity). The
backbone, its weights and its tokens are exactly the image modality's; only the
pixels differ. Encodings (option ``encoding``), each a ``[3, H, W]`` map in [0, 1]:

* ``"disparity"``: inverse depth, min-max normalised per map to [0.1, 1] (the nearest
  point is 1) and replicated to 3 channels.
* ``"normals"``: surface normals from the back-projected depth and the intrinsics
  (vertical ``fov``), camera frame x right, y up, z towards the camera, mapped
  ``(n + 1) / 2``: a surface facing the camera is (0.5, 0.5, 1).
* ``"hha"``: HHA-like (Gupta et al., 2014) without a gravity estimate: disparity,
  height above the lowest visible point along camera-up (normalised per map), and the
  angle between the normal and camera-up (0 = facing up, 1 = facing down).
* ``"disparity+normals"``: disparity, nx, ny.

The default is ``"normals"`` (measured best, see ``default_options``). Normals come
from depth differences between neighbouring pixels, so they are the encoding most
sensitive to quantised input (16-bit millimetres at under half a metre) and sensor noise.

Missing pixels (0, NaN, inf or negative, i.e. "no return") are 0 in every channel.
The map is padded to a square with missing pixels, resized to ``image_size`` and
normalised with the image modality's mean/std.

Inputs: a ``.npy`` array or a one-array ``.npz`` (float metres, or integer sensor units
times ``depth_scale``),
a 16-bit PNG (sensor units times ``depth_scale``, 0.001 = millimetres as Kinect/
RealSense write them), a 32-bit float TIFF/PNG in metres, or a numpy array / torch
tensor ``[H, W]`` or ``[H, W, 1]``.
"""

from __future__ import annotations

import math
import random
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from oneencoder.errors import ConfigError, SampleError
from oneencoder.features.inputs import tensor_to_numpy
from oneencoder.modalities.image import DEFAULT_BACKBONE, ImageBackboneMixin, occlusion_box
from oneencoder.modality import Modality, ModalitySpec, create_modality, register_modality
from oneencoder.options import AT_LEAST_1, POSITIVE, Range, declare, option

ENCODINGS = ("disparity", "normals", "hha", "disparity+normals")
_DISPARITY_FLOOR = 0.1  # the farthest valid point stays distinguishable from "missing" (0)
_EDGE_JUMP = 0.05  # relative depth jump between neighbours that counts as a discontinuity
_MIN_SIDE = 2  # normals need a neighbour in each direction

# Largest depth map read from a file, checked from its .npy header (or image header) before
# any allocation: 8192 x 8192 values, and as many float64 bytes (512 MiB). Normals take
# several float32 copies of the map, so this bounds the work too.
MAX_DEPTH_VALUES = 8192 * 8192
MAX_DEPTH_BYTES = MAX_DEPTH_VALUES * 8


@dataclass
class DepthMap:
    """A loaded depth map: float32 metres ``[H, W]`` with 0 where there is no return."""

    depth: np.ndarray
    source: str

    @property
    def valid(self) -> np.ndarray:
        return self.depth > 0


# ----- reading ---------------------------------------------------------------------------


def _npy_header(f: IO[bytes], where: str, available: int) -> None:
    """Check a ``.npy`` stream's header against the limits before NumPy allocates anything.

    Args:
        f: The stream, at the start of the ``.npy`` data (left just after the header).
        where: The file (and ``.npz`` member) for the error.
        available: Bytes the stream holds in all, header included.

    Raises:
        SampleError: unreadable header, non-numeric dtype, more than ``MAX_DEPTH_VALUES``
            values or ``MAX_DEPTH_BYTES`` bytes, or fewer bytes in the file than the header claims.
    """
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(f)
        readers = {(1, 0): npformat.read_array_header_1_0, (2, 0): npformat.read_array_header_2_0}
        if version in readers:
            shape, _, dtype = readers[version](f)
        else:  # 3.0 (utf-8 field names) has no public reader
            shape, _, dtype = npformat._read_array_header(f, version)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        raise SampleError(f"{where}: unreadable .npy header ({type(e).__name__}: {e})") from None
    if dtype.hasobject or dtype.kind not in "iuf":
        raise SampleError(f"{where}: depth must be a numeric array, got dtype {dtype}")
    values = math.prod(int(n) for n in shape)
    nbytes = values * dtype.itemsize
    if values > MAX_DEPTH_VALUES or nbytes > MAX_DEPTH_BYTES:
        raise SampleError(f"{where}: .npy header claims shape {tuple(shape)} {dtype} ({values:,} values, "
                          f"{nbytes:,} bytes), over the limit of {MAX_DEPTH_VALUES:,} values and "
                          f"{MAX_DEPTH_BYTES:,} bytes per depth map")
    held = available - f.tell()
    if nbytes > held:
        raise SampleError(f"{where}: truncated .npy: its header claims {nbytes:,} bytes of data, "
                          f"the file holds {held:,}")


def _check_npy_file(path: Path, suffix: str) -> None:
    """Every array header of a ``.npy`` or ``.npz`` file, checked against the limits."""
    if suffix == ".npy":
        with open(path, "rb") as f:
            _npy_header(f, str(path), path.stat().st_size)
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.filename.endswith(".npy"):
                    with archive.open(info) as member:
                        _npy_header(member, f"{path}[{info.filename[:-4]}]", info.file_size)
                elif info.file_size > MAX_DEPTH_BYTES:  # NumPy would read this member whole
                    raise SampleError(f"{path}[{info.filename}]: {info.file_size:,} bytes, over the limit of "
                                      f"{MAX_DEPTH_BYTES:,} bytes per depth map")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError) as e:
        raise SampleError(f"{path}: not a readable .npz depth archive ({type(e).__name__}: {e})") from None


def _read_file(path: Path, depth_scale: float) -> np.ndarray:
    if not path.is_file():
        raise SampleError(f"{path}: depth file not found")
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        with open(path, "rb") as f:
            magic = f.read(6)
        if suffix == ".npy" and magic != b"\x93NUMPY":  # else np.load guesses "pickle" and says so
            raise SampleError(f"{path}: not a .npy file (no NumPy header); save depth with numpy.save")
        if suffix == ".npz" and not magic.startswith(b"PK"):
            raise SampleError(f"{path}: not a .npz file (not a zip archive); save depth with numpy.savez_compressed")
        _check_npy_file(path, suffix)  # a hostile header must not make NumPy allocate terabytes
        try:
            arr = np.load(path, allow_pickle=False)
            if suffix == ".npz":
                arr = _only_array(arr, path)
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise SampleError(f"{path}: not a readable {suffix} depth array ({type(e).__name__}: {e})") from None
        return _to_metres(arr, depth_scale, str(path))
    try:
        with warnings.catch_warnings():  # the limit below is checked first, from the header
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img_file = Image.open(path)
        with img_file as img:
            w, h = img.size
            if w * h > MAX_DEPTH_VALUES:
                raise SampleError(f"{path}: {w}x{h} depth image has {w * h:,} pixels, over the limit of "
                                  f"{MAX_DEPTH_VALUES:,}")
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except Image.DecompressionBombError:
        raise SampleError(f"{path}: depth image is over the limit of {MAX_DEPTH_VALUES:,} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SampleError(f"{path}: cannot decode depth image ({type(e).__name__}: {e})") from None
    if mode == "F":  # 32-bit float image: already metres
        return arr.astype(np.float32)
    if not (mode.startswith("I;16") or mode == "I"):
        raise SampleError(f"{path}: image mode {mode} is not a depth map; "
                          "save depth as a 16-bit grayscale PNG or a float32 .npy")
    return arr.astype(np.float32) * np.float32(depth_scale)


def _only_array(archive: Any, path: Path) -> np.ndarray:
    """The one array of an ``.npz`` (or its ``depth`` entry when it holds several)."""
    with archive:
        names = list(archive.files)
        if len(names) == 1 or "depth" in names:
            return archive[names[0] if len(names) == 1 else "depth"]
    raise SampleError(f"{path}: .npz holds {names}; save one array, or name the depth array 'depth'")


def _to_metres(arr: Any, depth_scale: float, where: str) -> np.ndarray:
    """Float arrays are metres, integer arrays sensor units (times ``depth_scale``)."""
    if isinstance(arr, torch.Tensor):
        arr = tensor_to_numpy(arr, where)
    arr = np.asarray(arr)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise SampleError(f"{where}: depth must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
    if arr.ndim != 2:
        raise SampleError(f"{where}: depth must be [H, W] or [H, W, 1], got shape {tuple(arr.shape)} "
                          "(an RGB image is not a depth map)")
    if min(arr.shape) < _MIN_SIDE:
        raise SampleError(f"{where}: depth map {tuple(arr.shape)} is too small (need at least 2x2)")
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float32) * np.float32(depth_scale)
    return arr.astype(np.float32)


def _clean(depth: np.ndarray) -> np.ndarray:
    """Missing pixels (NaN, inf, <= 0) become 0."""
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)


# ----- encodings -------------------------------------------------------------------------


def _disparity(depth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    disp = np.zeros_like(depth)
    disp[valid] = 1.0 / depth[valid]
    lo, hi = disp[valid].min(), disp[valid].max()
    scaled = (disp - lo) / (hi - lo) if hi > lo else np.ones_like(disp)
    return np.where(valid, _DISPARITY_FLOOR + (1 - _DISPARITY_FLOOR) * scaled, 0.0).astype(np.float32)


def _points(depth: np.ndarray, fov: float) -> np.ndarray:
    """Back-projected points ``[H, W, 3]`` in the camera frame (x right, y up, z towards camera)."""
    h, w = depth.shape
    f = (h / 2) / np.tan(np.radians(fov) / 2)  # fov is vertical, as in pybullet/OpenGL
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    x = (u + 0.5 - w / 2) * depth / f
    y = -(v + 0.5 - h / 2) * depth / f
    return np.stack([x, y, -depth], axis=-1)


def _derivative(points: np.ndarray, valid: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel tangent along ``axis``: the forward or backward difference with the smaller
    depth step, so tangents never cross a depth discontinuity. Also returns where one exists."""
    fwd = np.zeros_like(points)
    bwd = np.zeros_like(points)
    ok_f = np.zeros(valid.shape, bool)
    ok_b = np.zeros(valid.shape, bool)
    n = points.shape[axis]
    sl = lambda a, b: tuple(slice(a, b) if i == axis else slice(None) for i in range(2))  # noqa: E731
    fwd[sl(0, n - 1)] = points[sl(1, n)] - points[sl(0, n - 1)]
    ok_f[sl(0, n - 1)] = valid[sl(1, n)] & valid[sl(0, n - 1)]
    bwd[sl(1, n)] = points[sl(1, n)] - points[sl(0, n - 1)]
    ok_b[sl(1, n)] = ok_f[sl(0, n - 1)]
    use_f = ok_f & (~ok_b | (np.abs(fwd[..., 2]) <= np.abs(bwd[..., 2])))
    return np.where(use_f[..., None], fwd, bwd), ok_f | ok_b


def _normals(depth: np.ndarray, valid: np.ndarray, fov: float) -> np.ndarray:
    """Unit normals ``[H, W, 3]`` facing the camera; pixels without neighbours face it exactly."""
    pts = _points(depth, fov)
    du, ok_u = _derivative(pts, valid, axis=1)
    dv, ok_v = _derivative(pts, valid, axis=0)
    # Rows grow downwards, so -dv points up: right x up is the normal towards the camera.
    n = np.cross(du, -dv)
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    good = valid & ok_u & ok_v & (norm[..., 0] > 0)
    n = np.where(good[..., None], n / np.maximum(norm, 1e-12), np.array([0.0, 0.0, 1.0], np.float32))
    # Orient towards the camera: the view ray to a point is the point itself.
    flip = (n * pts).sum(-1) > 0
    n[flip] *= -1
    return n.astype(np.float32)


def encode_depth(depth: np.ndarray, encoding: str, fov: float) -> np.ndarray:
    """Encode a cleaned depth map (0 = missing, at least one valid pixel) as ``[3, H, W]`` in [0, 1]."""
    valid = depth > 0
    disp = _disparity(depth, valid)
    if encoding == "disparity":
        out = [disp, disp, disp]
    else:
        n = _normals(depth, valid, fov)
        mapped = (n + 1) / 2
        if encoding == "normals":
            out = [mapped[..., 0], mapped[..., 1], mapped[..., 2]]
        elif encoding == "disparity+normals":
            out = [disp, mapped[..., 0], mapped[..., 1]]
        else:  # hha
            y = _points(depth, fov)[..., 1]
            lo, hi = y[valid].min(), y[valid].max()
            height = (y - lo) / (hi - lo) if hi > lo else np.zeros_like(y)
            angle = np.arccos(np.clip(n[..., 1], -1.0, 1.0)) / np.pi
            out = [disp, height, angle]
    stacked = np.stack(out).astype(np.float32)
    return np.where(valid[None], stacked, 0.0).astype(np.float32)


def _square_resize(chw: np.ndarray, size: int) -> torch.Tensor:
    """Pad to a square with "missing" (0), centred, then resize (area-aware bilinear)."""
    _, h, w = chw.shape
    side = max(h, w)
    square = np.zeros((chw.shape[0], side, side), np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[:, top : top + h, left : left + w] = chw
    t = torch.from_numpy(square)
    if side != size:
        t = F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=side > size)[0]
    return t.clamp_(0.0, 1.0)


# ----- the modality ----------------------------------------------------------------------


@register_modality
class DepthModality(ImageBackboneMixin, Modality):
    """Metric depth maps through the frozen image backbone (see the module docstring)."""

    spec = ModalitySpec(
        name="depth",
        backbone=DEFAULT_BACKBONE,
        preprocess_version="depth-v1",
        record_key="depth",
        reads_files=True,
        default_anchor="image",
        extra_deps=("timm",),
    )
    file_extensions = (".npy", ".npz")  # 16-bit PNGs too, named with --as depth
    input_ndim = 2  # [H, W] metres; [N, H, W] is N maps
    default_options = declare({
        # Measured on pybullet renders (14 objects, 60 views each, 2 render seeds, 178 val
        # queries): depth->image object R@1 through a ridge map (l=0.1) to the frozen image
        # features: normals 0.944, hha 0.944, disparity+normals 0.916, disparity 0.860
        # (chance 0.081). normals ties hha at l=0.1 and wins at every other l and without a
        # map (raw cosine 0.68 vs 0.49), so it is the default.
        "encoding": option("normals", choices=ENCODINGS),
        # vertical field of view in degrees (intrinsics for normals/hha)
        "fov": option(60.0, range=Range(0, False, 180, False)),
        # metres per unit of integer input (16-bit PNG: millimetres)
        "depth_scale": option(0.001, range=POSITIVE),
        "semantic": False,  # ImageNet label semantics mean little for depth renders
        "tokens": "pooled",  # checked by the image modality
        "image_size": option(224, range=AT_LEAST_1),
        "image": {},  # further image-modality options (backbone, weights, ...)
    })

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        opts = self.options
        self._image = create_modality("image", **{**opts["image"], "semantic": opts["semantic"],
                                                  "tokens": opts["tokens"], "image_size": opts["image_size"]})

    # ----- identity: all of it is the image backbone's --------------------------------
    @property
    def backbone_id(self) -> str:
        return self._image.backbone_id

    @property
    def feature_dim(self) -> int:
        return self._image.feature_dim

    @property
    def max_tokens(self) -> int:
        return self._image.max_tokens

    # ----- samples -------------------------------------------------------------------
    def load(self, source: Any) -> DepthMap:
        """A ``.npy`` / 16-bit ``.png`` path, or an array/tensor ``[H, W]`` (float metres)."""
        scale = float(self.options["depth_scale"])
        if isinstance(source, (str, Path)):
            where = str(source)
            depth = _read_file(Path(source), scale)
        elif isinstance(source, (np.ndarray, torch.Tensor)):
            where = "depth array"
            depth = _to_metres(source, scale, where)
        else:
            raise SampleError(f"depth input must be a path or an array, got {type(source).__name__}")
        if depth.ndim != 2:
            raise SampleError(f"{where}: depth must be [H, W], got shape {depth.shape}")
        if min(depth.shape) < _MIN_SIDE:
            raise SampleError(f"{where}: depth map {depth.shape} is too small (need at least 2x2)")
        depth = _clean(depth)
        if not depth.any():
            raise SampleError(f"{where}: depth map has no valid pixels (all NaN/zero/negative)")
        return DepthMap(depth, where)

    def preprocess(self, raw: DepthMap) -> torch.Tensor:
        """``[3, S, S]``: encoded, padded, resized, normalised like the image modality's pixels."""
        chw = encode_depth(raw.depth, self.options["encoding"], float(self.options["fov"]))
        pixels = _square_resize(chw, int(self.options["image_size"]))
        mean = torch.tensor(self._image.options["mean"], dtype=torch.float32)[:, None, None]
        std = torch.tensor(self._image.options["std"], dtype=torch.float32)[:, None, None]
        return (pixels - mean) / std

    def encode(self, backbone: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._image.encode(backbone, batch)

    def difficulty(self, raw: DepthMap, tokens: torch.Tensor) -> dict[str, float]:
        """Geometry measurements for the curriculum scorers (never raises).

        Returns:
            ``depth_range`` (metres, max - min of valid pixels), ``edge_density`` (share of
            valid pixels with a valid 4-neighbour more than 5% nearer or farther: self-
            occlusion edges; silhouettes against missing pixels do not count),
            ``occluded_fraction`` (missing pixels) and ``valid_fraction`` (1 - occluded).
            NaN values if the map cannot be measured.
        """
        keys = ("depth_range", "edge_density", "occluded_fraction", "valid_fraction")
        try:
            depth = np.asarray(raw.depth, dtype=np.float32)
            valid = depth > 0
            n_valid = int(valid.sum())
            if n_valid == 0:
                return {k: float("nan") for k in keys[:2]} | {"occluded_fraction": 1.0, "valid_fraction": 0.0}
            edge = np.zeros_like(valid)
            for axis in (0, 1):
                a = np.moveaxis(depth, axis, 0)
                both = (a[1:] > 0) & (a[:-1] > 0)
                jump = np.abs(a[1:] - a[:-1]) > _EDGE_JUMP * np.minimum(a[1:], a[:-1])
                hit = both & jump
                e = np.moveaxis(edge, axis, 0)  # a view: writes land in ``edge``
                e[1:] |= hit
                e[:-1] |= hit
            valid_fraction = n_valid / valid.size
            return {
                "depth_range": float(depth[valid].max() - depth[valid].min()),
                "edge_density": float(edge.sum() / n_valid),
                "occluded_fraction": float(1.0 - valid_fraction),
                "valid_fraction": float(valid_fraction),
            }
        except Exception:  # a measurement must never fail a cache build
            return {k: float("nan") for k in keys}

    # ----- corruptions of ``eval --robustness`` ----------------------------------------------
    def corruptions(self) -> dict[str, tuple[float, ...]]:
        """Sensor ``noise``: each depth multiplied by ``1 + sigma * N(0, 1)``, sigma 1, 3 or 10 %; and
        ``occlusion``: a rectangle over 10, 25 or 50 % of the bounding box of the map's returns loses
        them (depth 0, missing), placed as the image modality places its occluder."""
        return {"noise": (0.01, 0.03, 0.1), "occlusion": (0.1, 0.25, 0.5)}

    def corrupt(self, raw: DepthMap, kind: str, strength: float, rng: random.Random) -> DepthMap:
        depth = raw.depth.copy()
        if kind == "noise":
            factor = 1.0 + strength * np.random.default_rng(rng.getrandbits(64)).standard_normal(depth.shape)
            valid = depth > 0
            # A return stays a return: noise never turns a pixel into "missing".
            depth[valid] = np.maximum(depth[valid] * factor[valid], _MIN_NOISY_DEPTH).astype(np.float32)
        elif kind == "occlusion" and strength > 0:
            # Over the returns' bounding box, not the whole frame: an object render is mostly empty.
            rows, cols = np.nonzero(depth > 0)
            top, left = int(rows.min()), int(cols.min())
            box = occlusion_box(int(cols.max()) - left + 1, int(rows.max()) - top + 1, strength, rng)
            depth[top + box[1] : top + box[3], left + box[0] : left + box[2]] = 0.0
            if not depth.any():  # a map needs one return: keep the first one it had
                depth[rows[0], cols[0]] = raw.depth[rows[0], cols[0]]
        elif kind != "occlusion":
            raise ConfigError(f"depth corruption {kind!r} not known; use one of {', '.join(self.corruptions())}")
        return DepthMap(depth, raw.source)


_MIN_NOISY_DEPTH = 1e-3  # metres: the nearest a noisy return may come
