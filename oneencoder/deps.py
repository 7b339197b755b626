"""Optional packages: import one, or say in one line how to install it."""

from __future__ import annotations

import importlib

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
