"""Cached backbone features found by input: what ``index build``, ``classify`` and ``embed`` reuse.

A feature cache is keyed by sample id, but an input given to the API has no id: a file
path, a caption. Each entry also records what it was computed from
(:func:`~oneencoder.features.cache.input_key`), so the entry of an input is found by that
key instead, and its tokens are embedded without running the backbone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import CacheMismatchError
from ..modality import Modality
from .cache import FeatureCache, cache_dir_for, input_key


class CachedFeatures:
    """One modality's cached backbone features, found by the input they were computed from.

    An input is found when the cache was built with the modality's fingerprint (same
    backbone, weights, options and preprocessing) and holds an entry whose recorded input
    (:func:`~oneencoder.features.cache.input_key`: a file's path, size and mtime, or a
    text's hash) is this input's. Ids do not matter, so a folder or a list file finds the
    features a manifest cached. Inputs that are not strings or paths (arrays, images in
    memory) are always encoded. The cache stores fp16, so embeddings of cached features
    equal freshly encoded ones to within fp16 rounding (docs/search.md).

    ``hits`` and ``encoded`` count what :meth:`OneEncoder.encode` took from here and what it
    ran the backbone for; :meth:`summary` says both.
    """

    def __init__(self, modality: Modality, root: str | Path | None) -> None:
        self.modality, self.name = modality, modality.spec.name
        self.hits = self.encoded = 0
        self.why: str | None = None  # why nothing can come from the cache
        self._cache: FeatureCache | None = None
        self._by_input: dict[str, str] = {}
        path = cache_dir_for(root, self.name) if root is not None else None
        if path is None:
            self.why = "no cache given"
        elif not (path / "data.mdb").exists():
            self.why = f"no {self.name} cache in {root}"
        else:
            try:
                self._cache = FeatureCache(path, modality.fingerprint(), readonly=True)
            except CacheMismatchError:
                self.why = f"the {self.name} cache in {root} was built with another backbone or options"
                return
            self._by_input = {key: sid for sid, key in self._cache.inputs().items() if key is not None}

    def find(self, value: Any) -> str | None:
        """The cached id computed from ``value``, or None."""
        if not self._by_input or not isinstance(value, (str, os.PathLike)):
            return None
        return self._by_input.get(input_key(self.modality, value))

    def tokens(self, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached tokens of ``ids``, zero-padded: ``[B, T, D]`` float32 and a ``[B, T]`` mask."""
        assert self._cache is not None
        rows = self._cache.get_many(list(ids))
        width = max(r.shape[0] for r in rows)
        tokens = torch.zeros(len(rows), width, self._cache.dim)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : r.shape[0]] = r.float()
            mask[i, : r.shape[0]] = True
        return tokens, mask

    def summary(self) -> str:
        """``image: 949 from the cache, 0 encoded``, and why none came from it when none could."""
        line = f"{self.name}: {self.hits} from the cache, {self.encoded} encoded"
        return line + (f" ({self.why})" if self.why else "")

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        self._by_input = {}

    def __enter__(self) -> "CachedFeatures":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
