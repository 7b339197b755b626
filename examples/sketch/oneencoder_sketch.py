"""A oneencoder modality plugin in one file: hand-drawn-style sketches described by HOG.

Any image file becomes a *sketch*: its line drawing (Sobel edges, thresholded) at
``image_size`` pixels. The frozen "backbone" describes the drawing with a histogram of
oriented gradients (HOG): the drawing is cut into a ``cells x cells`` grid and each cell
becomes one token, the histogram of its stroke orientations in ``bins`` bins plus how
much ink the cell holds. A first, global token holds the same for the whole drawing::

    token 0            whole drawing   [orientation histogram (bins, L2-normalised), sqrt(ink)]
    tokens 1..cells^2  one grid cell   [orientation histogram (bins, L2-normalised), sqrt(ink)]

So ``feature_dim = bins + 1`` and ``max_tokens = cells * cells + 1``. There are no
trained weights: the backbone is a fixed Sobel convolution plus binning, so
``weights_sha256`` hashes the kernels and the code version instead of a weights file.

Use it (see docs/extending.md)::

    PYTHONPATH=examples/sketch oneencoder --plugin oneencoder_sketch add-modality sketch \\
        --model M --anchor text --data sketch/manifest.jsonl
    # or: pip install --no-deps --no-build-isolation -e examples/sketch   (then no --plugin)
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from oneencoder import Modality, ModalitySpec, register_modality
from oneencoder.errors import ConfigError, SampleError

#: Bump when the HOG computation changes: it is part of ``weights_sha256`` (so of the
#: cache fingerprint), the way a new weights file would be.
HOG_VERSION = "sketch-hog-v1"
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
_EPS = 1e-3  # keeps the L2 norm of an empty cell's histogram near zero instead of 0/0


# ----- load and preprocess (these run in DataLoader workers) -------------------------------------


def _open_image(source: Any) -> Image.Image:
    """A PIL image from a path (PNG, JPEG..., or SVG if cairosvg is installed) or a PIL image.

    Raises:
        SampleError: naming the file, when it is missing or cannot be decoded.
    """
    if isinstance(source, Image.Image):
        return source
    if not isinstance(source, (str, Path)):
        raise SampleError(f"a sketch input is an image path, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise SampleError(f"{path}: image file not found")
    try:
        if path.suffix.lower() == ".svg":
            try:
                import cairosvg
            except ImportError:
                raise SampleError(f"{path}: SVG needs cairosvg (pip install cairosvg)") from None
            img = Image.open(io.BytesIO(cairosvg.svg2png(url=str(path), output_width=512)))
        else:
            img = Image.open(path)
        img.load()
    except SampleError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SampleError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    except Exception as e:  # cairosvg / XML parser errors have many types
        raise SampleError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    img.info["sketch_source"] = str(path)  # for messages raised later, in preprocess
    return img


def _grey_square(img: Image.Image, size: int) -> np.ndarray:
    """Luminance in [0, 1] on a white square canvas (cut-outs keep their whole outline)."""
    img = img.convert("RGBA")
    img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("L")
    side = max(img.size)
    square = Image.new("L", (side, side), 255)
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    square = square.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(square, dtype=np.float32) / 255.0


def _sobel_magnitude(grey: np.ndarray) -> np.ndarray:
    """Gradient magnitude of a 2-D array (Sobel, edge-replicated border)."""
    p = np.pad(grey, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return np.hypot(gx, gy)


def line_drawing(img: Image.Image, size: int, threshold: float) -> np.ndarray:
    """The image as a black-and-white line drawing: 1.0 where a stroke is, else 0.0.

    Edges are thresholded relative to the image's strongest edge, so the drawing does not
    depend on the photo's contrast.
    """
    magnitude = _sobel_magnitude(_grey_square(img, size))
    peak = float(magnitude.max())
    if peak <= 1e-6:
        return np.zeros_like(magnitude)
    return (magnitude >= threshold * peak).astype(np.float32)


# ----- the frozen "backbone" ------------------------------------------------------------------------


class HOGBackbone(nn.Module):
    """Histogram of oriented gradients of a line drawing: fixed kernels, nothing trained.

    Args:
        cells: The drawing is cut into ``cells x cells`` cells, one token each.
        bins: Orientation bins over [0, pi) (unsigned: a stroke has no direction).
    """

    def __init__(self, cells: int, bins: int) -> None:
        super().__init__()
        self.cells, self.bins = cells, bins
        kx = torch.tensor(_SOBEL_X)
        # Buffers, not parameters: they follow .to(device) and there is nothing to train.
        self.register_buffer("kernels", torch.stack([kx, kx.t()])[:, None], persistent=False)

    def forward(self, drawing: torch.Tensor) -> torch.Tensor:
        """``[B, 1, S, S]`` line drawings to ``[B, cells * cells + 1, bins + 1]`` tokens."""
        grad = F.conv2d(drawing, self.kernels, padding=1)  # [B, 2, S, S]: gx, gy
        magnitude = grad.norm(dim=1)  # [B, S, S]
        angle = torch.atan2(grad[:, 1], grad[:, 0]).remainder(math.pi)  # [0, pi)
        # Each pixel votes for its two nearest bin centres, linearly (as in Dalal & Triggs).
        pos = angle / math.pi * self.bins - 0.5
        low = pos.floor()
        frac = pos - low
        low = low.long().remainder(self.bins)
        high = (low + 1).remainder(self.bins)
        hist = torch.zeros(drawing.shape[0], self.bins, *drawing.shape[2:], device=drawing.device)
        hist.scatter_add_(1, low[:, None], (magnitude * (1 - frac))[:, None])
        hist.scatter_add_(1, high[:, None], (magnitude * frac)[:, None])
        grid = F.adaptive_avg_pool2d(hist, self.cells).flatten(2).transpose(1, 2)  # [B, cells^2, bins]
        whole = hist.mean(dim=(2, 3))[:, None]  # [B, 1, bins]
        ink_grid = F.adaptive_avg_pool2d(drawing, self.cells).flatten(2).transpose(1, 2)  # [B, cells^2, 1]
        ink_whole = drawing.mean(dim=(2, 3))[:, None]  # [B, 1, 1]
        hists = torch.cat([whole, grid], dim=1)
        hists = hists / torch.sqrt((hists**2).sum(-1, keepdim=True) + _EPS**2)
        # sqrt spreads the small ink fractions (a few per cent) over a useful range.
        ink = torch.cat([ink_whole, ink_grid], dim=1).sqrt()
        return torch.cat([hists, ink], dim=-1)


# ----- the modality ---------------------------------------------------------------------------------


@register_modality
class Sketch(Modality):
    """Line drawings of any image, described by HOG tokens (no neural network)."""

    spec = ModalitySpec(
        name="sketch",
        backbone="hog",
        preprocess_version="sketch-v1",  # bump when line_drawing() changes: cached features change
        record_key="sketch",  # the manifest field with the image path
        reads_files=True,  # relative paths in a manifest are resolved against its folder
        default_anchor="text",
        extra_deps=("cairosvg",),  # only for .svg inputs
    )
    default_options = {"cells": 4, "bins": 9, "image_size": 128, "edge_threshold": 0.2}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        where = "[modalities.sketch]"
        if o["cells"] < 1 or o["bins"] < 2:
            raise ConfigError(f"{where} cells must be >= 1 and bins >= 2, got cells={o['cells']}, bins={o['bins']}")
        if o["image_size"] < 4 * o["cells"]:
            raise ConfigError(f"{where} image_size={o['image_size']} is too small for {o['cells']} cells "
                              f"(need at least {4 * o['cells']})")
        if not 0.0 < o["edge_threshold"] < 1.0:
            raise ConfigError(f"{where} edge_threshold={o['edge_threshold']} must be between 0 and 1")

    @property
    def feature_dim(self) -> int:
        return int(self.options["bins"]) + 1

    @property
    def max_tokens(self) -> int:
        return int(self.options["cells"]) ** 2 + 1

    def weights_sha256(self) -> str:
        # No weights file: the "weights" are the fixed kernels and the code that bins them.
        desc = f"{HOG_VERSION};sobel={_SOBEL_X};cells={self.options['cells']};bins={self.options['bins']}"
        return hashlib.sha256(desc.encode()).hexdigest()

    def load_backbone(self) -> nn.Module:
        backbone = HOGBackbone(int(self.options["cells"]), int(self.options["bins"])).eval()
        return backbone.requires_grad_(False)

    def load(self, source: Any) -> Image.Image:
        return _open_image(source)

    def preprocess(self, raw: Image.Image) -> torch.Tensor:
        drawing = line_drawing(raw, int(self.options["image_size"]), float(self.options["edge_threshold"]))
        if not drawing.any():
            where = raw.info.get("sketch_source", "the image")
            raise SampleError(f"{where}: blank image, there are no lines to sketch")
        return torch.from_numpy(drawing)[None]  # [1, S, S]; the default collate stacks them

    @torch.inference_mode()
    def encode(self, backbone: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = backbone.kernels.device
        tokens = backbone(batch.to(device).float())
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)
        return tokens, mask

    def difficulty(self, raw: Image.Image, tokens: torch.Tensor) -> dict[str, float]:
        """``ink`` (share of the canvas that is stroke) and ``orientation_entropy`` (bits)."""
        whole = tokens[0].float()
        hist = whole[:-1].clamp_min(0)
        p = hist / hist.sum().clamp_min(1e-12)
        entropy = float(-(p * p.clamp_min(1e-12).log2()).sum())
        return {"ink": float(whole[-1]) ** 2, "orientation_entropy": entropy}
