"""What a stage fits on its validation split when it ends, and stores in the model.

* the match calibration of every direction the stage evaluates that involves a modality it
  trained (the trained pair and the emergent ones; :mod:`oneencoder.evaluation.calibration`);
* the mean embedding of every modality it trained (``means.safetensors``, exposed as
  ``OneEncoder.modality_mean``), for measuring and handling the modality gap;
* the validation retrieval of those directions with chance levels, from which an add-modality
  stage warns in one line when its new modality ended near chance against its anchor.

Validation, not test: the test split then checks what validation predicted (``eval`` reports
the precision of the stored threshold on the split it evaluates).

Example:
    >>> fit = fit_on_validation(model, modalities, records, "outputs/demo/cache", stage="image_text")
    >>> fit.save("outputs/demo/model")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path
from typing import Any, Collection

import torch

from ..modality import Modality
from ..model.checkpoint import save_fits
from ..model.parts import OneEncoderModel
from .calibration import MatchCalibration, pair_sample
from .metrics import format_number
from .retrieval import embed_split, paired_rows, retrieval_between

#: A new modality whose validation R@1 against its anchor stays under this many times chance is "near chance".
NEAR_CHANCE = 2.0


@dataclass
class ValidationFit:
    """Calibrations, means and validation retrieval of one stage's modalities.

    Attributes:
        calibration: Direction -> its fitted calibration.
        means: Modality -> mean of its validation embeddings ``[d]`` (float32).
        counts: Modality -> validation samples behind its mean.
        retrieval: Direction -> ``{"metrics", "chance", "gap"}`` on validation.
        stage: The stage that fitted them (None: an existing model, by ``oneencoder calibrate``).
        split: The split they were fitted on.
    """

    calibration: dict[str, MatchCalibration] = field(default_factory=dict)
    means: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    retrieval: dict[str, dict[str, Any]] = field(default_factory=dict)
    stage: str | None = None
    split: str = "val"

    def save(self, model_dir: str | Path) -> dict[str, Any]:
        """Store the calibrations and means in the model directory (checksummed, at once)."""
        info = {n: {"split": self.split, "n": self.counts[n], "stage": self.stage} for n in self.means}
        return save_fits(model_dir, {d: c.to_dict() for d, c in self.calibration.items()}, self.means, info)

    def near_chance(self, new: str, anchor: str, factor: float = NEAR_CHANCE) -> str | None:
        """One warning line when ``new → anchor`` ended under ``factor`` x chance R@1 on validation, else None."""
        result = self.retrieval.get(f"{new}→{anchor}")
        if result is None:
            return None
        r1, chance = result["metrics"]["R@1"], result["chance"]["R@1"]
        if r1 >= factor * chance:
            return None
        return (f"warning: {new} ended near chance against {anchor} on validation (R@1 {format_number(r1)}, "
                f"chance {format_number(chance)}): its adapter learned little from these pairs; check that they "
                f"match, add pairs or epochs, or try another --anchor")


def fit_on_validation(model: OneEncoderModel, modalities: dict[str, Modality], records: list[dict],
                      cache_root: str | Path, *, stage: str | None = None, trained: Collection[str] | None = None,
                      split: str = "val", batch_size: int = 256) -> ValidationFit:
    """Fit the calibrations and means of a model's modalities on one split (see the module docstring).

    Args:
        modalities: The modalities to embed (the stage's, and the model's others for emergent pairs).
        trained: Only directions involving one of these, and only their means (None: every one).
        split: The split to fit on; validation, so that test can check it.

    Raises:
        OneEncoderError: The manifest has no sample of ``split``.
    """
    embedded = embed_split(model, modalities, records, cache_root, split, batch_size)
    wanted = (lambda names: True) if trained is None else (lambda names: bool(set(names) & set(trained)))  # noqa: E731
    fit = ValidationFit(stage=stage, split=split)
    for a, b in permutations(embedded, 2):
        (ea, ga, _), (eb, gb, _) = embedded[a], embedded[b]
        if not wanted((a, b)) or not set(ga) & set(gb):
            continue
        dedupe = (modalities[a].spec.dedupe_in_eval, modalities[b].spec.dedupe_in_eval)
        queries, gallery, query_codes, gallery_codes, _ = paired_rows(ea, ga, eb, gb, *dedupe)
        scores, labels, weights = pair_sample(queries, gallery, query_codes, gallery_codes)
        if labels.all():  # one item per side: nothing to tell apart
            continue
        fit.calibration[f"{a}→{b}"] = MatchCalibration.fit(scores, labels, weights, len(queries), stage)
        fit.retrieval[f"{a}→{b}"] = retrieval_between(ea, ga, eb, gb, *dedupe)
    for name, (emb, _, ids) in embedded.items():
        if wanted((name,)):
            fit.means[name] = emb.double().mean(0).float().cpu()
            fit.counts[name] = len(ids)
    return fit
