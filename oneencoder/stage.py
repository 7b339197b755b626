"""Run one stage file end to end: banks from the cache, the generic trainer, the model directory.

A stage aligns two modalities. Parts listed in ``trainable`` learn; everything
else the model already holds is locked (Stage 1 trains the projection and both
adapters; an add-modality stage trains one adapter and its token).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bank import FeatureBank
from .cache import FeatureCache, cache_dir_for
from .checkpoint import META, load_model, modality_from_meta, modality_meta, read_meta, save_model
from .config import StageConfig
from .curriculum.difficulty import DifficultyTable, compute_difficulty, difficulty_path
from .curriculum.online import LossPredictor
from .curriculum.samplers import build_sampler, mine_neighbours
from .curriculum.scorers import list_scorers
from .errors import ConfigError, OneEncoderError
from .evaluate import embed_bank, evaluate_samples, retrieval_between
from .fileio import write_json_atomic
from .losses import create_loss
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
    computed once; only side ``a`` runs through the model. With ``margins``
    (per training pair), the loss gets a dynamic margin that grows with difficulty.
    """

    def __init__(self, model: OneEncoderModel, loss: nn.Module, pair: tuple[str, str], data: PairSplit,
                 fixed_b: torch.Tensor | None = None, margins: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model, self.loss, self.pair = model, loss, pair
        self.data = data
        self.register_buffer("groups", data.group_codes, persistent=False)
        self.register_buffer("fixed_b", fixed_b, persistent=False)
        self.register_buffer("margins", margins, persistent=False)

    def embed(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.pair
        ea = self.model(a, *self.data.banks[a].gather(index))
        eb = self.fixed_b[index] if self.fixed_b is not None else self.model(b, *self.data.banks[b].gather(index))
        return ea.float(), eb.float()

    def forward(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        index = index.to(self.groups.device)
        ea, eb = self.embed(index)
        extra = {"margin": self.margins[index]} if self.margins is not None else {}
        return self.loss(ea, eb, self.groups[index], **extra)


def _score(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """Validation summary; ``score`` = mean recall (R@1, R@5, R@10 in both directions)."""
    out: dict[str, float] = {}
    for direction, r in results.items():
        for k in ("R@1", "R@5", "R@10"):
            out[f"{direction}/{k}"] = r["metrics"][k]
    out["score"] = sum(out.values()) / max(1, len(out))
    return out


def stage_difficulty(config: StageConfig, records: list[dict], scorers: list[str] | None = None,
                     force: bool = False) -> tuple[DifficultyTable, Path]:
    """Difficulty scores of the stage's training pairs, computed once and stored next to the cache.

    A stored table is reused when it covers the same pairs and every scorer the stage weights.
    """
    names = tuple(config.modalities)
    path = difficulty_path(config.data.cache_dir, names)
    wanted = scorers or list_scorers()
    train = [r for r in records if r.get("split") == "train"]
    if path.exists() and not force:
        table = DifficultyTable.load(path)
        cached_ids = set(load_pair_split(records, "train", _stage_modalities(config), config.data.cache_dir).ids)
        if set(table.ids) == cached_ids and all(s in table.scores for s in config.curriculum.scorers):
            return table, path
    table = compute_difficulty(train, config.data.cache_dir, _stage_modalities(config), wanted)
    table.save(path)
    return table, path


def _stage_modalities(config: StageConfig) -> dict[str, Modality]:
    return {n: create_modality(n, **config.modality_options.get(n, {})) for n in config.modalities}


def _aligned(table: DifficultyTable, weights: dict[str, float], ids: list[str]) -> torch.Tensor:
    """Combined difficulty in [0, 1] for ``ids`` in that order."""
    combined = table.combined(weights)
    where = {sid: i for i, sid in enumerate(table.ids)}
    return torch.tensor([float(combined[where[sid]]) for sid in ids], dtype=torch.float32)


def _pooled_frozen(train: PairSplit) -> torch.Tensor:
    """Both modalities' frozen features, mean-pooled and unit-norm, side by side: ``[N, D_a + D_b]``."""
    parts = []
    for bank in train.banks.values():
        tokens, mask = bank.gather(torch.arange(len(bank)))
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        parts.append(torch.nn.functional.normalize(pooled.float().cpu(), dim=-1))
    return torch.cat(parts, dim=1) / len(parts) ** 0.5


def _frozen_neighbours(train: PairSplit, k: int) -> torch.Tensor:
    """Near neighbours in both frozen feature spaces (mean of the two cosines), other groups only."""
    return mine_neighbours(_pooled_frozen(train), train.group_codes, k)


def _remove_model_files(model_dir: Path) -> None:
    """Everything of an old model, including the runs of stages that built on its projection."""
    (model_dir / META).unlink(missing_ok=True)
    (model_dir / "projection.safetensors").unlink(missing_ok=True)
    shutil.rmtree(model_dir / "adapters", ignore_errors=True)
    shutil.rmtree(model_dir / "runs", ignore_errors=True)


def _prepare_model(config: StageConfig, model_dir: Path, modalities: dict[str, Modality], overwrite: bool,
                   resuming: bool, replace: bool = False) -> OneEncoderModel:
    trains_projection = "projection" in config.trainable
    exists = (model_dir / META).exists()
    if trains_projection:
        if exists and not (overwrite or resuming):
            raise OneEncoderError(f"{model_dir} already holds a model; pass --overwrite to retrain Stage 1 into it")
        if exists and not resuming:  # a fresh Stage 1: nothing of the old model may survive
            _remove_model_files(model_dir)
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
        if name in model.modalities and not (replace or resuming or trains_projection):
            raise OneEncoderError(f"{model_dir} already holds a {name!r} adapter; pass --replace to retrain it")
        m = modalities[name]
        model.add_modality(name, m.feature_dim, m.max_tokens, config.adapter, m.language_slice())
    for name in model.modalities:
        if name not in config.trainable:
            model.lock_adapter(name)
    if not trains_projection:
        model.lock_projection()
    return model


def _locked_anchor(config: StageConfig) -> str | None:
    """The already-trained side of an add-modality stage (None when the projection trains)."""
    if "projection" in config.trainable:
        return None
    frozen = [n for n in config.modalities if n not in config.trainable]
    return frozen[0] if len(frozen) == 1 else None


def _model_modalities(model_dir: Path, records: list[dict], exclude: set[str]) -> dict[str, Modality]:
    """Modalities the model already holds whose inputs the manifest has (for emergent evaluation)."""
    meta = read_meta(model_dir)
    return {n: modality_from_meta(n, info) for n, info in meta["modalities"].items()
            if n not in exclude and any(r.get(info["record_key"]) for r in records)}


RUN_SETTINGS = "settings.json"
# Train settings that do not change what is learned.
_UNLEARNED = ("device", "log_every", "eval_batch_size")


def run_settings(config: StageConfig, data_hash: str, metas: dict[str, dict]) -> dict[str, Any]:
    """What a run's result depends on: the stage settings, the data's content and the backbones."""
    settings = config.to_dict()
    settings.pop("source", None)
    settings["data"] = {"records_sha256": data_hash}  # the data, not where it lies
    settings["train"] = {k: v for k, v in settings["train"].items() if k not in _UNLEARNED}
    return json.loads(json.dumps({"stage": settings, "modalities": metas}))  # as stored: tuples become lists


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _changed_settings(run_dir: Path, settings: dict[str, Any]) -> str | None:
    """None when the run in ``run_dir`` was made with ``settings``; else what differs."""
    path = run_dir / RUN_SETTINGS
    if not path.exists():
        return "made by an older oneencoder, without its settings"
    changed = _differences(json.loads(path.read_text()), settings)
    if not changed:
        return None
    return f"made with other settings (changed: {', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''})"


def run_stage(config: StageConfig, model_dir: str | Path, *, resume: bool = True, overwrite: bool = False,
              replace: bool = False, restart_if_changed: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train one stage and evaluate the best checkpoint on the test split.

    A run resumes only if it was made with the same settings, data and backbones
    (``runs/<stage>/settings.json``). Otherwise it is an error, or, with
    ``restart_if_changed``, the stage starts over (what the demos do on rerun).

    Stage 1 trains the projection and both adapters. An add-modality stage (one
    trainable modality, ``projection`` not trainable) trains only that adapter and
    its token against the frozen anchor, whose embeddings are computed once.

    Returns the test results (as written to ``<model_dir>/runs/<stage>/test.json``).
    """
    model_dir = Path(model_dir)
    run_dir = model_dir / "runs" / config.name
    if run_dir.exists() and ((overwrite and not resume) or replace):
        shutil.rmtree(run_dir)
    # Rerunning a stage resumes it; a finished run resumes to its end and re-reports.
    resuming = resume and (run_dir / "last.json").exists()
    seed_everything(config.train.seed)
    device = pick_device(config.train.device)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    records = read_manifest(config.data.manifest)
    names = list(config.modalities)
    modalities = _stage_modalities(config)
    anchor = _locked_anchor(config)
    if anchor is not None:  # the anchor must be exactly the model's own modality (options, weights)
        modalities.update(_model_modalities(model_dir, records, set(config.trainable)))
        modalities = {n: modalities[n] for n in names}
    metas = {n: modality_meta(m) for n, m in modalities.items()}
    data_hash = manifest_hash(records)
    settings = run_settings(config, data_hash, metas)
    changed = _changed_settings(run_dir, settings) if resuming else None
    if changed and not restart_if_changed:
        flag = "--overwrite" if "projection" in config.trainable else "--replace"
        raise OneEncoderError(f"{run_dir} holds a run of {config.name!r} {changed}, so it cannot be resumed; "
                              f"pass {flag} to start it over")
    if changed:
        print(f"{config.name}: the run in {run_dir} was {changed}; starting it over")
        shutil.rmtree(run_dir)
        resuming, replace = False, True
    model = _prepare_model(config, model_dir, modalities, overwrite, resuming, replace)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / RUN_SETTINGS, settings)
    train = load_pair_split(records, "train", modalities, config.data.cache_dir, device)
    val = load_pair_split(records, "val", modalities, config.data.cache_dir, device)
    if len(train.ids) < 2 or len(val.ids) < 1:
        raise OneEncoderError(f"{config.data.manifest}: need train and val pairs cached for {names}; "
                              f"have {len(train.ids)} train, {len(val.ids)} val (run `oneencoder cache build`)")
    lc, cur = config.loss, config.curriculum
    loss = create_loss(lc.name, init_temperature=lc.init_temperature, max_logit_scale=lc.max_logit_scale,
                       learn_temperature=lc.learn_temperature,
                       **({"beta": lc.beta} if lc.name == "hnnce" else {}))
    needs_difficulty = cur.pacer != "random" or lc.name == "margin"
    difficulty = (_aligned(stage_difficulty(config, records)[0], cur.scorers, train.ids)
                  if needs_difficulty else None)
    neighbours = _frozen_neighbours(train, cur.hn_k) if cur.hard_negatives > 0 else None
    margins = lc.max_margin * difficulty if lc.name == "margin" and difficulty is not None else None
    pair = (names[0], names[1]) if anchor != names[0] else (names[1], names[0])
    fixed = None
    if anchor is not None:  # frozen anchor: embed it once, then it is a constant
        model.eval()
        fixed = embed_bank(model, anchor, train.banks[anchor], config.train.eval_batch_size).detach()
    objective = PairObjective(model, loss, pair, train, fixed_b=fixed, margins=margins)
    predictor = (LossPredictor(_pooled_frozen(train), seed=config.train.seed)
                 if cur.pacer == "self_paced" and cur.loss_predictor else None)
    sampler = build_sampler(cur, len(train.ids), config.train.batch_size, config.train.seed,
                            difficulty=None if difficulty is None else difficulty.numpy(),
                            groups=train.group_codes, neighbours=neighbours, predictor=predictor)
    callbacks = []
    if cur.hard_negatives > 0 and cur.hn_source == "model":
        def refresh_neighbours(epoch: int) -> None:  # mine on the current embeddings
            with torch.no_grad():
                ea, eb = objective.embed(torch.arange(len(train.ids), device=objective.groups.device))
            both = torch.cat([ea, eb], dim=1).cpu() / 2**0.5
            sampler.set_neighbours(mine_neighbours(both, train.group_codes, cur.hn_k))
        callbacks.append(refresh_neighbours)
    a, b = names
    dedupe = {n: modalities[n].spec.dedupe_in_eval for n in names}
    entry = {"name": config.name, "pair": names, "trainable": config.trainable,
             "data_hash": data_hash, "config": config.to_dict(),
             "n_train": len(train.ids), "n_val": len(val.ids)}

    # A frozen anchor is ranked in full: every validation sample it has, not only those
    # paired with the new modality (e.g. all val captions, not the 14 with a sound). The
    # bigger gallery makes the score less noisy, and it matches the test protocol.
    gallery = {a: val, b: val}
    if anchor is not None:
        full = load_pair_split(records, "val", {anchor: modalities[anchor]}, config.data.cache_dir, device)
        gallery[anchor] = full
        anchor_val = embed_bank(model, anchor, full.banks[anchor], config.train.eval_batch_size)

    def validate() -> dict[str, float]:
        ea, eb = (anchor_val if n == anchor else embed_bank(model, n, gallery[n].banks[n], config.train.eval_batch_size)
                  for n in (a, b))
        ga, gb = gallery[a].groups, gallery[b].groups
        return _score({f"{a}→{b}": retrieval_between(ea, ga, eb, gb, dedupe[a], dedupe[b]),
                       f"{b}→{a}": retrieval_between(eb, gb, ea, ga, dedupe[b], dedupe[a])})

    def on_best(val_metrics: dict[str, float]) -> None:
        save_model(model, model_dir, metas, {**entry, "val": val_metrics}, write=list(config.trainable))

    trainer = Trainer(config.train, objective, sampler, validate, on_best, run_dir, device, progress, callbacks)
    if resuming and trainer.try_resume():
        print(f"resuming {config.name} from step {trainer.step} (epoch {trainer.epoch})")
    fit = trainer.fit()
    best, meta = load_model(model_dir)
    evaluated = dict(modalities)
    if anchor is not None:  # also the model's other modalities: emergent pairs never trained together
        others = _model_modalities(model_dir, records, set(names))
        evaluated.update({n: m for n, m in others.items()
                          if (cache_dir_for(config.data.cache_dir, n) / "data.mdb").exists()})
    test = evaluate_samples(best, evaluated, records, config.data.cache_dir, "test")
    summary = {"stage": config.name, "pair": names, "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
               "steps": fit.steps, "train_seconds": round(fit.seconds, 1), "test": test}
    write_json_atomic(run_dir / "test.json", summary)
    _record_test_metrics(model_dir, meta, config.name, test, fit.best_epoch)
    return summary


def _rounded(directions: dict) -> dict:
    return {d: {k: round(v, 4) for k, v in r["metrics"].items()} for d, r in directions.items()}


def _record_test_metrics(model_dir: Path, meta: dict, stage: str, test: dict, best_epoch: int) -> None:
    for entry in meta["stages"]:
        if entry["name"] == stage:
            entry["best_epoch"] = best_epoch
            entry["test"] = _rounded(test["directions"])
            for subset, directions in test.get("subsets", {}).items():
                entry[f"test[{subset}]"] = _rounded(directions)
    write_json_atomic(model_dir / META, meta)
