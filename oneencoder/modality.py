"""The one interface a modality implements, and where modalities are found.

A modality owns everything upstream of the feature cache: reading a sample,
preprocessing it, running its frozen backbone. Everything trainable is core
and keyed by the modality's name.

Modalities are found in three ways: the built-ins and installed plugins through
the entry-point group ``oneencoder.modalities``; modules imported explicitly
(``oneencoder --plugin MODULE``, or ``[stage] plugins``); and, when a model is
loaded, the ``"module:Qualname"`` its directory records for each modality.

Example:
    >>> @register_modality
    ... class Sketch(Modality):
    ...     spec = ModalitySpec(name="sketch", backbone="hog", preprocess_version="v1", record_key="sketch")
    >>> sketch = create_modality("sketch", cells=4)
"""

from __future__ import annotations

import random
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, MissingDependencyError
from .options import parse_options
from .registry import Registry, class_path, distribution_of, import_class

ENTRY_POINT_GROUP = "oneencoder.modalities"


@dataclass(frozen=True)
class ModalitySpec:
    """Static facts about a modality. Widths are not here: they come from the backbone.

    Attributes:
        name: Registry key, also the key of its adapter and token.
        backbone: Default backbone id, e.g. ``"timm:tf_efficientnet_lite0"``.
        preprocess_version: Bumped whenever preprocessing changes cached features.
        record_key: Manifest field that holds this modality's input.
        reads_files: The input is a file path (resolved against the manifest's folder).
        default_anchor: Modality it aligns to when added progressively.
        dedupe_in_eval: Identical inputs (same group) count once in retrieval.
        metric_style: ``"recall"`` (R@K) or ``"ranking"`` (MRR and Hits@K, as Text2Mol reports).
        extra_deps: Packages beyond the core set, for the install hint.
        typed_query: Name of the box in which ``oneencoder serve`` takes a typed query of this
            modality (``"smiles"``: a SMILES string), or None: its queries are not typed (a
            modality that reads files takes an uploaded file).
        typed_query_label: That box's label on the page (default: the modality's name).
        typed_query_example: A placeholder shown in the empty box.
    """

    name: str
    backbone: str
    preprocess_version: str
    record_key: str
    reads_files: bool = False
    default_anchor: str | None = None
    dedupe_in_eval: bool = False
    metric_style: str = "recall"
    extra_deps: tuple[str, ...] = field(default_factory=tuple)
    typed_query: str | None = None
    typed_query_label: str = ""
    typed_query_example: str = ""


class Modality(ABC):
    """Base class for a modality. Subclasses set ``spec`` and implement the hooks.

    Options from the stage file (``[modalities.<name>]``) arrive as keyword
    arguments, checked by :func:`oneencoder.options.parse_options`: an unknown option,
    a value of another type than the default, or one outside its declared range or
    choices is a ``ConfigError``.
    """

    spec: ModalitySpec
    #: Options a stage file may set, with their defaults: ``declare({...})`` with
    #: ``option(default, range=..., choices=...)`` values, or plain defaults (a positive
    #: number then stays positive, a zero non-negative, a list of numbers keeps its length).
    default_options: dict[str, Any] = {}
    #: Extensions (lower case) of this modality's input files: folders to index, uploads to search.
    file_extensions: tuple[str, ...] = ()
    #: Array rank of one raw input (3 for an HWC image); ``encode`` splits an array of one rank
    #: more along its first axis. None: arrays are passed whole.
    input_ndim: int | None = None

    def example_inputs(self) -> list[Any]:
        """A few raw inputs of different sizes, for exporting the backbone (``oneencoder export onnx
        --with-backbone``); empty (the default) when the backbone is not an exportable graph."""
        return []

    def __init__(self, **options: Any) -> None:
        self.options = parse_options(f"[modalities.{self.spec.name}]", self.default_options, options)

    # ----- identity -------------------------------------------------------
    @property
    def backbone_id(self) -> str:
        return str(self.options.get("backbone") or self.spec.backbone)

    @property
    @abstractmethod
    def feature_dim(self) -> int:
        """Width of each backbone token, read from the backbone (its config or a probe)."""

    @property
    @abstractmethod
    def max_tokens(self) -> int:
        """Most tokens one sample can produce with these options."""

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

    def bind(self, peers: dict[str, "Modality"]) -> None:
        """Adopt settings from the other modalities of the same stage (default: nothing).

        Called once all of a stage's modalities exist, before any fingerprint is taken;
        e.g. an image modality puts its label semantics in the text modality's space.
        """

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
        """Stack preprocessed items into a batch.

        Tensors of one shape are stacked; tensors ``[n_i, ...]`` of different lengths
        are zero-padded to the longest and come with a mask ``[B, n_max]`` as
        ``{"values": ..., "mask": ...}``.
        """
        if all(t.shape == items[0].shape for t in items):
            return torch.stack(items)
        width = max(t.shape[0] for t in items)
        values = items[0].new_zeros((len(items), width, *items[0].shape[1:]))
        mask = torch.zeros((len(items), width), dtype=torch.bool)
        for row, t in enumerate(items):
            values[row, : t.shape[0]] = t
            mask[row, : t.shape[0]] = True
        return {"values": values, "mask": mask}

    @abstractmethod
    def encode(self, backbone: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Return token features ``[B, T, D]`` and a bool mask ``[B, T]`` (True = real token)."""

    # ----- the one featurize path: cache builds, the API and the benchmarks all use it ----
    def prepare(self, source: Any) -> tuple[Any, Any]:
        """``load`` then ``preprocess`` one input (what DataLoader workers run): ``(raw, item)``."""
        raw = self.load(source)
        return raw, self.preprocess(raw)

    def featurize(self, backbone: nn.Module, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``collate`` then ``encode`` prepared items: tokens ``[B, T, D]`` and mask ``[B, T]``."""
        return self.encode(backbone, self.collate(items))

    def language_slice(self) -> tuple[int, int] | None:
        """Dims of the first token that already live in the frozen text backbone's sentence
        space (e.g. a pooled sentence embedding), or None. Enables ``[model] language_prior``."""
        return None

    def difficulty(self, raw: Any, tokens: torch.Tensor) -> dict[str, float]:
        """Per-sample measurements for curriculum scorers (override per modality)."""
        return {}

    # ----- optional: augmented views (``cache build --views K``) --------------------
    def view_recipe(self) -> dict[str, Any] | None:
        """What :meth:`augment` does, as JSON; it joins the views' cache fingerprint, so a changed
        recipe rebuilds them. None (the default): the modality offers no augmented views."""
        return None

    def augment(self, raw: Any, rng: random.Random) -> Any:
        """One augmented view of a loaded input, drawn with ``rng`` only (so views are reproducible);
        returns a new raw input for :meth:`preprocess` and leaves ``raw`` unchanged."""
        raise NotImplementedError(f"modality {self.spec.name!r} offers no augmented views")

    # ----- optional: corruptions (``eval --robustness``) ---------------------------------
    def corruptions(self) -> dict[str, tuple[float, ...]]:
        """Kinds of corruption :meth:`corrupt` applies, each with its strengths listed from the
        mildest to the strongest (e.g. ``{"noise": (20.0, 10.0, 0.0)}``: SNR in dB). Empty (the
        default): ``eval --robustness`` leaves this modality's queries clean."""
        return {}

    def corrupt(self, raw: Any, kind: str, strength: float, rng: random.Random) -> Any:
        """A corrupted copy of a loaded input (one of :meth:`corruptions`' kinds, at ``strength``),
        drawn with ``rng`` only, so it is reproducible; returns a new raw input for :meth:`preprocess`
        and leaves ``raw`` unchanged. It must not fail on an input :meth:`load` accepted."""
        raise NotImplementedError(f"modality {self.spec.name!r} offers no corruptions")

    def depict(self, value: Any) -> str | None:
        """A picture of one input, as the manifest gives it, for a results page: an SVG string, or
        None (the default: the page shows the input as text, or serves its file).

        ``oneencoder serve`` runs it in a worker process under a time limit; an override still
        bounds its own cost, since drawing can grow much faster than the input.
        """
        return None


def _check_modality(cls: type) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Modality)):
        raise TypeError(f"{cls!r} is not a subclass of oneencoder.Modality")
    if not isinstance(getattr(cls, "spec", None), ModalitySpec):
        raise TypeError(f"{class_path(cls)} needs a `spec = ModalitySpec(...)`")
    if cls.spec.metric_style not in ("recall", "ranking"):
        raise TypeError(f"{class_path(cls)}: spec.metric_style must be 'recall' or 'ranking'")


MODALITIES: Registry[Modality] = Registry("modality", key=lambda cls: cls.spec.name,
                                          entry_points=ENTRY_POINT_GROUP, check=_check_modality)
register_modality = MODALITIES.register


def list_modalities() -> list[str]:
    """Names of every registered modality, installed plugins included."""
    return MODALITIES.names()


def get_modality_class(name: str) -> type[Modality]:
    return MODALITIES.get(name)


def create_modality(name: str, **options: Any) -> Modality:
    """Instantiate a registered modality with stage-file options."""
    return MODALITIES.get(name)(**options)


def create_stage_modalities(options: dict[str, dict[str, Any]], names: list[str] | tuple[str, ...]) -> dict[str, Modality]:
    """The modalities of one stage, created from their options and bound to each other."""
    modalities = {n: create_modality(n, **options.get(n, {})) for n in names}
    for m in modalities.values():
        m.bind(modalities)
    return modalities


def file_fields() -> set[str]:
    """Manifest fields that hold file paths (``record_key`` of modalities that read files)."""
    return {MODALITIES.get(n).spec.record_key for n in MODALITIES.names() if MODALITIES.get(n).spec.reads_files}


def provenance(modality: Modality) -> dict[str, Any]:
    """Where a modality's class comes from, as the model directory records it."""
    cls = type(modality)
    dist = distribution_of(cls.__module__)
    return {"class": class_path(cls), "distribution": dist[0] if dist else None,
            "distribution_version": dist[1] if dist else None}


def _old_name_of(cls: type, path: str) -> bool:
    """Whether ``path`` names ``cls`` by an alias its own module keeps (a name from before a
    rename, as older model directories record it); nothing is imported to find out."""
    module, _, qualname = path.partition(":")
    return module == cls.__module__ and getattr(sys.modules.get(module), qualname, None) is cls


def modality_class_for(name: str, info: dict[str, Any]) -> type[Modality]:
    """The class a model directory recorded for ``name``: registered, or imported from its record.

    Nothing is imported from a path inside the model directory: only installed or
    importable modules, named by ``info["class"]``.
    """
    path = info.get("class")
    if name in MODALITIES:
        cls = MODALITIES.get(name)
        if path and class_path(cls) != path and not _old_name_of(cls, path):
            raise ConfigError(f"modality {name!r} is registered by {class_path(cls)}, but the model was "
                              f"trained with {path}")
        return cls
    if not path:
        return MODALITIES.get(name)  # the usual unknown-modality error
    try:
        cls = import_class(path)
    except (ModuleNotFoundError, AttributeError):
        dist = info.get("distribution")
        how = (f"install the distribution {dist}{'==' + info['distribution_version'] if info.get('distribution_version') else ''}"
               if dist else "put the module that defines it on PYTHONPATH")
        raise MissingDependencyError(f"modality {name!r} is defined by {path}, which is not importable here; "
                                     f"{how}") from None
    if name not in MODALITIES:
        try:
            MODALITIES.register(cls)
        except (AttributeError, TypeError, ValueError) as e:  # the record names something that is no modality class
            raise ConfigError(f"modality {name!r}: the model records the class {path}, which is not one ({e})") from None
    return MODALITIES.get(name)
