"""Trainable parts: per-modality adapters with modality tokens, and the Universal Projection.

``tokens [B, T, D_m] --Adapter--> [B, T, d] --prepend modality token--> UniversalProjection
--> pool --> L2-normalised embedding [B, d]``
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..options import AT_LEAST_1, NON_NEGATIVE, OPEN_SHARE, POSITIVE, option, parse_section


@dataclass
class ProjectionConfig:
    """Universal Projection shape (``[model]`` of a stage file, stored in ``oneencoder.json``)."""

    d_model: int = option(256, range=AT_LEAST_1)
    layers: int = option(2, range=AT_LEAST_1)
    heads: int = option(4, range=AT_LEAST_1)
    mlp_ratio: float = option(2.0, range=POSITIVE)
    dropout: float = option(0.1, range=OPEN_SHARE)
    # mean over real tokens, or "token": the modality token's output
    pool: str = option("mean", choices=("mean", "token"))
    # Residual blend with a frozen language-space prior (as CLIP-Adapter blends adapted and
    # original features): embedding = [sqrt(1-w) * learned, sqrt(w) * frozen sentence-space vector].
    # Modalities without such a vector contribute zeros there, so their rankings use the learned part.
    language_prior: float = option(0.0, range=OPEN_SHARE)
    # How the prior meets the learned part. "concat": [learned, prior], two subspaces, so text's
    # learned part is trained too; "sum": the projection maps into the sentence space itself and
    # the embedding is sqrt(1-w)·learned + sqrt(w)·prior there, as LiT/ShareLock align images to
    # a locked text space. With `[adapter.text] language_only = true`, text is its frozen sentence
    # vector alone. "sum" generalised best to unseen captions (docs/results.md).
    language_blend: str = option("concat", choices=("concat", "sum"))
    # Width of that frozen vector: 0 = read from the modalities' language slices (the text
    # backbone's sentence width); set by hand only to insist on a width.
    language_dim: int = option(0, range=NON_NEGATIVE)


@dataclass
class AdapterConfig:
    """Per-modality adapter shape (``[adapter]``, stored per modality in ``oneencoder.json``)."""

    hidden: int = option(512, range=NON_NEGATIVE)  # 0: a single linear map (LayerNorm + Linear)
    dropout: float = option(0.1, range=OPEN_SHARE)
    positions: bool = True  # learned per-position embedding (grid cells, frames)
    # For a modality without a frozen language vector, under a language prior: predict that
    # vector from the adapted tokens instead of leaving zeros, so the modality can match the
    # sentence-space part that dominates text embeddings. Trained with (and stored in) the adapter.
    language_head: bool = False
    # Under a "sum" language blend: this modality's embedding is its frozen language vector alone
    # (LiT's locked text tower), so the other modalities learn to meet the frozen sentence space.
    language_only: bool = False


def projection_from_dict(raw: Any, where: str) -> ProjectionConfig:
    """``[model]`` of a stage file, or the projection ``oneencoder.json`` records, checked.

    Raises:
        ConfigError: An option is unknown or not allowed, or ``d_model`` is no multiple of ``heads``.
    """
    config = parse_section(ProjectionConfig, raw, where)
    if config.d_model % config.heads:  # the attention heads split d_model evenly
        raise ConfigError(f"{where} d_model must be a multiple of heads = {config.heads}, got {config.d_model}")
    return config


def adapter_from_dict(raw: Any, where: str) -> AdapterConfig:
    """``[adapter]`` of a stage file, or an adapter ``oneencoder.json`` records, checked."""
    return parse_section(AdapterConfig, raw, where)


class Adapter(nn.Module):
    """Per-token MLP from backbone width to ``d_model``, plus this modality's token.

    Args:
        in_dim: Backbone feature width.
        d_model: Shared width of the Universal Projection.
        max_tokens: Longest token sequence (size of the position table).
        config: Hidden width, dropout, positions.
    """

    def __init__(self, in_dim: int, d_model: int, max_tokens: int, config: AdapterConfig) -> None:
        super().__init__()
        if config.hidden > 0:
            layers = [nn.Linear(in_dim, config.hidden), nn.GELU(), nn.Dropout(config.dropout),
                      nn.Linear(config.hidden, d_model)]
        else:
            layers = [nn.Dropout(config.dropout), nn.Linear(in_dim, d_model)]
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), *layers)
        self.modality_token = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.positions = nn.Parameter(torch.zeros(1, max_tokens, d_model)) if config.positions else None
        # A language prior's predicted head, when it has one, is kept here so that it is saved
        # and locked with the adapter; only LanguagePrior uses it.
        self.language_head: nn.Module | None = None

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.mlp(tokens)
        if self.positions is not None:
            x = x + self.positions[:, : x.shape[1]]
        token = self.modality_token.expand(x.shape[0], -1, -1)
        x = torch.cat([token, x], dim=1)
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        return x, mask


class UniversalProjection(nn.Module):
    """Masked transformer encoder shared by every modality; pools and L2-normalises."""

    def __init__(self, config: ProjectionConfig, out_dim: int | None = None) -> None:
        super().__init__()
        if config.pool not in ("mean", "token"):
            raise ValueError(f"pool must be 'mean' or 'token', got {config.pool!r}")
        self.config = config
        layer = nn.TransformerEncoderLayer(
            config.d_model, config.heads, int(config.d_model * config.mlp_ratio), config.dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        # Nested tensors change numerics between train/eval; keep one code path.
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, out_dim or config.d_model, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x ``[B, T, d]``, mask ``[B, T]`` with True on real tokens. Returns ``[B, out_dim]``, unit norm."""
        h = self.norm(self.encoder(x, src_key_padding_mask=~mask))
        if self.config.pool == "token":
            pooled = h[:, 0]
        else:
            w = mask.to(h.dtype).unsqueeze(-1)
            pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        return F.normalize(self.head(pooled), dim=-1)


PRIOR_SOURCES = ("none", "slice", "head")


class LanguagePrior(nn.Module):
    """Residual blend with a frozen sentence-space vector, as CLIP-Adapter blends adapted and original
    features: ``[sqrt(1 - w) * learned, sqrt(w) * v]`` (``blend = "concat"``), unit norm when
    ``learned`` and ``v`` are; or ``normalize(sqrt(1 - w) * learned + sqrt(w) * v)`` (``"sum"``),
    where ``learned`` lives in the sentence space itself and a ``language_only`` modality is ``v`` alone.

    Each modality gets ``v`` from one source: ``"slice"``, dims of its first backbone token
    that already live in the text backbone's sentence space; ``"head"``, a linear head on
    its adapted tokens (trained with its adapter); or ``"none"``, zeros (its rankings then
    use the learned part alone).

    Args:
        weight: ``w`` in [0, 1); 0 turns the prior off (the embedding is ``learned``).
        width: Width of ``v`` (the text backbone's sentence width).
        blend: ``"concat"`` or ``"sum"``.
    """

    def __init__(self, weight: float, width: int, blend: str = "concat") -> None:
        super().__init__()
        self.weight, self.width, self.blend = float(weight), int(width), blend
        self.sources: dict[str, str] = {}
        self.slices: dict[str, tuple[int, int]] = {}
        self.language_only: set[str] = set()

    @property
    def summed(self) -> bool:
        """The learned part lives in the sentence space (``blend = "sum"`` with a prior)."""
        return self.enabled and self.blend == "sum" and self.width > 0

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    def source_for(self, name: str, language_slice: tuple[int, int] | None, head: bool,
                   language_only: bool = False) -> str:
        """Validate and record where ``name``'s vector comes from; returns the source."""
        if not self.enabled:
            source = "none"
        elif language_slice is not None:
            start, end = int(language_slice[0]), int(language_slice[1])
            if end - start != self.width:
                raise ConfigError(f"modality {name!r}: its language slice is {end - start} wide, but the model's "
                                  f"language space is {self.width} wide (a different text backbone?)")
            self.slices[name] = (start, end)
            source = "slice"
        else:
            source = "head" if head else "none"
        if language_only:
            if not self.summed or source == "none":
                raise ConfigError(f"modality {name!r}: [adapter] language_only needs [model] language_blend = "
                                  "\"sum\", language_prior > 0 and a language vector (a slice or language_head)")
            self.language_only.add(name)
        self.sources[name] = source
        return source

    def vector(self, name: str, tokens: torch.Tensor, adapted: torch.Tensor, mask: torch.Tensor,
               head: nn.Module | None) -> torch.Tensor | None:
        """``[B, width]`` unit vector for ``name``, or None when it has none."""
        source = self.sources.get(name, "none")
        if source == "slice":
            start, end = self.slices[name]
            return F.normalize(tokens[:, 0, start:end], dim=-1)
        if source == "head":  # from the mean of the adapted tokens, the modality token excluded
            w = mask[:, 1:].to(adapted.dtype).unsqueeze(-1)
            pooled = (adapted[:, 1:] * w).sum(1) / w.sum(1).clamp_min(1.0)
            return F.normalize(head(pooled), dim=-1)
        return None

    def forward(self, learned: torch.Tensor, vector: torch.Tensor | None, name: str | None = None) -> torch.Tensor:
        if not self.enabled:
            return learned
        if self.summed:
            if vector is None:
                return learned
            if name in self.language_only:
                return vector.to(learned.dtype)
            return F.normalize(learned * (1 - self.weight) ** 0.5 + vector.to(learned.dtype) * self.weight**0.5, dim=-1)
        if vector is None:
            return torch.cat([learned, learned.new_zeros(learned.shape[0], self.width)], -1)
        return torch.cat([learned * (1 - self.weight) ** 0.5, vector.to(learned.dtype) * self.weight**0.5], dim=-1)


class OneEncoderModel(nn.Module):
    """All trainable parameters: one adapter per modality and the shared projection."""

    def __init__(self, projection: ProjectionConfig) -> None:
        super().__init__()
        self.projection_config = projection
        self.prior = LanguagePrior(projection.language_prior, projection.language_dim, projection.language_blend)
        self.projection = UniversalProjection(projection, projection.language_dim if self.prior.summed else None)
        self.adapters = nn.ModuleDict()
        self.adapter_configs: dict[str, AdapterConfig] = {}
        self._locked: list[nn.Module] = []

    @property
    def modalities(self) -> list[str]:
        return list(self.adapters)

    @property
    def embed_dim(self) -> int:
        """Width of the output embedding."""
        cfg = self.projection_config
        if self.prior.summed:
            return cfg.language_dim
        return cfg.d_model + (cfg.language_dim if cfg.language_prior > 0 else 0)

    def add_adapter(self, name: str, facts: dict, config: AdapterConfig) -> Adapter:
        """Add a modality's adapter from its recorded facts (``feature_dim``, ``max_tokens``,
        ``language_slice``), as ``oneencoder.json`` and ``modality_meta`` hold them."""
        return self.add_modality(name, int(facts["feature_dim"]), int(facts["max_tokens"]), config,
                                 facts.get("language_slice"))

    def add_modality(self, name: str, feature_dim: int, max_tokens: int, config: AdapterConfig | None = None,
                     language_slice: tuple[int, int] | None = None) -> Adapter:
        """Add a modality's adapter. ``language_slice``: dims of its first token that already
        live in the frozen language space (used only with ``language_prior > 0``)."""
        config = config or AdapterConfig()
        source = self.prior.source_for(name, language_slice, config.language_head, config.language_only)
        adapter = Adapter(feature_dim, self.projection_config.d_model, max_tokens, config)
        if source == "head":
            adapter.language_head = nn.Linear(self.projection_config.d_model, self.prior.width)
        self.adapters[name] = adapter
        self.adapter_configs[name] = config
        return adapter

    def forward(self, modality: str, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        adapter = self.adapters[modality]
        x, adapted_mask = adapter(tokens, mask)
        learned = self.projection(x, adapted_mask)
        return self.prior(learned, self.prior.vector(modality, tokens, x, adapted_mask, adapter.language_head), modality)

    # open_clip-style locking: frozen parts are eval-mode and grad-free.
    def lock_projection(self) -> None:
        self._lock(self.projection)

    def lock_adapter(self, name: str) -> None:
        self._lock(self.adapters[name])

    def _lock(self, module: nn.Module) -> None:
        for p in module.parameters():
            p.requires_grad_(False)
        self._locked.append(module)
        module.eval()

    def train(self, mode: bool = True) -> "OneEncoderModel":
        super().train(mode)
        for module in self._locked:  # locked parts stay in eval (no dropout) while training others
            module.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        """Names of the weights AdamW must not decay, besides biases and norms (every parameter
        under 2-D): the modality tokens and position tables, as CLIP/open_clip leave their
        embeddings undecayed (timm's ``no_weight_decay`` convention)."""
        return {f"adapters.{name}.{part}" for name, adapter in self.adapters.items()
                for part in ("modality_token", "positions") if getattr(adapter, part) is not None}


def language_width(facts: dict[str, dict]) -> int:
    """Width of the language space the modalities' frozen slices share (0 if none has one).

    Raises:
        ConfigError: Two modalities bring slices of different widths.
    """
    widths = {n: f["language_slice"][1] - f["language_slice"][0] for n, f in facts.items() if f.get("language_slice")}
    if len(set(widths.values())) > 1:
        raise ConfigError(f"the modalities' language slices differ in width ({widths}); their sentence-space "
                          "parts must come from one text backbone")
    return next(iter(widths.values()), 0)


def build_model(projection: ProjectionConfig, facts: dict[str, dict], adapters: dict[str, AdapterConfig]) -> OneEncoderModel:
    """A model with one adapter per modality, the language width read from the modalities.

    The one factory behind a new Stage 1, ``load_model`` and the benchmarks.

    Args:
        projection: Universal Projection shape (``language_dim`` 0 = from the modalities).
        facts: Modality -> ``feature_dim``, ``max_tokens``, ``language_slice``.
        adapters: Modality -> adapter shape.
    """
    width = language_width(facts)
    if projection.language_prior > 0 and width:
        if projection.language_dim not in (0, width):
            raise ConfigError(f"[model] language_dim = {projection.language_dim}, but the modalities' language "
                              f"slices are {width} wide; leave language_dim out to take it from the backbones")
        projection = replace(projection, language_dim=width)
    model = OneEncoderModel(projection)
    for name, f in facts.items():
        model.add_adapter(name, f, adapters[name])
    return model
