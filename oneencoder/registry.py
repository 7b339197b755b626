"""One registry for every pluggable kind: modalities, losses, pacers and difficulty scorers.

A registry maps names to classes, filled by a class decorator (as timm registers
models) and, for kinds that plugins extend, by the entry points of installed
distributions. ``create`` checks the options against what the class accepts, by
name and by type (:func:`oneencoder.options.check_options`), so a typo in a stage file is
one clear line, never a default.

Example:
    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register
    ... class InfoNCE(nn.Module):
    ...     name = "infonce"
    ...     def __init__(self, init_temperature: float = 0.07): ...
    >>> LOSSES.create("infonce", init_temperature=0.05)
"""

from __future__ import annotations

import importlib
import inspect
from importlib import metadata
from typing import Any, Callable, Generic, TypeVar

from .errors import ConfigError, MissingDependencyError
from .options import check_options

T = TypeVar("T")
C = TypeVar("C", bound=type)


def signature_defaults(cls: type) -> dict[str, Any]:
    """Keyword options of ``cls`` with their defaults, from its ``__init__`` and its bases'."""
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = vars(klass).get("__init__")
        if init is None or klass is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                out[p.name] = None if p.default is p.empty else p.default
    return out


def class_path(cls: type) -> str:
    """``"module:Qualname"``, the form entry points and model directories use."""
    return f"{cls.__module__}:{cls.__qualname__}"


def import_class(path: str) -> type:
    """The class named by ``"module:Qualname"``; ``ModuleNotFoundError`` propagates."""
    module_name, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


#: Appended to a plugin's import error: the one line hides the traceback, these show it.
DEBUG_HINT = "rerun with `oneencoder --debug ...` or ONEENCODER_DEBUG=1 for the traceback"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def import_plugins(modules: list[str] | tuple[str, ...], where: str = "--plugin") -> None:
    """Import plugin modules so their decorators register what they define.

    Raises:
        MissingDependencyError: A module, or one it imports, is not installed.
        ConfigError: Importing a module raised; one line naming the module and the exception,
            which stays chained (``__cause__``) for ``--debug`` to print.
    """
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                raise MissingDependencyError(
                    f"{where} {name}: no module named {e.name!r} here; install the package that provides it "
                    "(pip install -e <its folder>) or put its folder on PYTHONPATH") from None
            raise MissingDependencyError(f"{where} {name}: importing it needs the module {e.name!r}, which is not "
                                         f"installed ({DEBUG_HINT})") from e
        except Exception as e:  # the plugin's own code failed: its problem, in one line
            raise ConfigError(f"{where} {name}: importing it raised {_first_line(e)} ({DEBUG_HINT})") from e


def distribution_of(module: str) -> tuple[str, str] | None:
    """``(distribution name, version)`` that installed ``module``'s top-level package, if any."""
    top = module.split(".")[0]
    for dist in metadata.packages_distributions().get(top, []):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


class Registry(Generic[T]):
    """Names to classes, for one kind of pluggable part.

    Args:
        kind: What the registry holds, for messages ("modality", "loss"...).
        key: Reads a class's registry name (default: its ``name`` attribute).
        entry_points: Entry-point group whose ``name = "module:Class"`` entries are loaded
            on demand (installed plugins, and the built-ins declared in pyproject.toml).
        check: Called with each class at registration, to reject malformed ones early.
    """

    def __init__(self, kind: str, key: Callable[[type], str] = lambda cls: cls.name,
                 entry_points: str | None = None, check: Callable[[type], None] | None = None) -> None:
        self.kind = kind
        self._key = key
        self._group = entry_points
        self._check = check
        self._classes: dict[str, type[T]] = {}
        self._broken: dict[str, str] = {}  # entry point name -> why it cannot be imported
        self._entry_points_loaded = False

    def register(self, cls: C) -> C:
        """Class decorator: make ``cls`` available under its name."""
        name = self._key(cls)
        if not name:
            raise ValueError(f"{cls.__qualname__} needs a non-empty name to be registered as a {self.kind}")
        if self._check is not None:
            self._check(cls)
        old = self._classes.get(name)
        # The same class seen twice (a module imported under two names) is no conflict.
        if old is not None and class_path(old) != class_path(cls):
            raise ValueError(f"{self.kind} {name!r} is already registered by {class_path(old)}")
        self._classes[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Forget ``name`` (tests and interactive sessions that register throwaway classes)."""
        self._classes.pop(name, None)

    def _entry_points(self) -> list[metadata.EntryPoint]:
        return list(metadata.entry_points(group=self._group)) if self._group else []

    def _load_entry_point(self, ep: metadata.EntryPoint) -> None:
        try:
            cls = ep.load()
        except Exception as e:  # ImportError, or the plugin's own code raising on import
            why = e if isinstance(e, ImportError) else _first_line(e)
            raise MissingDependencyError(f"{self.kind} {ep.name!r} ({ep.value}, entry point of "
                                         f"{ep.dist.name if ep.dist else 'an installed package'}) "
                                         f"cannot be imported: {why}") from e
        if self._key(cls) not in self._classes:
            self.register(cls)

    def _load_all(self) -> None:
        """Load every entry point; one that cannot be imported must not hide the others."""
        if not self._entry_points_loaded:
            self._entry_points_loaded = True
            for ep in self._entry_points():
                if ep.name not in self._classes:
                    try:
                        self._load_entry_point(ep)
                    except MissingDependencyError as e:
                        self._broken[ep.name] = str(e)

    def names(self) -> list[str]:
        """Every registered name, installed plugins included."""
        self._load_all()
        return sorted(self._classes)

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; a ``ConfigError`` listing the known names if none is."""
        if name not in self._classes:
            if name in self._broken:
                raise MissingDependencyError(self._broken[name])
            for ep in self._entry_points():
                if ep.name == name:
                    self._load_entry_point(ep)
        if name not in self._classes:
            raise ConfigError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}"
                              + (" (a plugin's must be installed, or imported with --plugin MODULE)"
                                 if self._group else ""))
        return self._classes[name]

    def options(self, name: str) -> dict[str, Any]:
        """Options ``name`` accepts, with their defaults."""
        cls = self.get(name)
        defaults = getattr(cls, "default_options", None)
        return dict(defaults) if isinstance(defaults, dict) else signature_defaults(cls)

    def create(self, name: str, **options: Any) -> T:
        """An instance of ``name``; unknown options or values of the wrong type raise ``ConfigError``."""
        cls = self.get(name)
        check_options(f"{self.kind} {name!r}", self.options(name), options)
        return cls(**options)
