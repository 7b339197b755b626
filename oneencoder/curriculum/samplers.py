"""Batch samplers: which training pairs each optimizer step sees."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError


class RandomBatchSampler:
    """Uniform shuffling without replacement, epoch by epoch (the no-curriculum control).

    Args:
        n: Number of training pairs.
        batch_size: Pairs per step (capped at ``n``).
        seed: Seed of the sampler's own generator (independent of model init).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0) -> None:
        if n < 2:
            raise ConfigError(f"need at least 2 training pairs, got {n}")
        self.n = n
        self.batch_size = min(batch_size, n)
        self.steps_per_epoch = max(1, n // self.batch_size)
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(n, generator=self.generator)
        self._epoch_of_order = 0

    def batch(self, step: int, total_steps: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch_of_order:
            self._order = torch.randperm(self.n, generator=self.generator)
            self._epoch_of_order = epoch
        return self._order[pos * self.batch_size : (pos + 1) * self.batch_size]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "order": self._order,
                "epoch": torch.tensor(self._epoch_of_order)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self._order = state["order"]
        self._epoch_of_order = int(state["epoch"])


def build_sampler(config: Any, n: int, batch_size: int, seed: int) -> RandomBatchSampler:
    """Sampler named by a stage's ``[curriculum]`` section (a ``CurriculumConfig``)."""
    pacer = config.pacer
    if pacer != "random":
        raise ConfigError(f"[curriculum] pacer={pacer!r} is not available; use 'random'")
    return RandomBatchSampler(n, batch_size, seed)
