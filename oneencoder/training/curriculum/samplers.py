"""Batch samplers: which training pairs each optimizer step sees.

* ``RandomBatchSampler``: epoch-wise shuffling, the no-curriculum control.
* ``CurriculumBatchSampler``: a pacer's window over the easy→hard order (static,
  reversed, or the online loss order), plus a hard-negative curriculum that fills a
  growing share of each batch with mined near neighbours of the batch's own pairs.

Both follow the trainer's ``BatchSampler`` protocol; their ``state_dict`` holds
tensors only (the trainer saves it with safetensors), so a resumed run draws the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import ConfigError
from .online import LossPredictor
from .pacers import Pacer, create_pacer


class RandomBatchSampler:
    """Uniform shuffling without replacement, epoch by epoch (the no-curriculum control).

    Args:
        n: Number of training pairs.
        batch_size: Pairs per step (capped at ``n``).
        seed: Seed of the sampler's own generator (independent of model init).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0) -> None:
        if n < 2:
            raise ConfigError(f"need at least 2 training pairs, got {n}")
        self.n = n
        self.batch_size = min(batch_size, n)
        self.steps_per_epoch = max(1, n // self.batch_size)
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(n, generator=self.generator)
        self._epoch_of_order = 0

    def batch(self, step: int, total_steps: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch_of_order:
            self._order = torch.randperm(self.n, generator=self.generator)
            self._epoch_of_order = epoch
        return self._order[pos * self.batch_size : (pos + 1) * self.batch_size]

    def observe(self, index: torch.Tensor, per_sample_loss: torch.Tensor) -> None:
        """Nothing: a random order never depends on the losses."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "order": self._order,
                "epoch": torch.tensor(self._epoch_of_order)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self._order = state["order"]
        self._epoch_of_order = int(state["epoch"])


def mine_neighbours(features: torch.Tensor, groups: torch.Tensor, k: int, chunk_size: int = 1024) -> torch.Tensor:
    """Cosine k-nearest neighbours of every sample, never itself nor a sample of its group.

    Args:
        features: ``[N, D]`` features to compare (e.g. frozen pooled features of both
            modalities, each L2-normalised and concatenated, or current embeddings).
        groups: ``[N]`` group codes; same-group samples (e.g. identical captions) would be
            false negatives, so they are never neighbours.
        k: Neighbours per sample.
        chunk_size: Rows of the similarity matrix computed at once (bounds memory).

    Returns:
        ``[N, k]`` LongTensor (CPU), nearest first; ``-1`` pads rows with fewer than ``k``
        eligible samples.
    """
    n = features.shape[0]
    if groups.shape != (n,):
        raise ValueError(f"groups must be [{n}], got {tuple(groups.shape)}")
    x = F.normalize(features.detach().float(), dim=1)
    g = groups.to(x.device)
    out = torch.full((n, k), -1, dtype=torch.long)
    take = min(k, n - 1)
    if take <= 0:
        return out
    for lo in range(0, n, chunk_size):
        hi = min(n, lo + chunk_size)
        sims = x[lo:hi] @ x.t()
        sims.masked_fill_(g[lo:hi, None] == g[None, :], float("-inf"))  # same group, self included
        rows = torch.arange(hi - lo, device=x.device)
        sims[rows, rows + lo] = float("-inf")  # self, even if groups say otherwise
        values, index = sims.topk(take, dim=1)
        out[lo:hi, :take] = index.masked_fill(~torch.isfinite(values), -1).cpu()
    return out


class CurriculumBatchSampler:
    """Batches drawn from a pacer's window over the difficulty order, with mined hard negatives.

    At step ``s`` of ``T``, progress ``t = s / (T - 1)`` gives the pacer window ``(lo, hi)``;
    the *pool* is the samples at positions ``[floor(lo·N), ceil(hi·N))`` of the order the
    pacer asks for (easy→hard, hard→easy, or online loss; extended toward harder samples
    to hold at least a batch). The batch is drawn uniformly without replacement from it.

    Hard-negative curriculum: a share ``h(t) = hn_start + (hard_negatives - hn_start)·t`` of
    each batch is mined. The rest are random *anchors*; the mined part takes the anchors'
    nearest neighbours round-robin (every anchor's 1st neighbour, then every 2nd, ...).
    Mined samples must lie in the pool: each is also a training pair whose own loss
    counts, so it must be one the pacer admits now. While mining is on (``h > 0`` at
    any point) the whole batch holds at most one sample per group, so a mined neighbour
    is never a false negative of any batch pair; when neighbours run out, random pool
    samples fill the batch.

    Args:
        difficulty: ``[N]`` static difficulty, higher = harder (ties keep index order).
        pacer: A ``Pacer`` or a registered pacer name (default options).
        batch_size: Pairs per step (capped at N).
        seed: Seed of the sampler's own generator.
        groups: ``[N]`` group codes (pairs sharing a group are never negatives); default: all distinct.
        hard_negatives: Share of the batch mined at the end of training, in ``[0, 1]`` (at least
            one random anchor always stays).
        neighbours: ``[N, K]`` nearest neighbours (``mine_neighbours``), required for mining.
        hn_start: Share mined at the start of training.
        ema: Momentum of the per-sample online loss average fed by ``observe``.
        predictor: Optional ``LossPredictor``; trained by ``observe`` and used to score
            samples not observed within the last ``stale_after`` steps.
        stale_after: Steps after which an observed loss counts as stale (default: one epoch).
        refresh_every: Steps between two predictions of all N samples by ``predictor``
            (default: a tenth of an epoch; predicting is the costly part).
    """

    def __init__(self, difficulty: np.ndarray | torch.Tensor, pacer: Pacer | str, batch_size: int, seed: int = 0,
                 groups: torch.Tensor | None = None, hard_negatives: float = 0.0,
                 neighbours: torch.Tensor | None = None, hn_start: float = 0.0, ema: float = 0.9,
                 predictor: LossPredictor | None = None, stale_after: int | None = None,
                 refresh_every: int | None = None) -> None:
        self.difficulty = _as_difficulty(difficulty)
        self.n = n = len(self.difficulty)
        self.pacer = create_pacer(pacer) if isinstance(pacer, str) else pacer
        self.batch_size = min(int(batch_size), n)
        self.steps_per_epoch = max(1, n // self.batch_size)
        self.groups = _as_groups(groups, n)
        for name, share in (("hard_negatives", hard_negatives), ("hn_start", hn_start)):
            if not 0.0 <= share <= 1.0:
                raise ConfigError(f"[curriculum] {name} = {share} must be in [0, 1]")
        self.hard_negatives, self.hn_start = float(hard_negatives), float(hn_start)
        self.mining = max(self.hard_negatives, self.hn_start) > 0
        self.neighbours: torch.Tensor | None = None
        if neighbours is not None:
            self.set_neighbours(neighbours)
        elif self.mining:
            raise ConfigError("[curriculum] hard_negatives > 0 needs nearest neighbours (see mine_neighbours)")
        if not 0.0 <= ema < 1.0:
            raise ConfigError(f"[curriculum] ema = {ema} must be in [0, 1)")
        self.ema_momentum = float(ema)
        self.predictor = predictor
        if predictor is not None and predictor.n != n:
            raise ConfigError(f"loss predictor covers {predictor.n} samples, the sampler {n}")
        self.stale_after = self.steps_per_epoch if stale_after is None else int(stale_after)
        self.refresh_every = max(1, self.steps_per_epoch // 10 if refresh_every is None else int(refresh_every))
        self.predicted: torch.Tensor | None = None  # cached predictor output ...
        self.predicted_at = -1  # ... and the step it was computed at
        # Easy→hard order; a stable sort keeps ties in index order (reproducible).
        self.static_order = torch.from_numpy(np.argsort(self.difficulty, kind="stable").copy())
        self.static_quantile = torch.empty(n, dtype=torch.float64)
        self.static_quantile[self.static_order] = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        self.generator = torch.Generator().manual_seed(seed)
        self.ema = torch.zeros(n, dtype=torch.float32)
        self.last_seen = torch.full((n,), -1, dtype=torch.long)  # step of the last observe, -1 = never
        self.step = -1  # last step drawn
        self.last_stats: dict[str, float] = {}

    # ----- public helpers ---------------------------------------------------------------
    def set_neighbours(self, neighbours: torch.Tensor) -> None:
        """Replace the mining neighbours, e.g. re-mined from current embeddings."""
        neighbours = torch.as_tensor(neighbours).long().cpu()
        if neighbours.ndim != 2 or neighbours.shape[0] != self.n:
            raise ConfigError(f"neighbours must be [{self.n}, K], got {tuple(neighbours.shape)}")
        if bool(((neighbours < -1) | (neighbours >= self.n)).any()):
            raise ConfigError("neighbours hold indices outside [-1, N)")
        self.neighbours = neighbours.contiguous()

    def progress(self, step: int, total_steps: int) -> float:
        """Training progress ``t ∈ [0, 1]`` of ``step``."""
        return min(1.0, max(0.0, step / max(1, total_steps - 1)))

    def hard_share(self, t: float) -> float:
        """Share of the batch mined at progress ``t`` (linear from ``hn_start`` to ``hard_negatives``)."""
        return self.hn_start + (self.hard_negatives - self.hn_start) * t

    def order(self) -> torch.Tensor | None:
        """The order the pacer's window applies to (None: no order, everything is in the pool)."""
        kind = self.pacer.order
        if kind == "none":
            return None
        if kind == "reverse":
            return self.static_order.flip(0)
        if kind == "online":
            return self.online_order()
        return self.static_order

    def online_difficulty(self) -> torch.Tensor:
        """``[N]`` current difficulty as a quantile in (0, 1), higher = harder.

        Freshly observed samples are ranked by their loss EMA; the others by the loss
        predictor when one is trained, else by their static difficulty quantile.
        """
        fresh = (self.last_seen >= 0) & (self.step - self.last_seen <= self.stale_after)
        predicted = self._predicted_losses()
        if predicted is not None:
            return _quantiles(torch.where(fresh, self.ema, predicted).double())
        score = self.static_quantile.clone()
        if bool(fresh.any()):
            score[fresh] = _quantiles(self.ema[fresh].double())
        return score

    def online_order(self) -> torch.Tensor:
        """Easy→hard by ``online_difficulty`` (ties broken by the static order)."""
        score = self.online_difficulty()[self.static_order]
        return self.static_order[torch.from_numpy(np.argsort(score.numpy(), kind="stable").copy())]

    def pool(self, t: float) -> torch.Tensor:
        """Indices available at progress ``t``: the pacer's window, at least a batch wide."""
        order = self.order()
        if order is None:
            return torch.arange(self.n)
        lo, hi = self.pacer(t)
        start = min(self.n, math.floor(lo * self.n))
        end = min(self.n, math.ceil(hi * self.n - 1e-9))  # -1e-9: 0.25·N must not round up
        if end - start < self.batch_size:  # too narrow: widen toward harder samples, then easier
            end = min(self.n, start + self.batch_size)
            start = max(0, end - self.batch_size)
        return order[start:end]

    # ----- BatchSampler protocol ----------------------------------------------------------
    def batch(self, step: int, total_steps: int) -> torch.Tensor:
        """Indices of step ``step`` of ``total_steps`` (a LongTensor of ``batch_size``)."""
        self.step = step
        t = self.progress(step, total_steps)
        pool = self.pool(t).numpy()
        shuffled = pool[torch.randperm(len(pool), generator=self.generator).numpy()]
        n_hard = min(self.batch_size - 1, round(self.hard_share(t) * self.batch_size)) if self.mining else 0
        chosen = self._take(shuffled, self.batch_size - n_hard, np.empty(0, dtype=np.int64))
        mined = self._mine(chosen, n_hard, pool) if n_hard > 0 else chosen[:0]
        chosen = np.concatenate([chosen, mined])
        if len(chosen) < self.batch_size:  # not enough distinct groups/neighbours: random pool samples
            chosen = np.concatenate([chosen, self._take(shuffled, self.batch_size - len(chosen), chosen)])
        if len(chosen) < self.batch_size:  # the pool has too few groups: allow repeats of a group
            chosen = np.concatenate([chosen, self._take(shuffled, self.batch_size - len(chosen), chosen, False)])
        self.last_stats = {"pool": len(pool) / self.n, "hard_share": n_hard / self.batch_size,
                           "mined": len(mined) / self.batch_size}
        return torch.from_numpy(chosen.astype(np.int64))

    def observe(self, index: torch.Tensor, per_sample_loss: torch.Tensor) -> None:
        """Record the per-sample losses of a step (``out["per_sample"]``) for online difficulty."""
        index = torch.as_tensor(index).long().cpu().reshape(-1)
        loss = torch.as_tensor(per_sample_loss).detach().float().cpu().reshape(-1)
        if index.shape != loss.shape:
            raise ValueError(f"observe: {index.numel()} indices but {loss.numel()} losses")
        seen = self.last_seen[index] >= 0
        m = self.ema_momentum
        self.ema[index] = torch.where(seen, m * self.ema[index] + (1 - m) * loss, loss)
        self.last_seen[index] = max(self.step, 0)
        if self.predictor is not None:
            self.predictor.observe(index, loss)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"generator": self.generator.get_state(), "ema": self.ema.clone(),
                 "last_seen": self.last_seen.clone(), "step": torch.tensor(self.step)}
        if self.neighbours is not None:  # they may have been re-mined from embeddings
            state["neighbours"] = self.neighbours.clone()
        if self.predictor is not None:
            state.update({f"predictor.{k}": v for k, v in self.predictor.state_dict().items()})
        if self.predicted is not None:  # the cache decides orders until its next refresh
            state["predicted"], state["predicted_at"] = self.predicted.clone(), torch.tensor(self.predicted_at)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.ema = state["ema"].clone().float()
        self.last_seen = state["last_seen"].clone().long()
        self.step = int(state["step"])
        if "neighbours" in state:
            self.set_neighbours(state["neighbours"])
        if self.predictor is not None:
            self.predictor.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("predictor.")})
        self.predicted = state["predicted"].clone().float() if "predicted" in state else None
        self.predicted_at = int(state.get("predicted_at", -1))

    # ----- internals ------------------------------------------------------------------
    def _predicted_losses(self) -> torch.Tensor | None:
        """The predictor's loss for every sample, recomputed every ``refresh_every`` steps."""
        if self.predictor is None or not self.predictor.trained:
            return None
        # Keyed on the step, not on calls: extra calls (logging, tests) never change the batches.
        if self.predicted is None or self.step - self.predicted_at >= self.refresh_every:
            self.predicted, self.predicted_at = self.predictor.predict().float(), self.step
        return self.predicted

    def _take(self, candidates: np.ndarray, k: int, taken: np.ndarray,
              unique_groups: bool | None = None) -> np.ndarray:
        """Up to ``k`` candidates, in order, skipping ``taken`` and repeats.

        With ``unique_groups`` (default: while mining) a candidate is also skipped if its
        group is already taken or appeared earlier among the candidates.
        """
        unique_groups = self.mining if unique_groups is None else unique_groups
        c = candidates[~np.isin(candidates, taken)]
        key = self.groups[c] if unique_groups else c
        if unique_groups and len(taken):
            keep = ~np.isin(key, self.groups[taken])
            c, key = c[keep], key[keep]
        _, first = np.unique(key, return_index=True)
        return c[np.sort(first)][:k]

    def _mine(self, anchors: np.ndarray, k: int, pool: np.ndarray) -> np.ndarray:
        """Up to ``k`` pool samples among the anchors' neighbours, nearest ranks first."""
        assert self.neighbours is not None
        near = self.neighbours[torch.from_numpy(anchors)].t().reshape(-1).numpy()  # rank-major: round-robin
        in_pool = np.zeros(self.n, dtype=bool)
        in_pool[pool] = True
        near = near[near >= 0]
        return self._take(near[in_pool[near]], k, anchors, unique_groups=True)


def _as_difficulty(difficulty: np.ndarray | torch.Tensor) -> np.ndarray:
    d = difficulty.detach().cpu().numpy() if torch.is_tensor(difficulty) else np.asarray(difficulty)
    d = d.astype(np.float64).reshape(-1)
    if len(d) < 2:
        raise ConfigError(f"need at least 2 training pairs, got {len(d)}")
    if not np.isfinite(d).all():
        raise ConfigError(f"difficulty has {int((~np.isfinite(d)).sum())} non-finite value(s)")
    return d


def _as_groups(groups: torch.Tensor | None, n: int) -> np.ndarray:
    if groups is None:
        return np.arange(n, dtype=np.int64)
    g = groups.detach().cpu().numpy() if torch.is_tensor(groups) else np.asarray(groups)
    g = g.astype(np.int64).reshape(-1)
    if len(g) != n:
        raise ConfigError(f"groups has {len(g)} entries for {n} samples")
    return g


def _quantiles(values: torch.Tensor) -> torch.Tensor:
    """Mid-rank quantile in (0, 1) of each value (stable: ties keep index order)."""
    rank = torch.empty(len(values), dtype=torch.float64)
    order = torch.from_numpy(np.argsort(values.numpy(), kind="stable").copy())
    rank[order] = torch.arange(len(values), dtype=torch.float64)
    return (rank + 0.5) / len(values)


def build_sampler(config: Any, n: int, batch_size: int, seed: int,
                  difficulty: np.ndarray | torch.Tensor | None = None,
                  groups: torch.Tensor | None = None, neighbours: torch.Tensor | None = None,
                  predictor: LossPredictor | None = None) -> RandomBatchSampler | CurriculumBatchSampler:
    """Sampler named by a stage's ``[curriculum]`` section (a ``CurriculumConfig``).

    Reads ``pacer`` (default ``"random"``), ``pacer_options`` ({}), ``hard_negatives``
    (0.0) and ``hn_start`` (0.0) with ``getattr`` so older configs keep working.
    ``random`` without mining is the plain ``RandomBatchSampler``; anything else is a
    ``CurriculumBatchSampler``.

    Raises:
        ConfigError: unknown pacer or option, a pacer that orders samples without
            ``difficulty``, mining without ``neighbours``, or sizes that disagree with ``n``.
    """
    name = getattr(config, "pacer", "random")
    options = dict(getattr(config, "pacer_options", None) or {})
    hard = float(getattr(config, "hard_negatives", 0.0))
    hn_start = float(getattr(config, "hn_start", 0.0))
    pacer = create_pacer(name, **options)
    if not pacer.needs_difficulty and hard == 0.0 and hn_start == 0.0:
        return RandomBatchSampler(n, batch_size, seed)
    if difficulty is None:
        if pacer.needs_difficulty:
            raise ConfigError(f"[curriculum] pacer = {name!r} orders samples by difficulty, but no difficulty "
                              f"scores were given (score the training pairs first)")
        difficulty = np.zeros(n)  # unused: the random pacer never orders
    if len(difficulty) != n:
        raise ConfigError(f"difficulty has {len(difficulty)} scores for {n} training pairs")
    return CurriculumBatchSampler(difficulty, pacer, batch_size, seed, groups, hard, neighbours, hn_start,
                                  predictor=predictor)
