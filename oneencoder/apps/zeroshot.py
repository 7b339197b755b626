"""Zero-shot classification: rank class names, put in a sentence template, against any input.

Every modality lives in the space the text adapter maps into, so ``"A picture of {}."``
filled with each label is a classifier for images, sounds or molecules alike, as CLIP
classifies images with prompts (Radford et al., 2021). A list of templates averages the
label's text embeddings over them (CLIP's prompt ensembling).

Example:
    >>> result = m.classify("image", ["cat.png"], ["animals", "vehicles"], template="A picture of {}.")
    >>> result.top[0][0]
    ('animals', 0.41, 0.97)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.manifest import CAPTION_FIELD
from ..errors import OneEncoderError

if TYPE_CHECKING:
    from ..features.lookup import CachedFeatures
    from .api import OneEncoder


@dataclass
class Classification:
    """Scores of N inputs against L labels.

    Attributes:
        labels: The L class names, in the order of the score columns.
        scores: ``[N, L]`` cosine similarity of each input to each label's prompt embedding.
        probs: ``[N, L]`` softmax of ``scores / temperature`` over the labels.
        top: Per input, the best ``k`` labels as ``(label, score, prob)``, best first.
    """

    labels: list[str]
    scores: np.ndarray
    probs: np.ndarray
    top: list[list[tuple[str, float, float]]]

    @property
    def predictions(self) -> list[str]:
        """The best label of every input."""
        return [row[0][0] for row in self.top]

    def to_json(self) -> list[list[dict[str, Any]]]:
        return [[{"rank": r, "label": lab, "score": s, "prob": p} for r, (lab, s, p) in enumerate(row, 1)]
                for row in self.top]


def prompts(labels: Sequence[str], template: str | Sequence[str]) -> list[list[str]]:
    """``[template.format(label) for template]`` per label.

    Raises:
        OneEncoderError: no labels, a duplicate or empty label, or a template without ``{}``.
    """
    labels = [str(x) for x in labels]
    if not labels:
        raise OneEncoderError("classify: no labels given")
    clean = [x.strip() for x in labels]
    if any(not x for x in clean):
        raise OneEncoderError(f"classify: label #{clean.index('')} is empty")
    dupes = sorted({x for x in clean if clean.count(x) > 1})
    if dupes:
        raise OneEncoderError(f"classify: labels {dupes} are given more than once")
    templates = [template] if isinstance(template, str) else list(template)
    if not templates:
        raise OneEncoderError("classify: no templates given")
    for t in templates:
        if t.count("{}") != 1:
            raise OneEncoderError(f"classify: template {t!r} must contain '{{}}' exactly once, where the label goes")
    return [[t.replace("{}", x) for t in templates] for x in clean]


def caption_modality(model: "OneEncoder") -> str:
    """The model's modality that embeds captions (manifest field ``caption``): it embeds the prompts."""
    from ..modality import get_modality_class

    for name in model.modalities:
        if get_modality_class(name).spec.record_key == CAPTION_FIELD:
            return name
    raise OneEncoderError(f"this model holds no modality for {CAPTION_FIELD}s (text) to embed the labels with; "
                          f"it has {', '.join(model.modalities)}")


def label_embeddings(model: "OneEncoder", labels: Sequence[str], template: str | Sequence[str],
                     batch_size: int = 32) -> torch.Tensor:
    """``[L, d]`` unit text embeddings of the labels (averaged over templates, renormalised)."""
    sentences = prompts(labels, template)
    per_label = len(sentences[0])
    flat = [s for row in sentences for s in row]
    emb = model.encode(caption_modality(model), flat, batch_size=batch_size, progress=False)
    return F.normalize(emb.view(len(sentences), per_label, -1).mean(1), dim=-1)


#: Softmax temperature of the probabilities when the model stores no calibration (CLIP's logit scale 100).
DEFAULT_TEMPERATURE = 0.01


def probability_scale(meta: dict[str, Any]) -> tuple[float, str]:
    """The temperature of ``classify``'s probabilities, and a sentence that says what they are.

    A model that stores ``"calibration": {"temperature": T, "fitted_on": ...}`` in its
    ``oneencoder.json`` (a temperature fitted on held-out data) gets T; any other model gets
    :data:`DEFAULT_TEMPERATURE`, and its probabilities are a ranking made to look like
    probabilities: uncalibrated, and usually over-confident.
    """
    calibration = meta.get("calibration")
    temperature = calibration.get("temperature") if isinstance(calibration, dict) else None
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0:
        where = calibration.get("fitted_on") or "held-out data"
        return float(temperature), (f"probabilities calibrated: softmax at the temperature {temperature:.4g} "
                                    f"fitted on {where}")
    return DEFAULT_TEMPERATURE, (f"probabilities uncalibrated: softmax of the cosines at logit scale "
                                 f"{1 / DEFAULT_TEMPERATURE:g} (temperature {DEFAULT_TEMPERATURE:g}, CLIP's); "
                                 "the model stores no calibration, so read them as a ranking, not as odds")


def classify(model: "OneEncoder", modality: str, inputs: Any, labels: Sequence[str],
             template: str | Sequence[str] = "{}", k: int = 5, temperature: float = DEFAULT_TEMPERATURE,
             batch_size: int = 32, progress: bool | None = None,
             cache: "CachedFeatures | None" = None) -> Classification:
    """Classify ``inputs`` of ``modality`` among ``labels`` (see :meth:`OneEncoder.classify`)."""
    if k < 1:
        raise OneEncoderError(f"classify: k must be >= 1, got {k}")
    if not temperature > 0:
        raise OneEncoderError(f"classify: temperature must be > 0, got {temperature}")
    text = label_embeddings(model, labels, template, batch_size)
    emb = model.encode(modality, inputs, batch_size=batch_size, progress=progress, cache=cache)
    scores = emb @ text.T
    probs = (scores / temperature).softmax(-1)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, : min(k, len(labels))]
    names = [str(x).strip() for x in labels]
    top = [[(names[j], float(scores[i, j]), float(probs[i, j])) for j in row.tolist()]
           for i, row in enumerate(order)]
    return Classification(names, scores.numpy(), probs.numpy(), top)
