"""Contrastive losses. Each returns a dict with ``loss`` plus values worth logging."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def same_group_mask(groups: torch.Tensor | None) -> torch.Tensor | None:
    """``[n, n]`` True where two different batch items share a group: never negatives."""
    if groups is None:
        return None
    same = groups[:, None] == groups[None, :]
    same.fill_diagonal_(False)
    return same if bool(same.any()) else None


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (CLIP) with a learned, clamped temperature.

    Args:
        init_temperature: Starting temperature.
        max_logit_scale: Upper clamp of ``1/temperature`` (CLIP uses 100).
        learn_temperature: If False, the temperature stays fixed.
    """

    def __init__(self, init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 learn_temperature: bool = True) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)),
                                      requires_grad=learn_temperature)
        self.max_log_scale = math.log(max_logit_scale)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    def logits(self, a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logit_scale * a @ b.t()
        mask = same_group_mask(groups)
        if mask is not None:
            logits = logits.masked_fill(mask, float("-inf"))
        return logits

    def forward(self, a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.logits(a, b, groups)
        target = torch.arange(a.shape[0], device=a.device)
        loss_ab = F.cross_entropy(logits, target)
        loss_ba = F.cross_entropy(logits.t(), target)
        return {"loss": (loss_ab + loss_ba) / 2, "logit_scale": self.logit_scale.detach()}
