"""Captions for any modality of a model: train its decoder once on text, then describe and score.

:func:`fit_decoder` embeds the training captions of a manifest (from the feature cache where
it holds them), trains one decoder per noise level of a grid, keeps the one whose captions
of the validation images (or another modality) score best in CIDEr-D, chooses the DeCap
projection on the same split, and saves it in the model directory. :func:`evaluate_captions`
scores it against two baselines on a held-out split: retrieval captioning (the nearest
training caption) and the text-only prior (the most frequent training caption).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import OneEncoderError
from ..evaluation.captions import caption_scores
from ..features.lookup import CachedFeatures
from ..generation.captioner import PROJECTIONS, Captioner, load_captioner
from ..generation.train import CaptionData, train_captioner
from ..progress import status
from ..training.config import TrainConfig
from ..training.runs import model_writer
from .api import OneEncoder
from .zeroshot import caption_modality

#: Per-dimension std of the CapDec noise tried (embeddings have ~1000 dims: noise norms ~0.3 to
#: ~1.3). No noise lost to 0.01 on the demo's validation images (CIDEr-D 0.708 vs 0.811).
NOISE_GRID = (0.01, 0.02, 0.04)
DECODER_TRAIN = TrainConfig(epochs=30, batch_size=64, lr=1e-3, weight_decay=0.01, warmup_steps=50, patience=6,
                            log_every=50)


def imagenet_captions() -> list[str]:
    """"A tench.", "An electric ray."...: the first name of each ImageNet class, as extra training text."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = [info.index_to_description(i).split(",")[0].strip() for i in range(info.num_classes())]
    return [f"{'An' if n[:1].lower() in 'aeiou' else 'A'} {n}." for n in names]


def _embed(m: OneEncoder, modality: str, inputs: Sequence[Any], cache_dir: str | Path | None) -> torch.Tensor:
    with CachedFeatures(m.modality(modality), cache_dir) as cache:
        return m.encode(modality, list(inputs), cache=cache, progress=None)


def _rows(records: list[dict], split: str, modality: str | None, m: OneEncoder) -> list[dict]:
    key = m.modality(modality).spec.record_key if modality else None
    return [r for r in records if r.get("split") == split and r.get("caption") and (key is None or r.get(key))]


def fit_decoder(m: OneEncoder, records: list[dict], cache_dir: str | Path | None, *, condition: str | None = None,
                extra_captions: Sequence[str] = (), noise_grid: Sequence[float] = NOISE_GRID,
                train: TrainConfig = DECODER_TRAIN, progress: bool = True,
                log: Callable[[str], None] = status) -> dict[str, Any]:
    """Train, choose on validation and save the model's caption decoder; returns its record.

    Args:
        condition: The modality whose validation samples choose the noise and the projection
            (default: the first of the model's other modalities with validation rows).
        extra_captions: More training text (e.g. :func:`imagenet_captions`); text only.
    """
    captions = [r["caption"] for r in _rows(records, "train", None, m)] + list(extra_captions)
    if len(captions) < 2:
        raise OneEncoderError("the manifest has fewer than 2 training captions to train a decoder on")
    text_modality = caption_modality(m)
    if condition is None:
        condition = next((n for n in m.modalities if n != text_modality and _rows(records, "val", n, m)), None)
        if condition is None:
            raise OneEncoderError("the manifest has no validation rows with a caption and an input of another "
                                  "modality of this model; the decoder is chosen on them")
    val = _rows(records, "val", condition, m)
    if not val:
        raise OneEncoderError(f"the manifest has no validation rows with a caption and a {condition!r} input; "
                              "the decoder is chosen on them (--condition picks another modality)")
    distinct = list(dict.fromkeys(captions))
    where = {c: i for i, c in enumerate(distinct)}
    text = _embed(m, text_modality, distinct, cache_dir)
    key = m.modality(condition).spec.record_key
    data = CaptionData(captions, text[[where[c] for c in captions]], _embed(m, condition, [r[key] for r in val],
                                                                            cache_dir),
                       [[r["caption"]] for r in val])
    digest = hashlib.sha256(json.dumps([captions, vars(train)], default=str).encode()).hexdigest()[:12]
    runs = Path(m.model_dir) / "runs" / "decoder"
    trials: dict[str, float] = {}
    best: tuple[float, float, Captioner] | None = None
    with model_writer(m.model_dir):
        for noise in noise_grid:
            log(f"decoder: noise {noise:g}, {len(captions)} captions ({len(distinct)} distinct), "
                f"validation {len(val)} {condition} samples")
            captioner, score = train_captioner(data, runs / f"noise-{noise:g}-{digest}", noise_std=noise, train=train,
                                               progress=progress, log=log)
            trials[f"{noise:g}"] = score
            if best is None or score > best[0]:
                best = (score, noise, captioner)
        assert best is not None
        score, noise, captioner = best
        projected = {}
        for projection in PROJECTIONS:
            found = captioner.describe(data.val_embeddings, beam=1, projection=projection)
            projected[projection] = caption_scores([f[0] for f in found], data.val_references)["CIDEr-D"]
        captioner.projection = max(PROJECTIONS, key=lambda p: projected[p])
        info = {"condition": condition, "noise_std": noise, "projection": captioner.projection,
                "val_cider_d": score, "val_cider_d_by_noise": trials,
                "val_cider_d_by_projection": projected, "n_captions": len(captions), "n_distinct": len(distinct),
                "n_extra_captions": len(extra_captions), "n_val": len(val), "train": vars(train)}
        captioner.save(m.model_dir, info)
    log(f"decoder: chose noise {noise:g} (validation CIDEr-D {score:.3f}) and projection {captioner.projection!r} "
        f"({projected[captioner.projection]:.3f}); saved in {m.model_dir}/decoder")
    return info


def evaluate_captions(m: OneEncoder, records: list[dict], cache_dir: str | Path | None, split: str = "test",
                      modalities: Sequence[str] | None = None, beam: int = 3,
                      captioner: Captioner | None = None) -> dict[str, Any]:
    """Decoder, retrieval captioning and the text-only prior on ``split``, for every modality of the
    model (other than text) whose inputs and captions the manifest has.

    Returns:
        ``{modality: {"n": ..., "decoder": scores, "retrieval": scores, "prior": scores,
        "examples": [...]}}`` with BLEU-1..4, CIDEr-D and WER per row.
    """
    captioner = captioner or load_captioner(m.model_dir)  # read now: m.meta predates a decoder just trained
    out: dict[str, Any] = {}
    text_modality = caption_modality(m)
    for name in modalities or [n for n in m.modalities if n != text_modality]:
        rows = _rows(records, split, name, m)
        if not rows:
            continue
        key = m.modality(name).spec.record_key
        emb = _embed(m, name, [r[key] for r in rows], cache_dir)
        refs = [[r["caption"]] for r in rows]
        written = [f[0] for f in captioner.describe(emb, beam=beam)]
        nearest = captioner.nearest(emb)
        out[name] = {"n": len(rows), "decoder": caption_scores(written, refs),
                     "retrieval": caption_scores(nearest, refs),
                     "prior": caption_scores([captioner.prior] * len(rows), refs),
                     "examples": [{"id": r["id"], "caption": r["caption"], "decoder": w, "retrieval": n}
                                  for r, w, n in list(zip(rows, written, nearest))[:10]]}
    if not out:
        raise OneEncoderError(f"no {split!r} rows with a caption and an input of this model's modalities")
    return out
