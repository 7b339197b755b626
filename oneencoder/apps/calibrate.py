"""Fit the match calibration and per-modality means of an existing model on its validation split.

A stage fits them when it ends (:mod:`oneencoder.evaluation.validation_fit`); this does it for a
model trained before they existed, or on other validation data, without retraining anything.

Example:
    >>> report = calibrate("outputs/demo/model", "outputs/demo/manifest.jsonl")
    >>> report["check"]["directions"]["text→image"]["calibration"]["precision"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import OneEncoderError
from ..evaluation.retrieval import evaluate_samples
from ..evaluation.validation_fit import fit_on_validation
from ..progress import status
from ..training.prepare import prepare_stage
from ..training.runs import model_writer


def calibrate(model_dir: str | Path, manifest: str | Path, cache_dir: str | Path | None = None, *,
              split: str = "val", check_split: str | None = "test", log: Callable[[str], None] = status,
              progress: bool = True) -> dict[str, Any]:
    """Fit and store the calibration of every direction between the model's modalities that the
    manifest holds, and each such modality's mean, on ``split``; then check them on ``check_split``.

    Only ``oneencoder.json`` and ``means.safetensors`` change: weights stay byte-identical.

    Returns:
        ``{"split", "calibration": {direction: stored form}, "means": {modality: samples},
        "check": evaluate_samples(...) on check_split with the new calibration (None if skipped
        or the manifest has no such samples)}``.

    Raises:
        OneEncoderError: Fewer than two of the model's modalities in the manifest, or no pairs on ``split``.
    """
    with model_writer(model_dir):
        prepared = prepare_stage(model_dir=model_dir, manifest=manifest, cache_dir=cache_dir, build_caches=False)
        if len(prepared.modalities) < 2:
            raise OneEncoderError(f"{manifest}: inputs for {len(prepared.modalities)} of the model's modalities "
                                  f"({', '.join(prepared.modalities) or 'none'}); calibration needs two")
        prepared.build_caches(log=log, progress=progress)
        fit = fit_on_validation(prepared.model, prepared.modalities, prepared.records, prepared.cache_dir, split=split)
        if not fit.calibration:
            raise OneEncoderError(f"{manifest}: no {split!r} pairs with matching and non-matching items to fit on")
        fit.save(model_dir)
    check = None
    if check_split and any(r.get("split") == check_split for r in prepared.records):
        check = evaluate_samples(prepared.model, prepared.modalities, prepared.records, prepared.cache_dir,
                                 check_split, calibration=fit.calibration)
    return {"split": split, "calibration": {d: c.to_dict() for d, c in fit.calibration.items()},
            "means": dict(fit.counts), "check": check}
