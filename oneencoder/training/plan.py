"""The curriculum plan of a stage: what its loss, pacer and weighting need, resolved once.

Every registered part declares what it needs, and this module alone reads the
declarations, so no code tests a part's name:

* a loss (:mod:`oneencoder.model.losses`) takes the ``[loss]`` values its constructor
  names (``beta`` reaches HN-NCE, and any plugin loss that takes it, and nothing else);
  ``needs_margins`` asks for per-pair margins ``max_margin · difficulty``;
  ``gives_per_pair_losses`` says its output holds them;
* a pacer's ``order`` (:mod:`.curriculum.pacers`) gives ``needs_difficulty`` and
  ``needs_per_pair_losses``;
* a weighting (:mod:`.curriculum.weights`) declares ``needs_trust`` and ``needs_per_pair_losses``;
* a scorer that estimates whether a pair is correct declares ``provides_trust``, the
  measurement the trust weights come from (:func:`.curriculum.scorers.trust_source`).

Example:
    >>> plan = CurriculumPlan.from_config(config)
    >>> plan.needs_table, plan.loss_options
    (False, {'init_temperature': 0.07, 'max_logit_scale': 100.0, 'learn_temperature': True, 'beta': 2.0})
    >>> loss = plan.build_loss()
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..model.losses import LOSSES, ContrastiveLoss, create_loss
from .config import LossConfig, StageConfig
from .curriculum.pacers import PACERS
from .curriculum.scorers import trust_source
from .curriculum.weights import WEIGHTING_REGISTRY

#: ``[loss]`` values the plan itself uses, never constructor options.
_PLAN_VALUES = ("name", "max_margin")


def loss_options(config: LossConfig) -> dict[str, Any]:
    """The ``[loss]`` values that the named loss's constructor takes, in ``[loss]`` order.

    A value the loss does not take is not passed (``beta = 2`` under ``infonce`` is unused,
    as it always was); ``ConfigError`` if the loss is not registered.
    """
    accepted = LOSSES.options(config.name)
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _PLAN_VALUES}
    return {k: v for k, v in values.items() if k in accepted}


@dataclass(frozen=True)
class CurriculumPlan:
    """What one stage's loss and curriculum need, resolved from its config before any data is read.

    Attributes:
        loss: Registered loss name.
        loss_options: Its constructor options (``loss_options``).
        margin_scale: ``[loss] max_margin`` when the loss takes per-pair margins, else None.
        needs_difficulty: The ``[N]`` combined difficulty of the training pairs is built
            (the pacer orders by it, or margins scale by it).
        trust: ``(scorer, measurement)`` of the per-pair trust weights, or None.
        required_scorers: Scorers the difficulty table must hold (weighted ones, and the trust source).
        loss_predictor: A ``LossPredictor`` scores samples an online pacer has not seen recently.
        needs_per_pair_losses: Some part reads each step's per-pair losses (the loss gives them).
    """

    loss: str
    loss_options: dict[str, Any]
    margin_scale: float | None
    needs_difficulty: bool
    trust: tuple[str, str] | None
    required_scorers: frozenset[str]
    loss_predictor: bool
    needs_per_pair_losses: bool

    @property
    def needs_table(self) -> bool:
        """Whether the stage reads the difficulty table: for difficulty, margins or trust."""
        return self.needs_difficulty or self.trust is not None

    @classmethod
    def from_config(cls, config: StageConfig) -> CurriculumPlan:
        """The plan of ``config``; one ``ConfigError`` line if its parts cannot work together.

        Raises:
            ConfigError: An unregistered loss, pacer or weighting; a part that needs per-pair
                losses with a loss that gives none; trust weights with no scorer providing trust.
        """
        cur = config.curriculum
        loss = LOSSES.get(config.loss.name)
        pacer = PACERS.get(cur.pacer)
        weighting = WEIGHTING_REGISTRY.get(cur.weighting)
        needs_margins = bool(getattr(loss, "needs_margins", False))
        per_pair = [f"[curriculum] {what} = {name!r}" for what, name, part in
                    (("pacer", cur.pacer, pacer), ("weighting", cur.weighting, weighting))
                    if part.needs_per_pair_losses]
        if per_pair and not getattr(loss, "gives_per_pair_losses", False):
            raise ConfigError(f"{' and '.join(per_pair)} needs per-pair losses, which [loss] name = "
                              f"{config.loss.name!r} does not give (its output has no per_sample)")
        trust = trust_source(cur.scorers) if weighting.needs_trust else None
        return cls(
            loss=config.loss.name,
            loss_options=loss_options(config.loss),
            margin_scale=float(config.loss.max_margin) if needs_margins else None,
            needs_difficulty=pacer.needs_difficulty or needs_margins,
            trust=trust,
            required_scorers=frozenset(cur.scorers) | ({trust[0]} if trust else set()),
            loss_predictor=pacer.needs_per_pair_losses and cur.loss_predictor,
            needs_per_pair_losses=bool(per_pair),
        )

    def build_loss(self) -> ContrastiveLoss:
        """The loss module, built with ``loss_options``."""
        return create_loss(self.loss, **self.loss_options)

    def margins(self, difficulty: torch.Tensor | None) -> torch.Tensor | None:
        """``[N]`` per-pair margins ``max_margin · difficulty`` for a loss that takes them, else None."""
        if self.margin_scale is None:
            return None
        if difficulty is None:
            raise ValueError("a loss with per-pair margins needs the training pairs' difficulty")
        return self.margin_scale * difficulty
