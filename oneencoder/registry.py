"""The one interface a modality implements, and the registry that finds it.

A modality owns everything upstream of the feature cache: reading a sample,
preprocessing it, running its frozen backbone. Everything trainable is core
and keyed by the modality's name.

Example:
    >>> @register_modality
    ... class Text(Modality):
    ...     spec = ModalitySpec(name="text", ...)
    >>> text = create_modality("text", max_tokens=32)
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

# Modules under oneencoder.modalities that register the built-in modalities.
_BUILTIN_MODULES = ("text", "image", "audio", "molecule", "depth", "video")


@dataclass(frozen=True)
class ModalitySpec:
    """Static facts about a modality and its default frozen backbone.

    Attributes:
        name: Registry key, also the key of its adapter and token.
        backbone: Default backbone id, e.g. ``"timm:tf_efficientnet_lite0"``.
        feature_dim: Width of each backbone token.
        max_tokens: Most tokens one sample can produce.
        preprocess_version: Bumped whenever preprocessing changes cached features.
        record_key: Manifest field that holds this modality's input.
        default_anchor: Modality it aligns to when added progressively.
        dedupe_in_eval: Identical inputs (same group) count once in retrieval.
        extra_deps: Packages beyond the core set, for the install hint.
    """

    name: str
    backbone: str
    feature_dim: int
    max_tokens: int
    preprocess_version: str
    record_key: str
    default_anchor: str | None = None
    dedupe_in_eval: bool = False
    extra_deps: tuple[str, ...] = field(default_factory=tuple)


class Modality(ABC):
    """Base class for a modality. Subclasses set ``spec`` and implement the hooks.

    Options from the stage file (``[modalities.<name>]``) arrive as keyword
    arguments; unknown options are a ``ConfigError``.
    """

    spec: ModalitySpec
    #: Options a stage file may set, with their defaults.
    default_options: dict[str, Any] = {}

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.default_options)
        if unknown:
            raise ConfigError(
                f"[modalities.{self.spec.name}] unknown option(s) {sorted(unknown)}; "
                f"known: {sorted(self.default_options)}"
            )
        self.options = {**self.default_options, **options}

    # ----- identity -------------------------------------------------------
    @property
    def backbone_id(self) -> str:
        return str(self.options.get("backbone") or self.spec.backbone)

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    @property
    def max_tokens(self) -> int:
        return self.spec.max_tokens

    @abstractmethod
    def weights_sha256(self) -> str:
        """Checksum of the backbone weights, part of the cache fingerprint."""

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes cached features. Caches with another value are refused."""
        return {
            "modality": self.spec.name,
            "backbone": self.backbone_id,
            "weights_sha256": self.weights_sha256(),
            "preprocess_version": self.spec.preprocess_version,
            "feature_dim": self.feature_dim,
            "max_tokens": self.max_tokens,
            "options": {k: v for k, v in sorted(self.options.items())},
        }

    # ----- hooks ------------------------------------------------------------
    @abstractmethod
    def load_backbone(self) -> nn.Module:
        """Return the frozen backbone in eval mode with ``requires_grad`` off."""

    @abstractmethod
    def load(self, source: Any) -> Any:
        """Read one raw input (a path, a string, a PIL image...). Raises ``SampleError``."""

    @abstractmethod
    def preprocess(self, raw: Any) -> Any:
        """Turn a raw input into what ``collate`` stacks. Raises ``SampleError``."""

    def collate(self, items: list[Any]) -> Any:
        """Stack preprocessed items into a batch (default: ``torch.stack``)."""
        return torch.stack(items)

    @abstractmethod
    def encode(self, backbone: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Return token features ``[B, T, D]`` and a bool mask ``[B, T]`` (True = real token)."""

    def language_slice(self) -> tuple[int, int] | None:
        """Dims of the first token that already live in the frozen text backbone's sentence
        space (e.g. a pooled sentence embedding), or None. Enables ``[model] language_prior``."""
        return None

    def difficulty(self, raw: Any, tokens: torch.Tensor) -> dict[str, float]:
        """Per-sample measurements for curriculum scorers (override per modality)."""
        return {}


_REGISTRY: dict[str, type[Modality]] = {}


def register_modality(cls: type[Modality]) -> type[Modality]:
    """Class decorator: make a modality available to ``create_modality``."""
    name = cls.spec.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"modality {name!r} is already registered by {_REGISTRY[name].__module__}")
    _REGISTRY[name] = cls
    return cls


def _import_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"oneencoder.modalities.{mod}")


def list_modalities() -> list[str]:
    """Names of every registered modality."""
    _import_builtins()
    return sorted(_REGISTRY)


def get_modality_class(name: str) -> type[Modality]:
    _import_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown modality {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def create_modality(name: str, **options: Any) -> Modality:
    """Instantiate a registered modality with stage-file options."""
    return get_modality_class(name)(**options)


