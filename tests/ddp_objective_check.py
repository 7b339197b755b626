"""Run by ``tests/test_distributed.py`` under ``torchrun --nproc-per-node 2``: the gathered objective's
loss, per-pair losses and DDP-averaged gradients equal one process's on the whole global batch.

Every registered loss, with caption groups that straddle the ranks, dynamic margins and
per-pair weights that depend on the batch's losses (SuperLoss). A small random model:
the claim is about arithmetic, not quality. Prints one ``ok`` line per loss.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from oneencoder.training import distributed as ddp
from oneencoder.features.bank import FeatureBank
from oneencoder.model.losses import create_loss, list_losses
from oneencoder.model.parts import AdapterConfig, ProjectionConfig, build_model
from oneencoder.training.curriculum.weights import SampleWeights
from oneencoder.training.objective import PairObjective
from oneencoder.training.pairs import PairSplit

N, GLOBAL_BATCH, STEPS = 40, 16, 3


def _difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference, relative to the reference's scale where that exceeds 1 (gradients reach ~50)."""
    return float((a - b).abs().max()) / max(1.0, float(a.abs().max()))


def _objective(loss_name: str) -> PairObjective:
    torch.manual_seed(0)
    facts = {"image": {"feature_dim": 24, "max_tokens": 3, "language_slice": None},
             "text": {"feature_dim": 12, "max_tokens": 2, "language_slice": None}}
    model = build_model(ProjectionConfig(d_model=16, layers=1, heads=2, dropout=0.0), facts,
                        {n: AdapterConfig(dropout=0.0) for n in facts})
    banks = {n: FeatureBank([torch.randn(1 + i % f["max_tokens"], f["feature_dim"]) for i in range(N)])
             for n, f in facts.items()}
    groups = [f"g{i // 3}" for i in range(N)]  # groups of 3 cross the rank boundary of most batches
    data = PairSplit([str(i) for i in range(N)], groups, banks)
    options = {"beta": 1.0} if loss_name == "hnnce" else {}
    margins = torch.rand(N) * 0.2 if loss_name == "margin" else None
    weights = SampleWeights(torch.rand(N), superloss=1.0, floor=0.05)
    return PairObjective(model, create_loss(loss_name, **options), ("image", "text"), data, margins=margins,
                         weights=weights)


def _steps(objective: torch.nn.Module, shard: bool) -> list[tuple[dict, list[torch.Tensor]]]:
    """Loss dicts and gradients of a few batches (no optimizer: the gradients themselves are compared)."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        batch = torch.randperm(N, generator=generator)[:GLOBAL_BATCH]
        objective.zero_grad(set_to_none=True)
        result = objective(ddp.shard_of(batch) if shard else batch)
        result["loss"].backward()
        grads = [p.grad.detach().clone() for p in objective.parameters() if p.requires_grad]
        out.append(({k: v.detach().clone() for k, v in result.items()}, grads))
    return out


def main() -> int:
    # The references first, before joining the group: one process, the whole global batch.
    references = {name: _steps(_objective(name), shard=False) for name in list_losses()}
    ddp.init_distributed(torch.device("cpu"))
    for name in list_losses():
        worst = 0.0
        objective = _objective(name)
        wrapped = torch.nn.parallel.DistributedDataParallel(objective)
        for (ref, ref_grads), (got, grads) in zip(references[name], _steps(wrapped, shard=True)):
            for key in ("loss", "per_sample", "weight_mean"):
                worst = max(worst, _difference(ref[key], got[key]))
            worst = max(worst, max(_difference(a, b) for a, b in zip(ref_grads, grads)))
        if ddp.is_main():
            print(f"ok {name} max difference {worst:.2e}", flush=True)
        if worst > 1e-5:
            print(f"{name}: rank {ddp.rank()} differs from one process by {worst:.2e}", file=sys.stderr)
            return 1
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
