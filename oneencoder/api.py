"""The application API: ``m = oneencoder.load(dir); m.encode("text", ["a badger"])``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .checkpoint import load_model, modality_from_meta
from .errors import OneEncoderError, SampleError
from .modality import Modality
from .runtime import pick_device


class OneEncoder:
    """A trained model directory, ready to embed any modality it holds.

    Backbones load lazily, the first time a modality is encoded.
    """

    def __init__(self, model_dir: str | Path, device: str | torch.device | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.device = pick_device("auto" if device is None else str(device))
        self.model, self.meta = load_model(self.model_dir)
        self.model.to(self.device).eval()
        self._modalities: dict[str, Modality] = {}
        self._backbones: dict[str, torch.nn.Module] = {}

    @property
    def modalities(self) -> list[str]:
        """Names of the modalities this model can embed."""
        return list(self.meta["modalities"])

    def modality(self, name: str) -> Modality:
        if name not in self.meta["modalities"]:
            raise OneEncoderError(f"this model holds no {name!r} modality; it has {', '.join(self.modalities)}")
        if name not in self._modalities:
            self._modalities[name] = modality_from_meta(name, self.meta["modalities"][name])
        return self._modalities[name]

    def _backbone(self, name: str) -> torch.nn.Module:
        if name not in self._backbones:
            self._backbones[name] = self.modality(name).load_backbone().to(self.device)
        return self._backbones[name]

    @torch.no_grad()
    def encode_features(self, modality: str, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embed cached backbone features ``[B, T, D]`` (mask ``[B, T]``, True = real token)."""
        self.modality(modality)
        if tokens.ndim == 2:
            tokens = tokens[None]
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
        return self.model(modality, tokens.float().to(self.device), mask.bool().to(self.device)).float().cpu()

    @torch.no_grad()
    def encode(self, modality: str, inputs: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """Embed raw inputs (strings for text; paths or PIL images for images).

        Returns:
            ``[N, d]`` L2-normalised embeddings on the CPU.

        Raises:
            SampleError: naming the input that could not be read.
        """
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
            inputs = [inputs]
        m = self.modality(modality)
        backbone = self._backbone(modality)
        out = []
        for start in range(0, len(inputs), batch_size):
            items = []
            for i, x in enumerate(inputs[start : start + batch_size], start):
                try:
                    items.append(m.prepare(x)[1])
                except SampleError as e:
                    raise SampleError(f"{modality} input #{i}: {e}") from None
            tokens, mask = m.featurize(backbone, items)
            out.append(self.encode_features(modality, tokens, mask))
        if not out:
            return torch.empty(0, self.model.embed_dim)
        return torch.cat(out)

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix ``[len(a), len(b)]`` of two sets of embeddings."""
        return a @ b.t()

    def __repr__(self) -> str:
        return f"OneEncoder({str(self.model_dir)!r}, modalities={self.modalities}, d={self.model.embed_dim})"


def load(model_dir: str | Path, device: str | torch.device | None = None) -> OneEncoder:
    """Load a model directory after verifying every file's checksum."""
    return OneEncoder(model_dir, device)
