"""A trained caption decoder with what it needs at inference, saved in the model directory.

::

    model/decoder/
      decoder.safetensors   the CaptionDecoder's weights
      memory.safetensors    the training captions' embeddings (DeCap projection, retrieval baseline)
      decoder.json          shapes, vocabulary, training captions, chosen options

``oneencoder.json`` records each file's sha256 (``files``) and a summary under ``decoder``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ..errors import OneEncoderError
from ..model.checkpoint import read_meta, save_part, verify_files
from ..model.transaction import visible_path
from .decoder import CaptionDecoder, DecoderConfig, Vocabulary

PART = "decoder"
PROJECTIONS = ("none", "memory")


@dataclass
class Captioner:
    """A decoder, its vocabulary and its caption memory.

    Attributes:
        projection: ``"none"`` decodes the embedding as it is; ``"memory"`` first replaces it by
            the softmax-weighted mean of the training captions' embeddings (DeCap), which
            puts any modality's embedding where the decoder was trained: among texts.
        temperature: Softmax temperature of that projection.
    """

    decoder: CaptionDecoder
    vocab: Vocabulary
    memory: torch.Tensor  # [M, d] unit rows: embeddings of the training captions
    captions: list[str]  # the M training captions, row by row
    projection: str = "none"
    temperature: float = 0.01
    prior: str = ""  # the text-only baseline: the most frequent training caption

    def condition(self, embedding: torch.Tensor, projection: str | None = None) -> torch.Tensor:
        """What the decoder reads for ``embedding`` ``[B, d]`` under ``projection``."""
        projection = projection or self.projection
        if projection not in PROJECTIONS:
            raise OneEncoderError(f"projection {projection!r}: use one of {', '.join(PROJECTIONS)}")
        embedding = torch.nn.functional.normalize(embedding.float().to(self.memory.device), dim=-1)
        if projection == "none":
            return embedding
        weights = (embedding @ self.memory.t() / self.temperature).softmax(-1)
        return torch.nn.functional.normalize(weights @ self.memory, dim=-1)

    def describe(self, embedding: torch.Tensor, n: int = 1, beam: int = 3, sample: bool = False,
                 temperature: float = 1.0, top_p: float = 0.9, seed: int = 0,
                 projection: str | None = None) -> list[list[str]]:
        """``n`` captions per embedding: the ``n`` best of a beam search (width ``max(beam, n)``),
        greedy decoding for ``beam = 1, n = 1``, or ``n`` nucleus samples with ``sample``."""
        self.decoder.eval()
        x = self.condition(embedding, projection).to(next(self.decoder.parameters()).device)
        if sample:
            runs = self.decoder.sample(x, n, temperature, top_p, torch.Generator().manual_seed(seed))
        elif beam <= 1 and n == 1:
            runs = [[ids] for ids in self.decoder.greedy(x)]
        else:
            runs = [found[:n] for found in self.decoder.beam(x, max(beam, n))]
        return [[self.vocab.decode(ids) for ids in found] for found in runs]

    def to(self, device: str | torch.device) -> "Captioner":
        self.decoder.to(device)
        self.memory = self.memory.to(device)
        return self

    def nearest(self, embedding: torch.Tensor) -> list[str]:
        """Retrieval captioning: the training caption nearest to each embedding."""
        scores = torch.nn.functional.normalize(embedding.float().to(self.memory.device), dim=-1) @ self.memory.t()
        return [self.captions[i] for i in scores.argmax(-1).tolist()]

    # ----- the model directory ------------------------------------------------------
    def save(self, model_dir: str | Path, info: dict[str, Any]) -> dict[str, Any]:
        """Write ``decoder/`` into ``model_dir`` and record it (``info`` joins ``meta["decoder"]``)."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.decoder.state_dict().items()}
        description = {"config": self.decoder.config.to_dict(), "words": self.vocab.words[4:],
                       "captions": self.captions, "projection": self.projection, "temperature": self.temperature,
                       "prior": self.prior}
        files = {"decoder.safetensors": save_bytes(state, metadata={"format": "oneencoder"}),
                 "memory.safetensors": save_bytes({"memory": self.memory.to(torch.float16).contiguous()}),
                 "decoder.json": (json.dumps(description, ensure_ascii=False) + "\n").encode("utf-8")}
        return save_part(model_dir, PART, files, {**info, "projection": self.projection,
                                                  "vocab_size": len(self.vocab), "memory": len(self.captions),
                                                  "config": self.decoder.config.to_dict()})


def has_captioner(meta: dict[str, Any]) -> bool:
    return PART in meta


def load_captioner(model_dir: str | Path, meta: dict[str, Any] | None = None) -> Captioner:
    """The model's decoder, every file's checksum verified first.

    Raises:
        OneEncoderError: The model holds no decoder (train one with ``oneencoder train-decoder``).
    """
    model_dir = Path(model_dir)
    meta = meta or read_meta(model_dir)
    if not has_captioner(meta):
        raise OneEncoderError(f"{model_dir} holds no caption decoder; train one with "
                              f"`oneencoder train-decoder --model {model_dir}`")
    verify_files(model_dir, meta)
    folder = lambda name: visible_path(model_dir, f"{PART}/{name}")  # noqa: E731
    description = json.loads(folder("decoder.json").read_text(encoding="utf-8"))
    decoder = CaptionDecoder(DecoderConfig(**description["config"]))
    decoder.load_state_dict(load_bytes(folder("decoder.safetensors").read_bytes()))
    memory = load_bytes(folder("memory.safetensors").read_bytes())["memory"].float()
    return Captioner(decoder.eval(), Vocabulary(description["words"]), memory, list(description["captions"]),
                     description["projection"], float(description["temperature"]), description.get("prior", ""))


def most_frequent(captions: Sequence[str]) -> str:
    """The text-only prior: the most frequent training caption (first of the most frequent)."""
    counts: dict[str, int] = {}
    for c in captions:
        counts[c] = counts.get(c, 0) + 1
    return max(counts, key=lambda c: counts[c])
