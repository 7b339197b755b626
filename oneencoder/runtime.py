"""Where code runs and how it is seeded: shared by training, evaluation and the inference API."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from .errors import ConfigError

_DEVICE_TYPES = ("cpu", "cuda", "mps")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` prefers cuda (this process's ``LOCAL_RANK`` under torchrun), then mps, then cpu.

    Raises:
        ConfigError: ``name`` is not a device, or names one this machine does not have.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in _DEVICE_TYPES:
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: this machine has no CUDA GPU that torch can use; use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {name!r}: MPS is not available on this machine; use auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (every device) from one number."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def deterministic_on_cpu(device: torch.device) -> None:
    """Byte-identical runs on the CPU (the demos and tests rely on it); GPUs keep their fast kernels."""
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
