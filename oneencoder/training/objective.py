"""The objective phase of a stage: the contrastive loss of a batch of pairs, and the validation score."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..evaluation.retrieval import embed_bank, retrieval_between
from ..model.losses import create_loss
from ..model.parts import OneEncoderModel
from . import distributed as ddp
from .config import LossConfig
from .curriculum.weights import SampleWeights
from .pairs import PairSplit
from .plan import loss_options


def stage_loss(config: LossConfig) -> nn.Module:
    """The stage's ``[loss]`` table as a loss module: the values its constructor takes (``plan.loss_options``)."""
    return create_loss(config.name, **loss_options(config))


class PairObjective(nn.Module):
    """Contrastive loss of a batch of aligned pairs gathered from feature banks.

    If ``fixed_b`` is given, side ``b`` is a frozen anchor whose embeddings were
    computed once; only side ``a`` runs through the model. With ``margins``
    (per training pair), the loss gets a dynamic margin that grows with difficulty. With
    ``weights``, each pair's loss counts by its weight (noise-aware curricula).

    Under ``torchrun``, ``forward`` gets this rank's shard of the global batch, gathers
    the embeddings with gradient and returns the loss of the whole global batch, so
    negatives, same-group masks, margins and weights are those of one process's batch.
    """

    def __init__(self, model: OneEncoderModel, loss: nn.Module, pair: tuple[str, str], data: PairSplit,
                 fixed_b: torch.Tensor | None = None, margins: torch.Tensor | None = None,
                 weights: SampleWeights | None = None) -> None:
        super().__init__()
        self.model, self.loss, self.pair = model, loss, pair
        self.data, self.weights = data, weights
        self.register_buffer("groups", data.group_codes, persistent=False)
        self.register_buffer("fixed_b", fixed_b, persistent=False)
        self.register_buffer("margins", margins, persistent=False)

    def embed(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.pair
        ea = self.model(a, *self.data.banks[a].gather(index))
        eb = self.fixed_b[index] if self.fixed_b is not None else self.model(b, *self.data.banks[b].gather(index))
        return ea.float(), eb.float()

    def forward(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss dict of the global batch whose shard on this rank is ``index``."""
        index = index.to(self.groups.device)
        a, b = self.pair
        full = ddp.gather(index)  # the global batch, in rank order
        ea = ddp.gather_with_grad(self.model(a, *self.data.banks[a].gather(index)).float())
        if self.fixed_b is not None:
            eb = self.fixed_b[full]
        else:
            eb = ddp.gather_with_grad(self.model(b, *self.data.banks[b].gather(index)).float())
        extra = {"margin": self.margins[full]} if self.margins is not None else {}
        if self.weights is not None:
            extra["weight"] = self.weights.batch(full)
        return self.loss(ea, eb, self.groups[full], **extra)


def score(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """Validation summary; ``score`` = mean recall (R@1, R@5, R@10 in both directions)."""
    out: dict[str, float] = {}
    for direction, r in results.items():
        for k in ("R@1", "R@5", "R@10"):
            out[f"{direction}/{k}"] = r["metrics"][k]
    out["score"] = sum(out.values()) / max(1, len(out))
    return out


def retrieval_validator(model: OneEncoderModel, pair: tuple[str, str], galleries: dict[str, PairSplit],
                        dedupe: dict[str, bool], batch_size: int,
                        fixed: dict[str, torch.Tensor] | None = None) -> Callable[[], dict[str, float]]:
    """A callback scoring retrieval between the pair's two galleries in both directions.

    Args:
        galleries: Modality -> the validation samples it ranks (a frozen anchor may rank
            every validation sample it has, not only those paired with the new modality).
        fixed: Modality -> embeddings that never change (a frozen anchor), computed once.
    """
    a, b = pair
    fixed = fixed or {}

    def validate() -> dict[str, float]:
        ea, eb = (fixed[n] if n in fixed else embed_bank(model, n, galleries[n].banks[n], batch_size) for n in (a, b))
        ga, gb = galleries[a].groups, galleries[b].groups
        return score({f"{a}→{b}": retrieval_between(ea, ga, eb, gb, dedupe[a], dedupe[b]),
                      f"{b}→{a}": retrieval_between(eb, gb, ea, ga, dedupe[b], dedupe[a])})

    return validate
