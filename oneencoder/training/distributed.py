"""Data-parallel training under ``torchrun``: the process group, rank facts and gathers.

PyTorch's own engine does the work (``torchrun``, ``torch.distributed``, DDP); this module
only reads the environment ``torchrun`` sets and offers the few collectives a contrastive
stage needs. Outside ``torchrun`` every function is a cheap no-op for one process.

Scheme (as open_clip's ``ClipLoss`` with ``gather_with_grad``): each rank embeds its own
shard of the global batch, the embeddings are all-gathered *with* gradient, and every
rank computes the loss of the whole global batch. Backward sums each rank's share of
the gradient across ranks and DDP averages parameter gradients, so N ranks with
per-rank batch B take exactly the steps of one process with batch N·B.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ..errors import ConfigError


def launched_by_torchrun() -> bool:
    """Whether the environment asks for more than one process (``torchrun`` sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files, logs and prints."""
    return rank() == 0


def init_distributed(device: torch.device, timeout_minutes: float = 30.0) -> bool:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on CUDA); False for one process.

    Raises:
        ConfigError: ``WORLD_SIZE`` > 1 but the rendezvous variables ``torchrun`` sets are missing.
    """
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set; "
                          "launch with `torchrun --nproc-per-node N -m oneencoder.cli.main ...`")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (it writes shared files); the others then run it and find them."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (decisions only rank 0 may take, e.g. after deleting files)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the gradient over ranks and keeps this rank's slice.

    Written on ``all_reduce`` so that it runs on gloo, which lacks reduce-scatter.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """``[world·B, ...]``: every rank's ``[B, ...]`` in rank order, differentiable (identity for one process)."""
    return _GatherWithGrad.apply(tensor) if is_distributed() else tensor


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """As ``gather_with_grad``, without gradient (indices, group codes, counters)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def shard_of(global_batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (rank r holds rows ``[r·B, (r+1)·B)``)."""
    n = world_size()
    if n == 1:
        return global_batch
    if global_batch.shape[0] % n:
        raise ConfigError(f"a global batch of {global_batch.shape[0]} pairs does not split evenly over {n} ranks")
    per = global_batch.shape[0] // n
    return global_batch[rank() * per : (rank() + 1) * per]


def rank_device(device: torch.device) -> torch.device:
    """Under ``torchrun``, a bare ``cuda`` means this process's GPU (``LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None and launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device
