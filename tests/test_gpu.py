"""GPU paths: bf16 autocast training, banks on the device, torch.compile, device-side evaluation.

Marked ``gpu`` and skipped without CUDA; ``benchmarks/gpu_check.sh`` runs them on a CUDA machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")]


def _losses(model: Path) -> list[float]:
    rows = [json.loads(line) for line in (model / "runs" / "image_text" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("compile_model", [False, True], ids=["eager", "compiled"])
def test_stage1_trains_on_cuda_in_bf16(small_manifest, small_cache, make_config, tmp_path: Path,
                                       compile_model: bool) -> None:
    from oneencoder.training.stage import run_stage

    config = make_config(small_manifest, small_cache, epochs=4, device="cuda", log_every=1, compile=compile_model)
    summary = run_stage(config, tmp_path / "model", progress=False)
    losses = _losses(tmp_path / "model")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    test = summary["test"]["directions"]["image→text"]
    assert test["metrics"]["R@5"] > test["chance"]["R@5"]


def test_banks_live_on_the_gpu(small_records, small_cache, stage_modalities) -> None:
    from oneencoder.training.pairs import load_pair_split

    split = load_pair_split(small_records, "train", stage_modalities, small_cache, device="cuda")
    for bank in split.banks.values():
        tokens, mask = bank.gather(torch.arange(4))
        assert tokens.is_cuda and mask.is_cuda


def test_retrieval_on_cuda_equals_the_cpu() -> None:
    from oneencoder.evaluation.retrieval import retrieval_between

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(300, 32, generator=g), dim=1)
    k = torch.nn.functional.normalize(q + 0.5 * torch.randn(300, 32, generator=g), dim=1)
    groups = [str(i // 2) for i in range(300)]
    cpu = retrieval_between(q, groups, k, groups)
    gpu = retrieval_between(q.cuda(), groups, k.cuda(), groups)
    for key, value in cpu["metrics"].items():
        assert gpu["metrics"][key] == pytest.approx(value, abs=1e-5), key
