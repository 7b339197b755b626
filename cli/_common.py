"""Shared CLI helpers: user errors become one line and a non-zero exit."""

from __future__ import annotations

import contextlib
import functools
import os
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, TypeVar

import typer

from oneencoder.errors import OneEncoderError
from oneencoder.fileio import storage_errno, storage_error
from oneencoder.progress import status

if TYPE_CHECKING:
    from oneencoder.apps.api import OneEncoder
    from oneencoder.features.lookup import CachedFeatures
    from oneencoder.training.prepare import PreparedStage

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2
#: Set to 1 (or pass the global --debug) to see the traceback behind a one-line error.
DEBUG_ENV = "ONEENCODER_DEBUG"
_debug = False


def set_debug(on: bool) -> None:
    """Turn tracebacks behind one-line errors on or off (the global ``--debug``; set per invocation)."""
    global _debug
    _debug = on


def debug_enabled() -> bool:
    """``--debug`` was given, or ``ONEENCODER_DEBUG`` is set to anything but "" or "0"."""
    return _debug or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def _traceback(e: BaseException) -> None:
    """Under ``--debug``: the traceback (and the chained cause, e.g. a plugin's own error) on stderr."""
    if debug_enabled():
        typer.echo("".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip(), err=True)


def storage_message(e: Exception) -> Optional[str]:
    """One line for a read-only, full or forbidden location that reached the CLI, else None.

    The library names the path where it writes through ``fileio``; this catches the rest
    (a folder made directly, LMDB's commits) so that such failures never print a traceback.
    """
    if storage_errno(e) is None:
        return None
    if isinstance(e, OSError):
        return str(storage_error(e.filename, e)) if e.filename else f"cannot write: {e.strerror}"
    if type(e).__module__.split(".")[0] in ("lmdb", "safetensors"):  # they keep the errno in the message
        return f"cannot write the {'feature cache' if 'lmdb' in type(e).__module__ else 'tensors'}: {e}"
    return None


def _error(message: str) -> None:
    """``error: <message>`` on a line of its own: a progress bar the error interrupted ends its line first."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)


def user_errors(fn: F) -> F:
    """Print ``error: <message>`` for user-caused failures instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OneEncoderError as e:
            _traceback(e)
            _error(str(e))
            raise typer.Exit(EXIT_USER_ERROR) from None
        except Exception as e:
            message = storage_message(e)
            if message is None:
                raise
            _traceback(e)
            _error(message)
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
    """A line of the command's result, on stdout (``--quiet`` keeps it)."""
    typer.echo(msg)


def note(msg: str) -> None:
    """A status line on stderr (a step begins, a sample was skipped); ``--quiet`` drops it."""
    status(msg)


CACHE_DIR_HELP = ("Feature cache to take backbone features from, for inputs it holds (default: <manifest "
                  "folder>/cache, else the cache the model was trained on).")
NO_CACHE_HELP = "Encode every input, even those a feature cache holds."


RUNTIME_HELP = ("Where the backbones run: torch, onnx (onnxruntime, the graph exported once per backbone) or "
                "auto (the fastest path on this machine that matches fp32 PyTorch to cosine 0.9999, measured "
                "once and remembered). Modalities whose backbone is no exportable graph stay on torch.")
PRECISION_HELP = "fp32 or bf16 (torch autocast; never chosen by --runtime auto)."


def prepared_model(prepared: "PreparedStage", device: Optional[str] = None, runtime: str = "torch",
                   precision: str = "fp32") -> "OneEncoder":
    """The inference API over the model ``prepare_stage`` loaded (not read twice)."""
    from oneencoder.apps.api import OneEncoder

    return OneEncoder.from_loaded(prepared.model_dir, prepared.model, prepared.meta, device, prepared.modalities,
                                  runtime=runtime, precision=precision)


def runtime_notes(m: "OneEncoder") -> None:
    """The path each backbone ran on, and its parity, when that was not plain PyTorch."""
    if (m.runtime, m.precision) == ("torch", "fp32"):
        return
    for line in m.runtime_notes:
        note(line)


@contextlib.contextmanager
def input_cache(prepared: "PreparedStage", modality: str, off: bool) -> Iterator[Optional["CachedFeatures"]]:
    """The cached features of ``modality`` for ``--cache-dir`` (None with ``--no-cache``), closed afterwards."""
    if off:
        yield None
        return
    with prepared.cached(modality) as cache:
        yield cache
