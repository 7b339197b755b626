"""FeatureBank: a cache loaded whole into memory so training gathers batches by index."""

from __future__ import annotations

from pathlib import Path

import torch

from .cache import FeatureCache


class FeatureBank:
    """Padded fp16 tokens ``[N, T, D]`` and lengths for a fixed, ordered list of ids.

    Args:
        tokens: List of ``[n_i, D]`` tensors.
        device: Where the bank lives (GPU memory on CUDA: no host-device copies per step).
    """

    def __init__(self, tokens: list[torch.Tensor], device: str | torch.device = "cpu") -> None:
        if not tokens:
            raise ValueError("FeatureBank needs at least one sample")
        width = max(t.shape[0] for t in tokens)
        dim = tokens[0].shape[1]
        data = torch.zeros(len(tokens), width, dim, dtype=torch.float16)
        lengths = torch.empty(len(tokens), dtype=torch.long)
        for i, t in enumerate(tokens):
            data[i, : t.shape[0]] = t
            lengths[i] = t.shape[0]
        self.data = data.to(device)
        self.lengths = lengths.to(device)

    @classmethod
    def from_cache(cls, cache: FeatureCache, ids: list[str], device: str | torch.device = "cpu") -> "FeatureBank":
        return cls(cache.get_many(ids), device)

    @classmethod
    def open(cls, path: str | Path, fingerprint: dict, ids: list[str], device: str | torch.device = "cpu") -> "FeatureBank":
        with FeatureCache(path, fingerprint, readonly=True) as cache:
            return cls.from_cache(cache, ids, device)

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def dim(self) -> int:
        return self.data.shape[2]

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``[B, T_b, D]`` (float32) and mask ``[B, T_b]``, trimmed to the batch's longest."""
        index = index.to(self.data.device)
        lengths = self.lengths[index]
        width = int(lengths.max())
        tokens = self.data[index, :width].float()
        mask = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
        return tokens, mask
