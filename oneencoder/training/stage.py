"""Run one stage file end to end: its data, its objective, the generic trainer, the model directory.

A stage aligns two modalities. Parts listed in ``trainable`` learn; everything
else the model already holds is locked (Stage 1 trains the projection and both
adapters; an add-modality stage trains one adapter and its token).

The phases live in their own modules: ``plan`` (what the loss and curriculum need,
resolved once from the config), ``pairs`` (modalities, banks, difficulty),
``objective`` (loss and validation), ``runs`` (settings and resume); this module
builds the model and wires them to the :class:`~oneencoder.training.trainer.Trainer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data.manifest import manifest_hash, read_manifest
from ..errors import ConfigError, OneEncoderError
from ..evaluation.metrics import small_split_warning
from ..evaluation.model_card import write_model_card
from ..evaluation.retrieval import embed_bank, evaluate_samples
from ..evaluation.validation_fit import fit_on_validation
from ..features.cache import cache_dir_for
from ..fileio import sha256_file, write_json_atomic
from ..modality import Modality
from ..model.checkpoint import META, load_model, modality_meta, read_meta, save_model
from ..model.parts import OneEncoderModel, build_model
from ..model.transaction import recover
from ..names import remove_tree_inside, safe_name
from ..progress import status
from ..runtime import deterministic_on_cpu, pick_device, seed_everything
from . import distributed as ddp
from .config import StageConfig
from .curriculum.online import LossPredictor
from .curriculum.samplers import build_sampler, mine_neighbours
from .curriculum.weights import build_weights, group_balance_weights
from .objective import PairObjective, retrieval_validator
from .pairs import (frozen_neighbours, load_pair_split, locked_anchor, model_modalities, pooled_frozen,
                    require_pairs, stage_difficulty, stage_modalities, train_difficulty, train_trust,
                    viewed_modalities)
from .plan import CurriculumPlan
from .runs import changed_settings, model_writer, remove_model_files, run_settings, RUN_SETTINGS
from .trainer import Trainer

__all__ = ["run_stage", "RUN_SETTINGS"]


def _init_weights(model: OneEncoderModel, init_from: Path, metas: dict[str, dict]) -> None:
    """Start a Stage 1 from another model's projection and adapters (fine-tuning)."""
    source, meta = load_model(init_from)
    if source.projection_config != model.projection_config:
        raise ConfigError(f"--init-from {init_from}: its projection {meta['projection']} differs from this "
                          f"stage's [model] settings; use the same shape to fine-tune")
    model.projection.load_state_dict(source.projection.state_dict())
    for name, facts in metas.items():
        theirs = meta["modalities"].get(name)
        if theirs is None:
            continue  # a modality the source lacks starts fresh
        if theirs["weights_sha256"] != facts["weights_sha256"] or theirs["feature_dim"] != facts["feature_dim"]:
            raise ConfigError(f"--init-from {init_from}: its {name} backbone differs from this stage's "
                              f"({theirs['backbone']} vs {facts['backbone']})")
        if source.adapter_configs[name] != model.adapter_configs[name]:
            raise ConfigError(f"--init-from {init_from}: its {name} adapter shape differs from this stage's [adapter]")
        model.adapters[name].load_state_dict(source.adapters[name].state_dict())


def _prepare_model(config: StageConfig, model_dir: Path, metas: dict[str, dict], overwrite: bool,
                   resuming: bool, replace: bool = False, init_from: Path | None = None) -> OneEncoderModel:
    trains_projection = "projection" in config.trainable
    exists = (model_dir / META).exists()
    if trains_projection:
        if exists and not (overwrite or resuming):
            raise OneEncoderError(f"{model_dir} already holds a model; pass --overwrite to retrain Stage 1 into it")
        if exists and not resuming:  # a fresh Stage 1: nothing of the old model may survive
            remove_model_files(model_dir)
        trained = {n: metas[n] for n in config.trainable if n != "projection"}
        model = build_model(config.model, trained, {n: config.adapter_for(n) for n in trained})
        if init_from is not None and not resuming:
            _init_weights(model, init_from, trained)
    else:
        if init_from is not None:
            raise ConfigError("--init-from fine-tunes a Stage 1 (a stage that trains the projection)")
        if not exists:
            raise OneEncoderError(f"stage {config.name!r} builds on a trained model, but {model_dir} has none")
        held = read_meta(model_dir)["modalities"]
        for name in config.trainable:
            if name in held and not (replace or resuming):
                raise OneEncoderError(f"{model_dir} already holds a {name!r} adapter; pass --replace to retrain it")
        # A retrained adapter (--replace, or a run killed after its first best model) starts as a
        # new one: built in the same order, from the same random state, as in a first run.
        model, _ = load_model(model_dir, without=config.trainable)
        for name in config.trainable:
            model.add_adapter(name, metas[name], config.adapter_for(name))
    for name in model.modalities:
        if name not in config.trainable:
            model.lock_adapter(name)
    if not trains_projection:
        model.lock_projection()
    return model


def _resolve_run(config: StageConfig, model_dir: Path, run_dir: Path, settings: dict[str, Any], resuming: bool,
                 restart_if_changed: bool) -> tuple[bool, bool]:
    """``(resuming, start_over)`` after comparing the stored run settings with these."""
    changed = changed_settings(run_dir, settings) if resuming else None
    if changed and not restart_if_changed:
        flag = "--overwrite" if "projection" in config.trainable else "--replace"
        raise OneEncoderError(f"{run_dir} holds a run of {config.name!r} {changed}, so it cannot be resumed; "
                              f"pass {flag} to start it over")
    if changed:
        status(f"{config.name}: the run in {run_dir} was {changed}; starting it over")
        remove_tree_inside(model_dir, "runs", config.name)
        return False, True
    return resuming, False


def _started_run(run_dir: Path) -> bool:
    """A run of this stage began here (its settings are written before any model file)."""
    return (run_dir / "last.safetensors").exists() or (run_dir / RUN_SETTINGS).exists()


def run_stage(config: StageConfig, model_dir: str | Path, *, resume: bool = True, overwrite: bool = False,
              replace: bool = False, restart_if_changed: bool = False, progress: bool = True,
              init_from: str | Path | None = None) -> dict[str, Any] | None:
    """Train one stage and evaluate the best checkpoint on the test split.

    A run resumes only if it was made with the same settings, data and backbones
    (``runs/<stage>/settings.json``). Otherwise it is an error, or, with
    ``restart_if_changed``, the stage starts over (what the demos do on rerun).

    Stage 1 trains the projection and both adapters (from scratch, or from the weights of
    the model at ``init_from``). An add-modality stage (one trainable modality,
    ``projection`` not trainable) trains only that adapter and its token against the
    frozen anchor, whose embeddings are computed once.

    Under ``torchrun`` every rank runs this function: ``[train] batch_size`` is per rank,
    rank 0 alone writes files, and the other ranks return None.

    One process writes a model directory at a time: a second ``run_stage`` on it stops at
    once with one line (:func:`oneencoder.training.runs.model_writer`) and touches nothing.

    Returns the test results (as written to ``<model_dir>/runs/<stage>/test.json``).
    """
    # A config built in code skips parse_stage: its names become paths, so check them here too.
    safe_name(config.name, "stage name")
    for name in config.modalities:
        safe_name(name, f"stage {config.name!r} modality")
    with model_writer(model_dir):
        return _run_stage(config, Path(model_dir), resume, overwrite, replace, restart_if_changed, progress,
                          init_from)


def _run_stage(config: StageConfig, model_dir: Path, resume: bool, overwrite: bool, replace: bool,
               restart_if_changed: bool, progress: bool, init_from: str | Path | None) -> dict[str, Any] | None:
    """:func:`run_stage` with the model directory's writer lock held."""
    init_from = Path(init_from) if init_from else None
    plan = CurriculumPlan.from_config(config)  # what the loss and curriculum need, before any work
    run_dir = model_dir / "runs" / config.name
    device = ddp.rank_device(pick_device(config.train.device))
    ddp.init_distributed(device)
    if ddp.is_main() and run_dir.exists() and ((overwrite and not resume) or replace):
        remove_tree_inside(model_dir, "runs", config.name)
    ddp.barrier()
    # Rerunning a stage resumes it; a finished run resumes to its end and re-reports.
    resuming = resume and _started_run(run_dir)
    seed_everything(config.train.seed)
    deterministic_on_cpu(device)

    # ----- data: the stage's modalities (the anchor as the model holds it) and their pairs
    records = read_manifest(config.data.manifest)
    names = list(config.modalities)
    modalities = stage_modalities(config, model_dir, records)
    anchor = locked_anchor(config)
    metas = {n: modality_meta(m) for n, m in modalities.items()}
    data_hash = manifest_hash(records)
    settings = run_settings(config, data_hash, metas)
    if ddp.world_size() > 1:  # the global batch, and so every step, depends on it
        settings["world_size"] = ddp.world_size()
    table = None
    if plan.needs_table:  # computed once; a re-scored table would change a resumed run's curriculum
        with ddp.main_process_first():  # rank 0 scores and stores; the others read the stored table
            table, table_path = stage_difficulty(config, records, modalities, plan=plan)
        settings["difficulty_sha256"] = sha256_file(table_path)
    if init_from is not None:
        settings["init_from"] = read_meta(init_from)["files"]  # the weights it starts from
    if ddp.is_main():  # it may delete the old run, so only rank 0 decides
        resuming, started_over = _resolve_run(config, model_dir, run_dir, settings, resuming, restart_if_changed)
    else:
        started_over = False
    resuming, started_over = ddp.broadcast_object((resuming, started_over))
    with ddp.main_process_first():  # rank 0 clears an overwritten model before the others look
        if ddp.is_main():
            recover(model_dir)  # a model update a kill interrupted is finished (or undone) first
        model = _prepare_model(config, model_dir, metas, overwrite, resuming, replace or started_over, init_from)
    if ddp.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / RUN_SETTINGS, settings)
    viewed = viewed_modalities(config, modalities)
    train = load_pair_split(records, "train", modalities, config.data.cache_dir, device, bank=config.train.bank,
                            views=(viewed, config.data.views, config.data.view_seed) if viewed else None)
    val = load_pair_split(records, "val", modalities, config.data.cache_dir, device,
                          bank=config.train.bank)
    require_pairs(records, modalities, train, val, config.data.manifest)
    if ddp.is_main() and (warning := small_split_warning("validation", len(val.ids))):
        status(warning)  # the model is chosen on it

    # ----- objective: loss, curriculum, sampler
    cur = config.curriculum
    loss = plan.build_loss()
    difficulty = train_difficulty(config, table, train) if plan.needs_difficulty else None
    neighbours = frozen_neighbours(train, cur.hn_k) if cur.hard_negatives > 0 else None
    margins = plan.margins(difficulty)
    trust = train_trust(table, train, plan.trust) if plan.trust is not None else None
    balance = group_balance_weights(train.group_codes, cur.group_balance) if cur.group_balance > 0 else None
    weights = build_weights(cur.weighting, trust, cur.superloss_lambda, cur.weight_floor, cur.trust_threshold,
                            balance)
    pair = (names[0], names[1]) if anchor != names[0] else (names[1], names[0])
    fixed = None
    if anchor is not None:  # frozen anchor: embed it once, then it is a constant
        model.eval()
        fixed = embed_bank(model, anchor, train.banks[anchor], config.train.eval_batch_size).detach()
    network = torch.compile(model) if config.train.compile else model  # the loss and gathers stay eager
    objective = PairObjective(network, loss, pair, train, fixed_b=fixed, margins=margins, weights=weights)
    predictor = LossPredictor(pooled_frozen(train), seed=config.train.seed) if plan.loss_predictor else None
    global_batch = config.train.batch_size * ddp.world_size()
    if global_batch > len(train.ids) and ddp.world_size() > 1:
        raise ConfigError(f"{ddp.world_size()} ranks × [train] batch_size {config.train.batch_size} = {global_batch} "
                          f"pairs per step, but the training split has {len(train.ids)}; lower batch_size")
    sampler = build_sampler(cur, len(train.ids), global_batch, config.train.seed,
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

    # ----- validation: a frozen anchor is ranked in full (every validation sample it has,
    # not only those paired with the new modality): a bigger gallery, less noise, as in test.
    galleries, frozen = {n: val for n in names}, {}
    if anchor is not None:
        galleries[anchor] = load_pair_split(records, "val", {anchor: modalities[anchor]}, config.data.cache_dir, device)
        frozen[anchor] = embed_bank(model, anchor, galleries[anchor].banks[anchor], config.train.eval_batch_size)
    dedupe = {n: modalities[n].spec.dedupe_in_eval for n in names}
    validate = retrieval_validator(model, (names[0], names[1]), galleries, dedupe, config.train.eval_batch_size, frozen)
    entry = {"name": config.name, "pair": names, "trainable": config.trainable,
             "data_hash": data_hash, "config": config.to_dict(),
             "n_train": len(train.ids), "n_val": len(val.ids),
             **({"init_from": str(init_from)} if init_from else {})}

    def on_best(val_metrics: dict[str, float]) -> None:
        save_model(model, model_dir, metas, {**entry, "val": val_metrics}, write=list(config.trainable))

    # ----- train, then test the best checkpoint
    trainer = Trainer(config.train, objective, sampler, validate, on_best, run_dir, device, progress, callbacks)
    if init_from is not None and not resuming and ddp.is_main():  # the trainer has moved the model to `device`
        _report_baseline(model, validate, init_from)
    if resuming and trainer.try_resume() and ddp.is_main():
        status(f"resuming {config.name} from step {trainer.step} (epoch {trainer.epoch})")
    if viewed:  # each epoch reads its own draw of views, a resumed one included
        train.set_epoch(trainer.epoch)
        trainer.epoch_callbacks.append(train.set_epoch)
    fit = trainer.fit()
    summary = _test(config, model_dir, run_dir, modalities, records, anchor, fit) if ddp.is_main() else None
    ddp.barrier()  # no rank leaves before the model directory is final
    return summary


def _report_baseline(model: OneEncoderModel, validate: Any, init_from: Path) -> None:
    """One line: the starting model's validation score, the baseline that fine-tuning must beat."""
    model.eval()
    with torch.no_grad():
        val = validate()
    recalls = ", ".join(f"{k} {v:.3f}" for k, v in val.items() if k.endswith("/R@1"))
    status(f"baseline (--init-from {init_from}, before training): validation score {val['score']:.4f} "
           f"(mean R@1/5/10 both ways; {recalls})")


def _test(config: StageConfig, model_dir: Path, run_dir: Path, modalities: dict[str, Modality],
          records: list[dict], anchor: str | None, fit: Any) -> dict[str, Any]:
    """Held-out test of the best checkpoint, written to ``test.json`` and the model's stage entry."""
    best, meta = load_model(model_dir)
    evaluated = dict(modalities)
    if anchor is not None:  # also the model's other modalities: emergent pairs never trained together
        others = model_modalities(model_dir, records, set(config.modalities))
        for name in others:  # names read from oneencoder.json become cache folders
            safe_name(name, f"{model_dir / META}: modality")
        evaluated.update({n: m for n, m in others.items()
                          if (cache_dir_for(config.data.cache_dir, n) / "data.mdb").exists()})
    # Match calibration and means, fitted on validation; the test below checks the calibration.
    fitted = fit_on_validation(best, evaluated, records, config.data.cache_dir, stage=config.name,
                               trained=config.trainable)
    test = evaluate_samples(best, evaluated, records, config.data.cache_dir, "test", calibration=fitted.calibration)
    summary = {"stage": config.name, "pair": list(config.modalities), "best_epoch": fit.best_epoch,
               "epochs_run": fit.epochs_run, "steps": fit.steps, "train_seconds": round(fit.seconds, 1), "test": test}
    write_json_atomic(run_dir / "test.json", summary)
    _record_test_metrics(model_dir, meta, config.name, test, fit.best_epoch)
    fitted.save(model_dir)  # after the record above, which writes oneencoder.json whole
    if anchor is not None and (warning := fitted.near_chance(config.trainable[0], anchor)):
        status(warning)
    write_model_card(model_dir)  # README.md: what the model now is, trained on what, how well
    return summary


def _metrics_of(directions: dict) -> dict:
    # Unrounded: a value rounded here and again when shown would differ from `eval`'s.
    return {d: dict(r["metrics"]) for d, r in directions.items()}


def _record_test_metrics(model_dir: Path, meta: dict, stage: str, test: dict, best_epoch: int) -> None:
    for entry in meta["stages"]:
        if entry["name"] == stage:
            entry["best_epoch"] = best_epoch
            entry["test"] = _metrics_of(test["directions"])
            for subset, directions in test.get("subsets", {}).items():
                entry[f"test[{subset}]"] = _metrics_of(directions)
    write_json_atomic(model_dir / META, meta)
