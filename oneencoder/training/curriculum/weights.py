"""Per-pair loss weights: how much each pair of a batch counts, for noisy data.

A pacer decides *when* a pair may be drawn; weights decide how much it counts once it
is. Three sources, which multiply:

* ``trust``: a fixed weight per training pair, the ``clean_probability`` that the
  ``pair_agreement`` scorer estimates before training (the pair's chance of being correct).
* ``superloss``: SuperLoss (Castells et al., 2020), a self-paced confidence from the
  pair's current loss: ``σ = exp(-W(½·max(-2/e, (ℓ - τ)/λ)))`` with ``W`` the Lambert W
  function and ``τ`` the batch's mean loss, so pairs far above the batch's typical loss
  (likely wrong) count less, and easy ones a little more. ``λ`` sets how sharply.

* ``group_balance``: ``g^-ρ`` for a pair whose caption ``g`` training pairs share, so a
  template title on hundreds of images does not outweigh distinct captions.

Trust and group balance are fixed per pair and multiply into one tensor. Every pair stays in the sampling pool; ``floor`` keeps every weight at least that large.

A ``[curriculum] weighting`` names a registered :class:`Weighting`, which declares what it
needs: ``needs_trust`` (the trust scorer's clean probabilities) and
``needs_per_pair_losses`` (SuperLoss's confidence from the batch's current losses).

Example:
    >>> weights = SampleWeights(fixed=clean_probability, superloss=1.0)
    >>> out = loss(ea, eb, groups, weight=weights.batch(index))
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar

import torch

from ...errors import ConfigError
from ...registry import Registry


class Weighting:
    """A ``[curriculum] weighting``: which of the two weight sources multiply into a pair's loss weight.

    ``build_weights`` reads the declarations; ``group_balance`` multiplies in regardless.
    """

    name: ClassVar[str] = ""
    #: Fixed weights: each pair's probability of being correct (``scorers.trust_source``).
    needs_trust: ClassVar[bool] = False
    #: Self-paced weights from the batch's current per-pair losses (SuperLoss).
    needs_per_pair_losses: ClassVar[bool] = False


WEIGHTING_REGISTRY: Registry[Weighting] = Registry("weighting")
register_weighting = WEIGHTING_REGISTRY.register


@register_weighting
class NoWeighting(Weighting):
    """Every pair counts 1 (``group_balance`` may still weight caption groups)."""

    name = "none"


@register_weighting
class TrustWeighting(Weighting):
    """Each pair counts by its clean probability (or 1 / floor around ``trust_threshold``)."""

    name = "trust"
    needs_trust = True


@register_weighting
class SuperLossWeighting(Weighting):
    """SuperLoss: a loss far above the batch's mean counts less."""

    name = "superloss"
    needs_per_pair_losses = True


@register_weighting
class TrustSuperLossWeighting(Weighting):
    """The product of ``trust`` and ``superloss``."""

    name = "trust+superloss"
    needs_trust = True
    needs_per_pair_losses = True


#: Names of the built-in weightings, in the order the docs list them (``list_weightings`` has plugins too).
WEIGHTINGS = tuple(c.name for c in (NoWeighting, TrustWeighting, SuperLossWeighting, TrustSuperLossWeighting))


def list_weightings() -> list[str]:
    """Names of every registered weighting."""
    return WEIGHTING_REGISTRY.names()


def lambert_w0(y: torch.Tensor, iterations: int = 12) -> torch.Tensor:
    """Principal branch of the Lambert W function for ``y >= -1/e`` (Halley's iteration), float64."""
    y = y.double().clamp_min(-1.0 / math.e)
    p = torch.sqrt((2 * (1 + math.e * y)).clamp_min(0.0))
    # Start: the branch-point series near -1/e, log(y) for large y, 0 elsewhere.
    w = torch.where(y < -0.25, p - 1 - p * p / 3, torch.where(y > 1.0, torch.log(y.clamp_min(1.0)), torch.zeros_like(y)))
    for _ in range(iterations):
        ew = torch.exp(w)
        f = w * ew - y
        denom = ew * (w + 1) - (w + 2) * f / (2 * w + 2).clamp_min(1e-12)
        w = w - torch.where(denom.abs() > 1e-300, f / denom, torch.zeros_like(f))
    return torch.where(p == 0, torch.full_like(w, -1.0), w)


def superloss_confidence(losses: torch.Tensor, tau: torch.Tensor | float, lam: float) -> torch.Tensor:
    """SuperLoss's closed-form confidence of each loss against the threshold ``tau``."""
    beta = (losses.double() - tau) / lam
    return torch.exp(-lambert_w0(0.5 * beta.clamp_min(-2.0 / math.e))).to(losses.dtype)


class SampleWeights:
    """Loss weights of the pairs of each batch (see the module docstring).

    Args:
        fixed: ``[N]`` fixed weights per training pair in [0, 1] (trust, group balance), or None.
        superloss: SuperLoss ``λ`` (> 0), or None for no self-paced confidence.
        floor: Smallest weight any pair gets, in [0, 1).
    """

    def __init__(self, fixed: torch.Tensor | None = None, superloss: float | None = None, floor: float = 0.0) -> None:
        if fixed is None and superloss is None:
            raise ConfigError("sample weights need fixed per-pair weights, a SuperLoss lambda, or both")
        if superloss is not None and not superloss > 0:
            raise ConfigError(f"[curriculum] superloss_lambda = {superloss} must be > 0")
        if not 0.0 <= floor < 1.0:
            raise ConfigError(f"[curriculum] weight_floor = {floor} must be in [0, 1)")
        if fixed is not None:
            fixed = torch.as_tensor(fixed, dtype=torch.float32).reshape(-1)
            if not bool(torch.isfinite(fixed).all()) or bool((fixed < 0).any()) or bool((fixed > 1).any()):
                raise ConfigError("trust weights must lie in [0, 1]")
        self.fixed, self.superloss, self.floor = fixed, superloss, float(floor)

    def batch(self, index: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The weights of the batch ``index`` as a function of its detached per-pair losses."""
        fixed = None if self.fixed is None else self.fixed[index.cpu()]

        def weigh(losses: torch.Tensor) -> torch.Tensor:
            w = torch.ones_like(losses)
            if fixed is not None:
                w = w * fixed.to(losses.device, losses.dtype)
            if self.superloss is not None:
                w = w * superloss_confidence(losses, losses.mean(), self.superloss)
            return w.clamp_min(self.floor)

        return weigh


def group_balance_weights(groups: torch.Tensor, power: float) -> torch.Tensor:
    """``g^-power`` (at most 1) for a pair whose caption group has ``g`` training pairs.

    A template caption shared by hundreds of images then counts, in all, about as much as
    ``hundreds^(1 - power)`` distinct captions (class-balanced weighting, applied to caption groups).
    """
    groups = torch.as_tensor(groups).long().cpu()
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    return counts[inverse].float().pow(-float(power))


def build_weights(weighting: str, trust: torch.Tensor | None, superloss_lambda: float,
                  floor: float, threshold: float = 0.0, balance: torch.Tensor | None = None) -> SampleWeights | None:
    """The stage's ``[curriculum] weighting`` as :class:`SampleWeights` (None for ``"none"`` without balance).

    With ``threshold > 0`` trust is a hard selection: weight 1 for a clean probability at
    or above it, else ``floor`` (the pairs below still stay in the pool). ``balance``
    (``group_balance_weights``) multiplies the fixed per-pair weights.
    """
    if weighting not in WEIGHTING_REGISTRY:
        raise ConfigError(f"[curriculum] weighting = {weighting!r}: use one of {', '.join(list_weightings())}")
    kind = WEIGHTING_REGISTRY.get(weighting)
    uses_trust = kind.needs_trust
    if uses_trust and trust is None:
        raise ConfigError(f"[curriculum] weighting = {weighting!r} needs the pair_agreement scorer's clean "
                          "probabilities")
    if uses_trust and threshold > 0:
        trust = (torch.as_tensor(trust) >= threshold).float()
    fixed = torch.as_tensor(trust).float() if uses_trust else None
    if balance is not None:
        fixed = balance.float() if fixed is None else fixed * balance.float()
    superloss = superloss_lambda if kind.needs_per_pair_losses else None
    if fixed is None and superloss is None:
        return None
    return SampleWeights(fixed, superloss, floor)
