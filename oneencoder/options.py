"""Declared options: one schema, one checker and one error format for every option a user sets.

An option has a type (its default's kind), a default, and optionally a :class:`Range` and
choices. Stage-file sections (``[model]``, ``[train]``...) are dataclasses whose fields
declare their options with :func:`option`; a modality declares its ``default_options``
with :func:`declare`, and a plain dict of defaults (a plugin's) is judged by its defaults
(:func:`inferred`). Rules between two options (``d_model`` a multiple of ``heads``) stay
small explicit checks next to their dataclass.

Every error is one line: ``<where> <option> must <requirement>, got <value>``, or
``<where>: unknown option(s) [...]; known: [...]``.

Example:
    >>> @dataclass
    ... class Shape:
    ...     width: int = option(256, range=AT_LEAST_1)
    ...     pool: str = option("mean", choices=("mean", "token"))
    >>> parse_section(Shape, {"width": 0}, "shape.toml: [shape]")
    Traceback (most recent call last):
    ConfigError: shape.toml: [shape] width must be >= 1 (a finite number), got 0
    >>> default_options = declare({"radius": option(2, range=NON_NEGATIVE), "name": "x"})
    >>> parse_options("[modalities.m]", default_options, {"radius": 3})
    {'radius': 3, 'name': 'x'}
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, TypeVar

from .errors import ConfigError

T = TypeVar("T")

#: Key of an option's declaration in a dataclass field's metadata.
OPTION = "oneencoder.option"


@dataclass(frozen=True)
class Range:
    """Allowed interval of a number: ``lo`` and ``hi`` (None: unbounded), each included or not."""

    lo: float | None = None
    lo_in: bool = True
    hi: float | None = None
    hi_in: bool = True

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = self.lo is None or value > self.lo or (self.lo_in and value == self.lo)
        below = self.hi is None or value < self.hi or (self.hi_in and value == self.hi)
        return above and below

    def words(self) -> str:
        """``Range(0, True, 1, False)`` -> ``"in [0, 1)"``; ``Range(0, False)`` -> ``"> 0"``."""
        if self.hi is None:
            return f"{'>=' if self.lo_in else '>'} {self.lo}"
        if self.lo is None:
            return f"{'<=' if self.hi_in else '<'} {self.hi}"
        return f"in {'[' if self.lo_in else '('}{self.lo}, {self.hi}{']' if self.hi_in else ')'}"


POSITIVE = Range(0, False)
NON_NEGATIVE = Range(0, True)
AT_LEAST_1 = Range(1, True)
SHARE = Range(0, True, 1, True)  # [0, 1]
OPEN_SHARE = Range(0, True, 1, False)  # [0, 1): a dropout, a floor that must leave room above it

#: Fixed names, or a callable giving them when checked (a registry's ``names``, so that
#: parts registered by plugins are accepted).
Choices = tuple[str, ...] | Callable[[], Iterable[str]]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    """Whether every float in ``value`` (and in its lists and tables) is finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


def same_kind(default: Any, value: Any) -> bool:
    """Whether ``value`` may replace ``default`` (TOML gives lists for tuples, ints for floats)."""
    if default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table",
               list: "a list", tuple: "a list"}


@dataclass(frozen=True)
class Option:
    """One declared option.

    A default that is a non-empty list of numbers (a per-channel mean) asks for a list of as
    many numbers; ``range`` then applies to each of them.

    Attributes:
        default: The value when none is given; its kind is the option's type.
        range: Allowed interval of a number, or None (any finite number).
        choices: Allowed strings, or a callable giving them, or None (any string).
    """

    default: Any
    range: Range | None = None
    choices: Choices | None = None

    def names(self) -> list[str]:
        """The allowed choices (empty when any value of the type is)."""
        if self.choices is None:
            return []
        return list(self.choices() if callable(self.choices) else self.choices)

    def _numbers(self) -> int | None:
        d = self.default
        return len(d) if isinstance(d, (list, tuple)) and d and all(map(_is_number, d)) else None

    def requirement(self, value: Any) -> str | None:
        """What ``value`` fails, as the words after "must", or None when it is allowed."""
        n = self._numbers()
        if n is not None:
            ok = (isinstance(value, (list, tuple)) and len(value) == n
                  and all(_is_number(v) and (v in self.range if self.range else math.isfinite(v)) for v in value))
            rule = f" {self.range.words()}" if self.range else ""
            return None if ok else f"be a list of {n} finite numbers{rule} (like its default {list(self.default)!r})"
        if not same_kind(self.default, value):
            kind = type(self.default)
            return f"be {_KIND_WORDS.get(kind, 'a ' + kind.__name__)}"
        if self.range is not None and _is_number(value) and value not in self.range:
            return f"be {self.range.words()} (a finite number)"
        if not _finite(value):
            return "be finite" if isinstance(value, float) else "hold finite numbers"
        names = self.names()
        if names and value not in names:
            return f"be one of {', '.join(map(repr, names))}"
        return None

    def check(self, where: str, key: str, value: Any) -> None:
        """Raise the one-line ``ConfigError`` if ``value`` is not allowed."""
        need = self.requirement(value)
        if need is not None:
            raise ConfigError(f"{where} {key} must {need}, got {value!r}")


def option(default: Any, *, range: Range | None = None, choices: Choices | None = None) -> Any:
    """Declare one option: a dataclass field (a list or table default is copied per instance),
    also accepted as a value of :func:`declare`'s table."""
    meta = {OPTION: Option(default, range, tuple(choices) if isinstance(choices, (list, tuple)) else choices)}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def inferred(default: Any) -> Option:
    """An undeclared option, judged by its default: a positive number (a size, a count, a scale)
    must stay positive, a zero must not turn negative, a list of numbers keeps its length."""
    if _is_number(default):
        return Option(default, POSITIVE if default > 0 else NON_NEGATIVE if default == 0 else None)
    return Option(default)


class Declared(dict):
    """Option name -> default (what a plain ``default_options`` dict holds), plus each option's
    declaration in ``specs``."""

    def __init__(self, specs: dict[str, Option]) -> None:
        super().__init__({k: s.default for k, s in specs.items()})
        self.specs = specs


def _spec(value: Any) -> Option:
    if isinstance(value, dataclasses.Field) and OPTION in value.metadata:
        return value.metadata[OPTION]
    return inferred(value)


def declare(table: Mapping[str, Any]) -> Declared:
    """Modality options: each value is a plain default or an :func:`option` declaration.

    Example:
        >>> default_options = declare({"backbone": "hog", "cells": option(4, range=AT_LEAST_1)})
        >>> default_options["cells"]
        4
    """
    return Declared({k: _spec(v) for k, v in table.items()})


def declarations(source: Any) -> dict[str, Option]:
    """The declaration of every option of a section dataclass (class or instance), a
    :class:`Declared` table, or a plain dict of defaults (judged by :func:`inferred`)."""
    if dataclasses.is_dataclass(source):
        fields = dataclasses.fields(source)
        return {f.name: f.metadata.get(OPTION) or Option(f.default if f.default is not dataclasses.MISSING
                                                         else f.default_factory())  # type: ignore[misc]
                for f in fields}
    if isinstance(source, Declared):
        return dict(source.specs)
    return {k: _spec(v) for k, v in source.items()}


def _unknown(where: str, known: Iterable[str], given: Iterable[str]) -> None:
    unknown = set(given) - set(known)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")


def check_options(where: str, defaults: Mapping[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``given``, checked by name and type only (a registered part's
    constructor options: ranges are its own business)."""
    _unknown(where, defaults, given)
    for key, value in given.items():
        if not same_kind(defaults[key], value):
            Option(defaults[key]).check(where, key, value)
    return {**defaults, **given}


def parse_options(where: str, defaults: Mapping[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Every option of ``defaults`` (see :func:`declarations`), ``given`` ones replacing theirs,
    checked by name, type, range, choices and finiteness.

    Raises:
        ConfigError: One line naming the first option that is unknown or not allowed.
    """
    specs = declarations(defaults)
    _unknown(where, specs, given)
    values = {k: copy.deepcopy(s.default) for k, s in specs.items()} | given
    for key in given:  # a wrong type first: it explains a range that could not be read
        if not same_kind(specs[key].default, given[key]):
            specs[key].check(where, key, given[key])
    for key, value in values.items():
        specs[key].check(where, key, value)
    return values


def check_section(values: Any, where: str) -> None:
    """Every option of a section dataclass instance allowed by its declaration."""
    for key, spec in declarations(type(values)).items():
        spec.check(where, key, getattr(values, key))


def parse_section(cls: type[T], raw: Any, where: str) -> T:
    """``cls`` (a section dataclass) from a table, every value checked (:func:`check_section`).

    Raises:
        ConfigError: ``raw`` is no table, or holds an unknown option or one that is not allowed.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    specs = declarations(cls)
    _unknown(where, specs, raw)
    for key, value in raw.items():  # type first: a string where a number belongs cannot build cls
        if not same_kind(specs[key].default, value):
            specs[key].check(where, key, value)
    values = cls(**raw)
    check_section(values, where)
    return values
