"""Roofline of the training step: achieved FLOP/s against this machine's GEMM rate, measured in one run.

For the shipped Stage 1 (``stages/image_text.toml``: its model, adapters and HN-NCE loss) at
batch 256, on synthetic cached features of the real backbones' widths:

* ``pooled``: one token per sample (the shipped stage: image 1664 = EfficientNet-Lite0
  pooled 1280 + label semantics 384, text 384);
* ``tokens``: the image's 7x7 grid (49 tokens) and 32 text tokens.

FLOPs of one optimizer step (forward, backward) are counted by
``torch.utils.flop_counter.FlopCounterMode`` on the real step, not estimated. The GEMM rate is
a square ``matmul`` timed in the same process with the same threads (fp32 on the CPU; bf16
on CUDA, the dtype the step autocasts to there). With ``--ddp``,
the step rate of 1 process at the global batch is set beside 2 processes (``torchrun``, gloo)
at half of it each.

Usage:
    .venv/bin/python benchmarks/bench_train.py            # both stages, plus dropout off
    .venv/bin/python benchmarks/bench_train.py --variants "as shipped,dropout off,adapter only,projection only"
    .venv/bin/python benchmarks/bench_train.py --ddp      # also 1 vs 2 processes
    .venv/bin/python benchmarks/bench_train.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from oneencoder.features.bank import FeatureBank
from oneencoder.model.parts import build_model
from oneencoder.training.config import load_stage
from oneencoder.training.curriculum.samplers import RandomBatchSampler
from oneencoder.training.objective import PairObjective, stage_loss
from oneencoder.training.pairs import PairSplit
from oneencoder.training.trainer import Trainer

# Widths of the shipped backbones (EfficientNet-Lite0 + ImageNet label semantics; MiniLM).
SHAPES = {"pooled": {"image": (1664, 1, (1280, 1664)), "text": (384, 1, (0, 384))},
          "tokens": {"image": (1664, 49, None), "text": (384, 32, None)}}


def gemm_rate(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a square matmul (fp32 on the CPU, bf16 on CUDA), best of ``repeats``."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n * 4 if device.type == "cuda" else n  # big enough to fill a GPU
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Dropout variants: (the UP's ``[model] dropout``, the adapters' ``[adapter] dropout``); None keeps the stage's.
VARIANTS = {"as shipped": (None, None), "dropout off": (0.0, 0.0),
            "adapter only": (0.0, None), "projection only": (None, 0.0)}


def _stage_parts(kind: str, batch: int, steps: int, dropout: tuple[float | None, float | None],
                 device: torch.device, seed: int = 0):
    config = load_stage("image_text")
    train = replace(config.train, batch_size=batch, epochs=1, warmup_steps=1, device=str(device), log_every=10**9)
    model_cfg, adapter_cfg = config.model, config.adapter
    if dropout[0] is not None:
        model_cfg = replace(model_cfg, dropout=dropout[0])
    if dropout[1] is not None:
        adapter_cfg = replace(adapter_cfg, dropout=dropout[1])
    facts = {n: {"feature_dim": d, "max_tokens": t, "language_slice": s} for n, (d, t, s) in SHAPES[kind].items()}
    torch.manual_seed(seed)
    model = build_model(model_cfg, facts, {n: adapter_cfg for n in facts})
    n = batch * steps
    banks = {m: FeatureBank([torch.randn(f["max_tokens"], f["feature_dim"]) for _ in range(n)], device)
             for m, f in facts.items()}
    data = PairSplit([str(i) for i in range(n)], [str(i) for i in range(n)], banks)
    objective = PairObjective(model, stage_loss(config.loss), ("image", "text"), data).to(device)
    return train, objective, RandomBatchSampler(n, batch, seed)


def step_flops(kind: str, batch: int, dropout: tuple[float | None, float | None], device: torch.device) -> float:
    """FLOPs of one optimizer step (forward + backward) as torch counts them."""
    train, objective, sampler = _stage_parts(kind, batch, 1, dropout, device)
    with FlopCounterMode(display=False) as counter:
        out = objective(sampler.batch(0, 1))
        out["loss"].backward()
    return float(counter.get_total_flops())


def steps_per_second(kind: str, batch: int, steps: int, dropout: tuple[float | None, float | None],
                     device: torch.device) -> float:
    """Optimizer steps per second of the real Trainer (one epoch; validation is a no-op)."""
    train, objective, sampler = _stage_parts(kind, batch, steps, dropout, device)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(train, objective, sampler, lambda: {"score": 0.0}, lambda v: None,
                          run_dir, device, progress=False)
        start = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - start
    return sampler.steps_per_epoch / seconds


def roofline(batch: int, steps: int, device: torch.device, variants: list[str]) -> list[dict]:
    rate = gemm_rate(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"GEMM ({'bf16' if device.type == 'cuda' else 'fp32'}, {where}): {rate / 1e9:.1f} GFLOP/s")
    rows = []
    for kind in ("pooled", "tokens"):
        for label in variants:
            dropout = VARIANTS[label]
            flops = step_flops(kind, batch, dropout, device)
            sps = steps_per_second(kind, batch, steps, dropout, device)
            rows.append({"stage": kind, "variant": label, "gflop_per_step": flops / 1e9, "steps_per_s": sps,
                         "gflops": flops * sps / 1e9, "fraction_of_gemm": flops * sps / rate})
    print(f"\n{'stage':8} {'variant':15} {'GFLOP/step':>10} {'steps/s':>8} {'GFLOP/s':>8} {'of GEMM':>8}")
    for r in rows:
        print(f"{r['stage']:8} {r['variant']:15} {r['gflop_per_step']:10.2f} {r['steps_per_s']:8.2f} "
              f"{r['gflops']:8.1f} {r['fraction_of_gemm']:8.1%}")
    return rows


def _worker(args: argparse.Namespace) -> None:
    """One process's share under torchrun (or alone): steps/s at the given per-process batch."""
    from oneencoder.training import distributed as ddp

    ddp.init_distributed(torch.device("cpu"))
    sps = steps_per_second(args.kind, args.batch // ddp.world_size(), args.steps, (None, None), torch.device("cpu"))
    if ddp.is_main():
        print(json.dumps({"world": ddp.world_size(), "steps_per_s": sps}), flush=True)


def ddp_comparison(batch: int, steps: int, kind: str) -> None:
    """1 process (all cores) vs 2 processes (one core each) at the same global batch."""
    me = [str(Path(__file__).resolve()), "--worker", "--kind", kind, "--batch", str(batch), "--steps", str(steps)]
    cores = os.cpu_count() or 1
    runs = {1: ([sys.executable, *me], str(cores)),
            2: ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *me],
                str(max(1, cores // 2)))}
    rates = {}
    for world, (command, threads) in runs.items():
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        rates[world] = json.loads(done.stdout.strip().splitlines()[-1])["steps_per_s"]
    print(f"\nDDP ({kind}, global batch {batch}, {cores} cores): 1 process {rates[1]:.2f} steps/s, "
          f"2 processes {rates[2]:.2f} steps/s, ratio {rates[2] / rates[1]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per measurement")
    parser.add_argument("--ddp", action="store_true", help="also compare 1 and 2 processes (torchrun, gloo)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for the GEMM and the step alike (default: torch's)")
    parser.add_argument("--variants", default="as shipped,dropout off",
                        help=f"dropout variants, comma-separated, of: {', '.join(VARIANTS)} (default: %(default)s)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="pooled", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        _worker(args)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: {', '.join(unknown)} not known; use {', '.join(VARIANTS)}")
    roofline(args.batch, args.steps, torch.device(args.device), variants)
    if args.ddp:
        ddp_comparison(args.batch, args.steps, "pooled")


if __name__ == "__main__":
    main()
