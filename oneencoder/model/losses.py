"""Contrastive losses. Each returns a dict with ``loss`` plus values worth logging.

A loss class declares what a stage must give it, so the training plan
(:mod:`oneencoder.training.plan`) never tests a loss's name:

* its options are its constructor's keyword arguments (``[loss] beta`` reaches exactly
  the losses whose constructor takes ``beta``);
* ``needs_margins``: ``forward`` takes a per-pair ``margin`` that the stage scales by each
  pair's difficulty (``[loss] max_margin · difficulty``), so the difficulty table is read;
* ``gives_per_pair_losses``: the output holds ``per_sample``, the detached per-pair losses
  that self-paced pacers and SuperLoss weights read.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import Registry

#: Per-pair loss weights ``[B]``, or a function of the batch's detached per-pair losses giving them.
Weights = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], None]


def same_group_mask(groups: torch.Tensor | None) -> torch.Tensor | None:
    """``[n, n]`` True where two different batch items share a group: never negatives."""
    if groups is None:
        return None
    same = groups[:, None] == groups[None, :]
    same.fill_diagonal_(False)
    return same if bool(same.any()) else None


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (CLIP) with a learned, clamped temperature.

    Subclasses change the loss through two hooks: ``pair_logits`` (both directions,
    e.g. a margin on the positives) and ``row_losses`` (one direction's per-row
    cross-entropy, e.g. re-weighted negatives).

    Args:
        init_temperature: Starting temperature.
        max_logit_scale: Upper clamp of ``1/temperature`` (CLIP uses 100).
        learn_temperature: If False, the temperature stays fixed.
    """

    name: ClassVar[str] = "infonce"
    #: ``forward`` takes a per-pair ``margin`` scaled by difficulty (see the module docstring).
    needs_margins: ClassVar[bool] = False
    #: The output holds ``per_sample`` (``symmetric`` writes it).
    gives_per_pair_losses: ClassVar[bool] = True

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

    def row_losses(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B]`` cross-entropy of each row against its diagonal positive (one direction)."""
        target = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(logits, target, reduction="none")

    def symmetric(self, logits: torch.Tensor, weight: Weights = None, **row_options: Any) -> dict[str, torch.Tensor]:
        """Loss dict from the ``[B, B]`` a→b logits: mean over both directions.

        With ``weight``, the loss is the weighted mean of the pairs' losses (a pair judged
        suspect counts less); ``per_sample`` stays unweighted.
        """
        per_ab = self.row_losses(logits, **row_options)
        per_ba = self.row_losses(logits.t(), **row_options)
        per_pair = (per_ab + per_ba) / 2
        return self.reduce(per_pair, weight)

    def reduce(self, per_pair: torch.Tensor, weight: Weights = None) -> dict[str, torch.Tensor]:
        """The loss dict of ``[B]`` per-pair losses: their (weighted) mean, plus what is worth logging."""
        out = {"per_sample": per_pair.detach(),  # what self-paced samplers and difficulty trackers observe
               "logit_scale": self.logit_scale.detach()}
        if weight is None:
            out["loss"] = per_pair.mean()
        else:
            w = (weight(per_pair.detach()) if callable(weight) else weight).to(per_pair.dtype).detach()
            out["loss"] = (w * per_pair).sum() / w.sum().clamp_min(1e-12)
            out["weight_mean"] = w.mean()
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor | None = None,
                weight: Weights = None) -> dict[str, torch.Tensor]:
        """Args: ``a``, ``b``: ``[B, D]`` unit embeddings, row i of each is a pair; ``groups``: ``[B]``;
        ``weight``: per-pair loss weights (see ``symmetric``).

        Returns ``loss`` (scalar), ``per_sample`` (``[B]``, detached) and ``logit_scale``.
        """
        return self.symmetric(self.logits(a, b, groups), weight)


class HardNegativeLoss(ContrastiveLoss):
    """HN-NCE (Radenovic et al., 2023): InfoNCE whose negatives are re-weighted by hardness.

    In row i the denominator's negatives get ``w_ij = n_i · exp(β s_ij) / Σ_k exp(β s_ik)``
    (k over the row's negatives), with ``s`` the temperature-scaled similarity as in the
    paper and ``n_i`` the row's number of negatives (``N - 1`` without groups). Same-group
    pairs are neither negatives nor part of the normalisation, so the weights average 1
    over the real negatives and ``β = 0`` is exactly InfoNCE. Each direction is
    re-weighted along its own rows. Gradients flow through the weights, as in the paper.

    Args:
        beta: Hardness concentration (0 = InfoNCE; larger focuses on the closest negatives).
        **kwargs: ``ContrastiveLoss`` options (temperature).
    """

    name: ClassVar[str] = "hnnce"

    def __init__(self, beta: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if beta < 0:
            raise ConfigError(f"[loss] beta = {beta} must be >= 0")
        self.beta = float(beta)

    def row_losses(self, logits: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        beta = self.beta if beta is None else float(beta)
        n = logits.shape[0]
        negative = torch.isfinite(logits) & ~torch.eye(n, dtype=torch.bool, device=logits.device)
        # A finite floor (not -inf) for non-negatives keeps 0·(-inf) and all -inf rows NaN-free.
        floor = torch.finfo(logits.dtype).min
        hard = (beta * logits.masked_fill(~negative, 0.0)).masked_fill(~negative, floor)
        count = negative.sum(dim=1, keepdim=True).clamp(min=1).to(logits.dtype)
        log_w = count.log() + hard - torch.logsumexp(hard, dim=1, keepdim=True)
        return super().row_losses(torch.where(negative, logits + log_w, logits))

    def forward(self, a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor | None = None,
                weight: Weights = None, beta: float | None = None) -> dict[str, torch.Tensor]:
        """As ``ContrastiveLoss.forward``; ``beta`` overrides the configured β for this call
        (e.g. a hardness that grows over training)."""
        return self.symmetric(self.logits(a, b, groups), weight, beta=beta)


class MarginLoss(ContrastiveLoss):
    """InfoNCE with an additive margin on the positive cosine (as in CosFace/AM-softmax).

    The positive logit becomes ``scale · (cos_ii - m_i)`` in both directions, so a pair
    must beat its negatives by ``m_i`` before its loss vanishes. ``m`` is a scalar or a
    per-pair ``[B]`` tensor, e.g. a dynamic margin ``max_margin · difficulty`` that the
    caller computes from per-sample difficulty in ``[0, 1]``. ``m = 0`` is exactly InfoNCE.

    Args:
        margin: Default margin when ``forward`` gets none.
        **kwargs: ``ContrastiveLoss`` options (temperature).
    """

    name: ClassVar[str] = "margin"
    needs_margins: ClassVar[bool] = True

    def __init__(self, margin: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.margin = float(margin)

    def forward(self, a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor | None = None,
                weight: Weights = None, margin: float | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """As ``ContrastiveLoss.forward``; ``margin`` (scalar or ``[B]``) overrides the default."""
        m = self.margin if margin is None else margin
        m = torch.as_tensor(m, dtype=a.dtype, device=a.device).expand(a.shape[0])
        logits = self.logits(a, b, groups)
        # Only the diagonal moves, so both directions see the same margined positive.
        logits = logits - torch.diag_embed(self.logit_scale * m)
        return self.symmetric(logits, weight)


class SigmoidLoss(ContrastiveLoss):
    """SigLIP (Zhai et al., 2023): every pair of the batch is its own binary classification.

    ``loss = -mean_i Σ_j log σ(z_ij (t · a_i·b_j + bias))`` with ``z = +1`` on the diagonal and
    ``-1`` elsewhere; same-group pairs are left out (neither positive nor negative). The
    temperature ``t`` and the ``bias`` are learned; the paper starts them at ``t = 10`` and
    ``bias = -10`` so the many negatives do not swamp the first steps. The per-pair loss is
    row i's plus column i's, halved, so weights and self-paced pacers see one value per pair.

    Args:
        init_bias: Starting logit bias.
        **kwargs: ``ContrastiveLoss`` options (``init_temperature`` defaults to 0.1, i.e. t = 10).
    """

    name: ClassVar[str] = "sigmoid"

    def __init__(self, init_bias: float = -10.0, init_temperature: float = 0.1, **kwargs: Any) -> None:
        super().__init__(init_temperature=init_temperature, **kwargs)
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(self, a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor | None = None,
                weight: Weights = None) -> dict[str, torch.Tensor]:
        """As ``ContrastiveLoss.forward``; the output also holds the learned ``bias``."""
        n = a.shape[0]
        logits = self.logit_scale * a @ b.t() + self.bias
        eye = torch.eye(n, dtype=torch.bool, device=a.device)
        sign = torch.where(eye, 1.0, -1.0).to(logits.dtype)
        same = same_group_mask(groups)
        keep = torch.ones_like(eye) if same is None else ~same
        per_cell = -F.logsigmoid(sign * logits) * keep
        out = self.reduce((per_cell.sum(1) + per_cell.sum(0)) / 2, weight)
        return {**out, "bias": self.bias.detach()}


# ----- registry -------------------------------------------------------------------------

LOSSES: Registry[ContrastiveLoss] = Registry("loss")
register_loss = LOSSES.register
for _cls in (ContrastiveLoss, HardNegativeLoss, MarginLoss, SigmoidLoss):
    register_loss(_cls)


def list_losses() -> list[str]:
    """Names of every registered loss."""
    return LOSSES.names()


def create_loss(name: str, **options: Any) -> ContrastiveLoss:
    """Instantiate a registered loss; unknown names or options raise ``ConfigError``.

    Example:
        >>> loss = create_loss("hnnce", beta=0.5, init_temperature=0.07)
    """
    return LOSSES.create(name, **options)
