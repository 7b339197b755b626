"""Shared CLI helpers: user errors become one line and a non-zero exit."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer

from oneencoder.errors import OneEncoderError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2


def user_errors(fn: F) -> F:
    """Print ``error: <message>`` for user-caused failures instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OneEncoderError as e:
            typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            typer.secho("interrupted; rerun the same command to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def quiet_libraries() -> None:
    """Silence third-party progress bars and info logs; ours are enough."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def data_overrides(manifest: Optional[Path], cache_dir: Optional[Path]) -> dict[str, Optional[str]]:
    """``[data]`` overrides from --manifest/--cache-dir (None keeps the stage file's value)."""
    return {"manifest": str(manifest) if manifest else None, "cache_dir": str(cache_dir) if cache_dir else None}


def echo(msg: str = "") -> None:
    typer.echo(msg)
