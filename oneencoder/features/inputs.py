"""What ``encode`` accepts beyond file paths and strings: arrays, tensors, batches, folders.

* :func:`as_batch` splits one call's ``inputs`` into single inputs: a string, a path, a PIL
  image, ``(waveform, sample_rate)`` or ``(frames, fps)`` is one input; a list is many; an
  array of one rank more than a single input of its modality (the modality's
  ``input_ndim``: ``[N, H, W, C]`` images, ``[N, H, W]`` depth maps, ``[N, samples]``
  waveforms...) is a batch along its first axis. A single input of another layout (a
  ``[H, W, 1]`` depth map, a multi-channel waveform) goes in a list: ``[x]``.
* :func:`image_from_array` turns an image array into a PIL image: numpy ``HWC`` (or ``HW``)
  uint8, or floats in [0, 1]; torch tensors ``CHW`` as torchvision gives them.
* :func:`tensor_to_numpy` reads a torch tensor into numpy, or refuses it in one line
  (a ``meta`` tensor has no values to read).
* :func:`files_of` lists the files of a modality in a folder, by its ``file_extensions``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import OneEncoderError, SampleError

_CHANNELS = (1, 3, 4)


def _is_rate_pair(x: Any) -> bool:
    """``(waveform, sample_rate)`` or ``(frames, fps)``: one input, not a batch of two."""
    return isinstance(x, tuple) and len(x) == 2 and np.isscalar(x[1]) and not isinstance(x[1], (str, bytes))


def _single_array(ndim: int | None, arr: np.ndarray | torch.Tensor) -> bool:
    return ndim is None or arr.ndim <= ndim


def as_batch(inputs: Any, input_ndim: int | None = None) -> list[Any]:
    """``inputs`` as a list of single inputs, for a modality whose one input has rank ``input_ndim``."""
    if isinstance(inputs, (str, bytes, os.PathLike, Image.Image)) or _is_rate_pair(inputs):
        return [inputs]
    if isinstance(inputs, (np.ndarray, torch.Tensor)):
        if isinstance(inputs, np.ndarray) and inputs.dtype.kind in "USO":  # strings (text, SMILES)
            return [str(x) if inputs.dtype.kind != "O" else x for x in inputs.reshape(-1)]
        return [inputs] if _single_array(input_ndim, inputs) else list(inputs)
    if isinstance(inputs, Sequence):
        return list(inputs)
    if hasattr(inputs, "__iter__") and not isinstance(inputs, dict):
        return list(inputs)  # generators, map objects
    return [inputs]


def tensor_to_numpy(x: torch.Tensor, where: str) -> np.ndarray:
    """A tensor's values as a numpy array on the CPU (bfloat16 read as float32, sparse made dense).

    Raises:
        SampleError: the tensor has no values to read (``meta`` device), or cannot be copied.
    """
    if x.is_meta:  # shapes only: .cpu() raises NotImplementedError deep inside torch
        raise SampleError(f"{where}: a tensor on the 'meta' device has no values; pass a tensor with data")
    try:
        t = x.detach()
        if t.layout != torch.strided:  # sparse and other layouts
            t = t.to_dense()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            t = t.float()
        return t.cpu().resolve_conj().resolve_neg().numpy()
    except (RuntimeError, TypeError, NotImplementedError) as e:
        raise SampleError(f"{where}: cannot read this {x.dtype} tensor on {x.device} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def image_from_array(x: np.ndarray | torch.Tensor, where: str = "image array") -> Image.Image:
    """A PIL image from an ``HWC``/``HW`` numpy array or a ``CHW`` tensor.

    uint8 values are pixels 0-255; floats must lie in [0, 1] (torchvision's ``ToTensor``
    range); other integer types must fit in 0-255.

    Raises:
        SampleError: the shape, dtype or range is not an image's.
    """
    channels_first = isinstance(x, torch.Tensor)
    arr = tensor_to_numpy(x, where) if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype.kind not in "uif":
        raise SampleError(f"{where}: an image array must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 3:
        first, last = arr.shape[0] in _CHANNELS, arr.shape[-1] in _CHANNELS
        if first and (channels_first or not last):
            arr = arr.transpose(1, 2, 0)
        elif not last:
            raise SampleError(f"{where}: shape {tuple(arr.shape)} is neither HWC nor CHW with 1, 3 or 4 channels")
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    elif arr.ndim != 2:
        raise SampleError(f"{where}: an image is [H, W], [H, W, C] or [C, H, W], got shape {tuple(arr.shape)}")
    if min(arr.shape[:2]) < 1:
        raise SampleError(f"{where}: empty image of shape {tuple(arr.shape)}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise SampleError(f"{where}: image contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise SampleError(f"{where}: float pixels must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]; "
                              "pass uint8 for 0-255 values")
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round()
    elif arr.dtype != np.uint8 and (arr.min() < 0 or arr.max() > 255):
        raise SampleError(f"{where}: integer pixels must lie in 0-255, got [{arr.min()}, {arr.max()}]")
    return Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8)))  # HW, HWC3, HWC4: L, RGB, RGBA


def extensions_for(cls: type) -> tuple[str, ...]:
    """A modality class's ``file_extensions``, lower case."""
    return tuple(e.lower() for e in getattr(cls, "file_extensions", ()))


def modality_of_file(path: str | Path, candidates: Sequence[str], hint: str = "name one with --as") -> str:
    """Which of ``candidates`` reads a file with this extension (``hint``: what the user can do else).

    Raises:
        OneEncoderError: no candidate, or several, claim the extension.
    """
    from ..modality import MODALITIES

    suffix = Path(path).suffix.lower()
    owners = [m for m in candidates if suffix in extensions_for(MODALITIES.get(m))]
    if len(owners) == 1:
        return owners[0]
    if not owners:
        readers = ", ".join(m for m in candidates if extensions_for(MODALITIES.get(m))) or "none"
        raise OneEncoderError(f"{path}: no modality of this model reads {suffix or 'extension-less'} files "
                              f"(file modalities here: {readers}); {hint}")
    raise OneEncoderError(f"{path}: {suffix} files could be {' or '.join(owners)}; {hint}")


def files_of(folder: str | Path, modality: str) -> list[Path]:
    """Files of ``modality`` under ``folder`` (recursive, sorted, hidden files skipped).

    Raises:
        OneEncoderError: the modality reads no files, or the folder holds none of its files.
    """
    from ..modality import MODALITIES

    folder = Path(folder)
    exts = extensions_for(MODALITIES.get(modality))
    if not exts:
        raise OneEncoderError(f"{folder}: {modality} inputs are not files; pass a manifest (.jsonl) or a "
                              "text file with one input per line")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise OneEncoderError(f"{folder}: no {modality} files ({' '.join(exts)}) in this folder")
    return files
