"""One generic trainer for every stage. It knows nothing about models or modalities.

It drives an *objective* (an ``nn.Module`` mapping a batch of sample indices to a
dict with ``loss``) with batches from a *sampler* (``batch(step) -> indices``),
validates each epoch through a callback, stops early, and keeps the best state.
Runs unchanged under ``torchrun`` (``oneencoder.training.distributed``): the sampler draws the
global batch on every rank, each rank embeds its contiguous shard, the objective
gathers, and rank 0 alone validates, logs and saves.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError, OneEncoderError
from ..fileio import atomic_path, write_json_atomic, write_jsonl_atomic
from ..progress import progress_bar, status
from ..runtime import pick_device
from . import distributed as ddp
from .config import TrainConfig
from .curves import write_run_curves
from .report import METRICS, Reporter, make_reporters

# Offsets the dropout stream of ranks > 0 (rank 0 keeps the single-process stream).
_RANK_SEED_STRIDE = 1_000_003


class BatchSampler(Protocol):
    """Yields the sample indices of each optimizer step: the *global* batch (all ranks together).

    Everything the trainer reads of a sampler is declared here. A sampler may also hold
    ``last_stats``, a dict of shares of its last batch (``pool``: the share of the training
    data the curriculum admits): the trainer logs each as ``curriculum/<name>``.
    """

    #: Pairs per step, all ranks together (each rank embeds ``batch_size / world_size``).
    batch_size: int
    steps_per_epoch: int

    def batch(self, step: int, total_steps: int) -> torch.Tensor: ...

    def observe(self, index: torch.Tensor, per_sample_loss: torch.Tensor) -> None:
        """Called after each step with its indices and detached per-pair losses (self-paced curricula)."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``lr * min_lr_ratio``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class TrainingDiverged(OneEncoderError):
    """The loss became NaN or infinite: settings the ranges allow can still diverge."""


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``[train] precision`` on ``device`` (None: plain fp32)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"[train] precision = {precision!r}: use auto, fp32 or bf16")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def _no_weight_decay(module: nn.Module) -> set[str]:
    """Full names of the parameters that the submodules of ``module`` declare undecayed
    (timm's ``no_weight_decay()``): the trainer knows no parameter by name."""
    out: set[str] = set()
    for prefix, sub in module.named_modules():
        declared = getattr(sub, "no_weight_decay", None)
        if callable(declared):
            out |= {f"{prefix}.{name}" if prefix else name for name in declared()}
    return out


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    # No decay on norms, biases and the temperature (every parameter under 2-D), nor on what
    # the model declares (its tokens and position tables), as in CLIP/open_clip.
    skip = _no_weight_decay(module)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and name not in skip else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class FitResult:
    best_score: float
    best_epoch: int
    epochs_run: int
    steps: int
    seconds: float
    history: list[dict]


class Trainer:
    """Optimise ``objective`` with AdamW, warmup + cosine, early stopping and resume.

    Args:
        config: Training hyper-parameters.
        objective: Module whose ``forward(index)`` returns a dict with ``loss``.
        sampler: Supplies each step's batch indices.
        validate: Returns a dict with ``score`` (higher is better) plus anything to log.
        on_best: Called with the validation dict whenever the score improves (save here).
        run_dir: Holds ``metrics.jsonl`` and the resumable ``last.*`` state.
    """

    def __init__(self, config: TrainConfig, objective: nn.Module, sampler: BatchSampler,
                 validate: Callable[[], dict[str, float]], on_best: Callable[[dict[str, float]], None],
                 run_dir: str | Path, device: torch.device | None = None, progress: bool = True,
                 epoch_callbacks: list[Callable[[int], None]] | None = None) -> None:
        self.config = config
        self.device = device or pick_device(config.device)
        self.objective = objective.to(self.device)
        self.sampler = sampler
        self.validate = validate
        self.on_best = on_best
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.epoch_callbacks = epoch_callbacks or []  # run on every rank after each epoch
        self.distributed = ddp.is_distributed()
        self.rank, self.world = ddp.rank(), ddp.world_size()
        batch = sampler.batch_size
        if batch % self.world:
            raise ConfigError(f"the global batch of {batch} pairs does not split over {self.world} ranks; "
                              "the training split may hold fewer pairs than ranks × [train] batch_size")
        if self.rank > 0:  # own dropout masks per rank; the weights come from rank 0 (DDP broadcasts them)
            torch.manual_seed(config.seed + _RANK_SEED_STRIDE * self.rank)
        self.trainable = [p for p in objective.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("the objective has no trainable parameters")
        self.optimizer = torch.optim.AdamW(_param_groups(objective, config.weight_decay), lr=config.lr)
        self.autocast = _autocast_dtype(config.precision, self.device)
        self.model = (nn.parallel.DistributedDataParallel(self.objective) if self.distributed else self.objective)
        self.total_steps = config.epochs * sampler.steps_per_epoch
        self.step, self.epoch, self.best, self.best_epoch, self.bad_epochs = 0, 0, -math.inf, -1, 0
        self.history: list[dict] = []
        self.reporters: list[Reporter] = []  # rank 0's, made when fit() starts (after a resume)

    # ----- resume -----------------------------------------------------------
    def _state_paths(self) -> tuple[Path, Path]:
        return self.run_dir / "last.safetensors", self.run_dir / "last.json"

    def _rng_states(self) -> dict[str, torch.Tensor]:
        """This rank's generators (CPU, and the GPU's when training there)."""
        states = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def save_state(self) -> None:
        """Weights, optimizer moments, sampler state, every rank's RNG and the counters: one file, no pickle.

        The counters travel in the safetensors header, so a kill can never pair the
        weights of one epoch with the counters of another. ``last.json`` is a readable
        copy written afterwards and never read back. Every rank calls this; rank 0 writes.
        """
        rngs = ddp.all_gather_objects(self._rng_states())
        if not ddp.is_main():
            return
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.trainable)}
        opt = self.optimizer.state_dict()
        for pid, slots in opt["state"].items():
            for k, v in slots.items():
                tensors[f"opt.{pid}.{k}"] = torch.as_tensor(v).cpu().contiguous()
        tensors.update({f"sampler.{k}": v.cpu().contiguous() for k, v in self.sampler.state_dict().items()})
        for r, states in enumerate(rngs):
            for kind, state in states.items():
                tensors[f"rng.{kind}" + (f".{r}" if r else "")] = state.cpu()
        meta = {"step": self.step, "epoch": self.epoch, "best": self.best, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "history": self.history, "total_steps": self.total_steps,
                "world_size": self.world}
        t_path, m_path = self._state_paths()
        with atomic_path(t_path) as tmp:
            save_file(tensors, str(tmp), metadata={"trainer": json.dumps(meta)})
        write_json_atomic(m_path, meta)

    def _stored_meta(self, t_path: Path, m_path: Path) -> dict | None:
        with safe_open(str(t_path), "pt") as f:
            header = (f.metadata() or {}).get("trainer")
        if header is not None:
            return json.loads(header)
        # Written before the counters moved into the weights file.
        return json.loads(m_path.read_text()) if m_path.exists() else None

    def try_resume(self) -> bool:
        t_path, m_path = self._state_paths()
        if not t_path.exists():
            return False
        meta = self._stored_meta(t_path, m_path)
        if meta is None or meta["total_steps"] != self.total_steps:
            return False  # a different schedule: start over rather than mix runs
        if meta.get("world_size", 1) != self.world:
            raise ConfigError(f"{t_path} was saved by a run on {meta.get('world_size', 1)} processes; resume it on "
                              f"as many (this run has {self.world}), or start it over")
        tensors = load_file(str(t_path))
        with torch.no_grad():
            for i, p in enumerate(self.trainable):
                p.copy_(tensors[f"param.{i}"].to(p.device))
        opt = self.optimizer.state_dict()
        opt["state"] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, pid, slot = key.split(".", 2)
                opt["state"].setdefault(int(pid), {})[slot] = value.to(self.device) if slot != "step" else value
        self.optimizer.load_state_dict(opt)
        self.sampler.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("sampler.")})
        suffix = f".{self.rank}" if self.rank else ""
        torch.set_rng_state(tensors[f"rng.torch{suffix}"])
        if self.device.type == "cuda" and f"rng.cuda{suffix}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda{suffix}"], self.device)
        self.step, self.epoch = meta["step"], meta["epoch"]
        self.best, self.best_epoch, self.bad_epochs = meta["best"], meta["best_epoch"], meta["bad_epochs"]
        self.history = meta["history"]
        if ddp.is_main():
            self._forget_logs_after(self.step)
        return True

    def _forget_logs_after(self, step: int) -> None:
        """Drop log rows past the resumed step: the resumed run logs those steps again."""
        path = self.run_dir / METRICS
        if not path.exists():
            return
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if row.get("step", 0) <= step:
                rows.append(row)
        write_jsonl_atomic(path, rows)

    # ----- loop -------------------------------------------------------------
    def _train_step(self) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.total_steps, self.config)
        global_index = self.sampler.batch(self.step, self.total_steps)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            out = self.model(ddp.shard_of(global_index))  # the objective gathers: its loss is the global batch's
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        if "per_sample" in out:  # self-paced curricula track per-sample losses
            self.sampler.observe(global_index, out["per_sample"].detach())
        logs = {k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
        if not math.isfinite(logs["loss"]):
            raise TrainingDiverged(f"step {self.step}: the loss is {logs['loss']}; training diverged. Lower "
                                   f"[train] lr (now {self.config.lr:g}) or raise warmup_steps, then rerun "
                                   "with --overwrite (or --replace)")
        stats = getattr(self.sampler, "last_stats", None) or {}
        return {**logs, **{f"curriculum/{k}": float(v) for k, v in stats.items()}}

    def fit(self) -> FitResult:
        """Train until ``epochs`` or ``patience`` epochs without improvement.

        Rank 0 reports every ``log_every`` steps and every validation (``[train] report_to``),
        and draws ``curves.png`` in the run folder at the end.
        """
        start = time.time()
        if self.rank == 0:
            if self.step == 0:
                self._forget_logs_after(0)  # rows of a run killed before its first saved state
            self.reporters = make_reporters(self.config.report_to, self.run_dir, self.step)
        try:
            self._fit_loop()
        finally:
            for reporter in self.reporters:
                reporter.close()
            self.reporters = []
        if self.rank == 0:
            write_run_curves(self.run_dir)
        return FitResult(self.best, self.best_epoch, self.epoch, self.step, time.time() - start, self.history)

    def _fit_loop(self) -> None:
        bar = progress_bar(total=self.total_steps, initial=self.step, desc="train", unit="step",
                           enabled=self.progress and self.rank == 0)
        while self.epoch < self.config.epochs and self.bad_epochs < self.config.patience:
            self.objective.train()
            for _ in range(self.sampler.steps_per_epoch):
                logs = self._train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.3f}")
                if self.rank == 0 and self.step % self.config.log_every == 0:
                    # Epochs count from 1 everywhere: a step row names the epoch it is in, a
                    # validation row the epoch it closes, best_epoch that same number.
                    row = {"step": self.step, "epoch": self.epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
                           **logs}
                    for reporter in self.reporters:
                        reporter.step(row)
            self.epoch += 1
            for callback in self.epoch_callbacks:
                callback(self.epoch)
            if self.rank == 0:
                self._end_epoch()
            if self.distributed:  # every rank must agree on early stopping
                flag = torch.tensor([self.bad_epochs], device=self.device)
                dist.broadcast(flag, 0)
                self.bad_epochs = int(flag)
            self.save_state()
        bar.close()
        if self.rank == 0 and self.epoch < self.config.epochs:
            status(f"early stop after epoch {self.epoch} of {self.config.epochs}: validation score has not improved for "
                   f"{self.bad_epochs} epochs ([train] patience); keeping epoch {self.best_epoch} "
                   f"(score {self.best:.4f})")

    def _end_epoch(self) -> None:
        self.objective.eval()
        with torch.no_grad():
            val = self.validate()
        row = {"epoch": self.epoch, "step": self.step, **{f"val/{k}": v for k, v in val.items()}}
        self.history.append(row)
        for reporter in self.reporters:
            reporter.validation(row)
        if val["score"] > self.best:
            self.best, self.best_epoch, self.bad_epochs = val["score"], self.epoch, 0
            self.on_best(val)
        else:
            self.bad_epochs += 1
