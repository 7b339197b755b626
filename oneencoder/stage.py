"""Run one stage file end to end: banks from the cache, the generic trainer, the model directory.

A stage aligns two modalities. Parts listed in ``trainable`` learn; everything
else the model already holds is locked (Stage 1 trains the projection and both
adapters; an add-modality stage trains one adapter and its token).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bank import FeatureBank
from .cache import FeatureCache, cache_dir_for
from .checkpoint import META, load_model, modality_meta, save_model
from .config import StageConfig
from .curriculum import build_sampler
from .errors import ConfigError, OneEncoderError
from .evaluate import embed_bank, evaluate_samples, retrieval_between
from .fileio import write_json_atomic
from .losses import ContrastiveLoss
from .manifest import manifest_hash, read_manifest
from .model import OneEncoderModel
from .registry import Modality, create_modality
from .train import Trainer, pick_device, seed_everything


@dataclass
class PairSplit:
    """Aligned samples of one split: row i of both banks is one pair."""

    ids: list[str]
    groups: list[str]
    banks: dict[str, FeatureBank]

    @property
    def group_codes(self) -> torch.Tensor:
        codes = {g: i for i, g in enumerate(dict.fromkeys(self.groups))}
        return torch.tensor([codes[g] for g in self.groups])


def load_pair_split(records: list[dict], split: str, modalities: dict[str, Modality], cache_root: str | Path,
                    device: torch.device | str = "cpu") -> PairSplit:
    """Samples of ``split`` that are cached (not rejected) for every modality, as banks."""
    rows = [r for r in records if r.get("split") == split]
    caches = {n: FeatureCache(cache_dir_for(cache_root, n), m.fingerprint(), readonly=True) for n, m in modalities.items()}
    try:
        for cache in caches.values():
            have = cache.ids()
            rows = [r for r in rows if r["id"] in have]
        ids = [r["id"] for r in rows]
        banks = {n: FeatureBank.from_cache(c, ids, device) for n, c in caches.items()} if ids else {}
    finally:
        for cache in caches.values():
            cache.close()
    return PairSplit(ids, [r.get("group", r["id"]) for r in rows], banks)


class PairObjective(nn.Module):
    """Contrastive loss of a batch of aligned pairs gathered from feature banks.

    If ``fixed_b`` is given, side ``b`` is a frozen anchor whose embeddings were
    computed once; only side ``a`` runs through the model.
    """

    def __init__(self, model: OneEncoderModel, loss: nn.Module, pair: tuple[str, str], data: PairSplit,
                 fixed_b: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model, self.loss, self.pair = model, loss, pair
        self.data = data
        self.register_buffer("groups", data.group_codes, persistent=False)
        self.register_buffer("fixed_b", fixed_b, persistent=False)

    def forward(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        a, b = self.pair
        device = self.groups.device
        index = index.to(device)
        ea = self.model(a, *self.data.banks[a].gather(index))
        eb = self.fixed_b[index] if self.fixed_b is not None else self.model(b, *self.data.banks[b].gather(index))
        return self.loss(ea.float(), eb.float(), self.groups[index])


def _score(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """Validation summary; ``score`` = mean recall (R@1, R@5, R@10 in both directions)."""
    out: dict[str, float] = {}
    for direction, r in results.items():
        for k in ("R@1", "R@5", "R@10"):
            out[f"{direction}/{k}"] = r["metrics"][k]
    out["score"] = sum(out.values()) / max(1, len(out))
    return out


def _prepare_model(config: StageConfig, model_dir: Path, modalities: dict[str, Modality], overwrite: bool,
                   resuming: bool) -> OneEncoderModel:
    trains_projection = "projection" in config.trainable
    exists = (model_dir / META).exists()
    if trains_projection:
        if exists and not (overwrite or resuming):
            raise OneEncoderError(f"{model_dir} already holds a model; pass --overwrite to retrain Stage 1 into it")
        model = OneEncoderModel(config.model)
    else:
        if not exists:
            raise OneEncoderError(f"stage {config.name!r} builds on a trained model, but {model_dir} has none")
        model, _ = load_model(model_dir)
    for name in config.trainable:
        if name == "projection":
            continue
        if name not in modalities:
            raise ConfigError(f"[stage] trainable lists {name!r}, which is not one of the stage's modalities")
        m = modalities[name]
        model.add_modality(name, m.feature_dim, m.max_tokens, config.adapter)
    for name in model.modalities:
        if name not in config.trainable:
            model.lock_adapter(name)
    if not trains_projection:
        model.lock_projection()
    return model


def run_stage(config: StageConfig, model_dir: str | Path, *, resume: bool = True, overwrite: bool = False,
              progress: bool = True) -> dict[str, Any]:
    """Train one stage and evaluate the best checkpoint on the test split.

    Returns the test results (as written to ``<model_dir>/runs/<stage>/test.json``).
    """
    model_dir = Path(model_dir)
    run_dir = model_dir / "runs" / config.name
    if overwrite and not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    resuming = resume and (run_dir / "last.json").exists()
    seed_everything(config.train.seed)
    device = pick_device(config.train.device)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    records = read_manifest(config.data.manifest)
    names = list(config.modalities)
    modalities = {n: create_modality(n, **config.modality_options.get(n, {})) for n in names}
    model = _prepare_model(config, model_dir, modalities, overwrite, resuming)
    train = load_pair_split(records, "train", modalities, config.data.cache_dir, device)
    val = load_pair_split(records, "val", modalities, config.data.cache_dir, device)
    if len(train.ids) < 2 or len(val.ids) < 1:
        raise OneEncoderError(f"{config.data.manifest}: need train and val pairs cached for {names}; "
                              f"have {len(train.ids)} train, {len(val.ids)} val (run `oneencoder cache build`)")
    lc = config.loss
    loss = ContrastiveLoss(lc.init_temperature, lc.max_logit_scale, lc.learn_temperature)
    objective = PairObjective(model, loss, (names[0], names[1]), train)
    sampler = build_sampler(config.curriculum, len(train.ids), config.train.batch_size, config.train.seed)
    a, b = names
    dedupe = {n: modalities[n].spec.dedupe_in_eval for n in names}
    metas = {n: modality_meta(m) for n, m in modalities.items()}
    entry = {"name": config.name, "pair": names, "trainable": config.trainable,
             "data_hash": manifest_hash(records), "config": config.to_dict(),
             "n_train": len(train.ids), "n_val": len(val.ids)}

    def validate() -> dict[str, float]:
        ea = embed_bank(model, a, val.banks[a], config.train.eval_batch_size)
        eb = embed_bank(model, b, val.banks[b], config.train.eval_batch_size)
        return _score({f"{a}→{b}": retrieval_between(ea, val.groups, eb, val.groups, dedupe[a], dedupe[b]),
                       f"{b}→{a}": retrieval_between(eb, val.groups, ea, val.groups, dedupe[b], dedupe[a])})

    def on_best(val_metrics: dict[str, float]) -> None:
        save_model(model, model_dir, metas, {**entry, "val": val_metrics}, write=list(config.trainable))

    trainer = Trainer(config.train, objective, sampler, validate, on_best, run_dir, device, progress)
    if resuming and trainer.try_resume():
        print(f"resuming {config.name} from step {trainer.step} (epoch {trainer.epoch})")
    fit = trainer.fit()
    best, meta = load_model(model_dir)
    test = evaluate_samples(best, modalities, records, config.data.cache_dir, "test")
    summary = {"stage": config.name, "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
               "steps": fit.steps, "train_seconds": round(fit.seconds, 1), "test": test}
    write_json_atomic(run_dir / "test.json", summary)
    _record_test_metrics(model_dir, meta, config.name, test, fit.best_epoch)
    return summary


def _record_test_metrics(model_dir: Path, meta: dict, stage: str, test: dict, best_epoch: int) -> None:
    for entry in meta["stages"]:
        if entry["name"] == stage:
            entry["best_epoch"] = best_epoch
            entry["test"] = {d: {k: round(v, 4) for k, v in r["metrics"].items()} for d, r in test["directions"].items()}
    write_json_atomic(model_dir / META, meta)
