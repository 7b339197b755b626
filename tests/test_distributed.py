"""``torchrun`` data parallelism: 2 processes (gloo) take exactly the steps of 1 process with twice the batch.

Real stage, real caches, real ``torchrun`` and ``oneencoder train``. Dropout is off in
these runs: dropout masks are drawn per rank, so with dropout the two runs are
equal in distribution only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.bytes]

EPOCHS = 3
PER_RANK_BATCH = 8


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def _write_tables(lines: list[str], prefix: str, table: dict) -> None:
    lines += [f"[{prefix}]", *(f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)), ""]
    for key, inner in table.items():
        if isinstance(inner, dict):
            _write_tables(lines, f"{prefix}.{key}", inner)


@pytest.fixture(scope="module")
def stage_file(small_manifest: Path, small_cache: Path, stage_raw: dict, tmp_path_factory) -> Any:
    """The shipped Stage 1 on the small real caches, quick, without dropout."""
    def make(batch_size: int) -> Path:
        raw = json.loads(json.dumps(stage_raw))
        raw["data"] = {"manifest": str(small_manifest), "cache_dir": str(small_cache)}
        raw["train"].update({"epochs": EPOCHS, "batch_size": batch_size, "warmup_steps": 2, "patience": 100,
                             "device": "cpu", "eval_batch_size": 64, "log_every": 1})
        raw["model"]["dropout"] = raw["adapter"]["dropout"] = 0.0
        lines: list[str] = []
        for section, table in raw.items():
            _write_tables(lines, section, table)
        path = tmp_path_factory.mktemp("stage") / f"b{batch_size}.toml"
        path.write_text("\n".join(lines))
        return path
    return make


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train_command(stage: Path, model: Path, nproc: int) -> list[str]:
    cli = ["-m", "oneencoder.cli.main", "train", "--stage", str(stage), "--model", str(model)]
    if nproc == 1:
        return [sys.executable, *cli]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*torchrun, *cli]


def _train(stage: Path, model: Path, nproc: int) -> subprocess.CompletedProcess:
    done = subprocess.run(_train_command(stage, model, nproc), capture_output=True, text=True, env=_env(),
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _losses(model: Path) -> list[float]:
    rows = [json.loads(line) for line in (model / "runs" / "image_text" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _weights(model: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted([model / "projection.safetensors", *(model / "adapters").glob("*.safetensors")]):
        out.update({f"{path.name}:{k}": v for k, v in load_file(str(path)).items()})
    return out


def _embeddings(model: Path, cache: Path, manifest: Path) -> dict[str, torch.Tensor]:
    """What the model computes: both modalities' embeddings of the validation split."""
    from oneencoder.model.checkpoint import load_model, modality_from_meta
    from oneencoder.evaluation.retrieval import embed_bank
    from oneencoder.data.manifest import read_manifest
    from oneencoder.training.pairs import load_pair_split

    net, meta = load_model(model)
    modalities = {n: modality_from_meta(n, info, check_weights=False) for n, info in meta["modalities"].items()}
    val = load_pair_split(read_manifest(manifest), "val", modalities, cache)
    return {n: embed_bank(net, n, val.banks[n]) for n in modalities}


def _assert_same_run(a: Path, b: Path, cache: Path, manifest: Path) -> None:
    """Losses and the models' embeddings agree to 1e-5; raw weights to 1e-4.

    Adam divides each step by the root of its second moment, so a parameter whose exact
    gradient is 0 (the attention's key bias: softmax ignores a shift shared by all keys)
    moves by about ``lr · round-off / eps`` per step in either run, along different round-off.
    Such coordinates, a handful among 10^6, drift apart by a few 1e-5 while changing nothing
    the model computes; every loss and embedding still agrees to 1e-5.
    """
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) == EPOCHS * (36 // (2 * PER_RANK_BATCH))
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-5, (la, lb)
    ea, eb = _embeddings(a, cache, manifest), _embeddings(b, cache, manifest)
    for name in ea:
        assert float((ea[name] - eb[name]).abs().max()) < 1e-5, name
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert worst < 1e-4, worst


@pytest.fixture(scope="module")
def two_process_run(stage_file, tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("ddp") / "model"
    done = _train(stage_file(PER_RANK_BATCH), model, 2)
    assert done.stdout.count("best epoch") == 1, done.stdout  # rank 0 alone reports
    return model


def test_every_loss_gathers_across_ranks_like_one_process() -> None:
    """Losses, per-pair losses and gradients (groups across ranks, margins, SuperLoss weights)."""
    script = Path(__file__).with_name("ddp_objective_check.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    from oneencoder.model.losses import list_losses

    assert sorted(line.split()[1] for line in done.stdout.splitlines() if line.startswith("ok ")) == list_losses()


def test_two_processes_equal_one_process_with_the_global_batch(stage_file, two_process_run: Path, small_cache: Path,
                                                               small_manifest: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    _train(stage_file(2 * PER_RANK_BATCH), single, 1)
    _assert_same_run(two_process_run, single, small_cache, small_manifest)
    settings = json.loads((two_process_run / "runs" / "image_text" / "settings.json").read_text())
    assert settings["world_size"] == 2


def test_a_killed_two_process_run_resumes_to_the_same_result(stage_file, two_process_run: Path, small_cache: Path,
                                                             small_manifest: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    stage = stage_file(PER_RANK_BATCH)
    state = model / "runs" / "image_text" / "last.safetensors"
    job = subprocess.Popen(_train_command(stage, model, 2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=_env(), start_new_session=True)
    try:
        deadline = time.time() + 300
        while not state.exists() and job.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert job.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the launcher and both ranks at once
        job.wait()
    meta = json.loads((model / "runs" / "image_text" / "last.json").read_text())
    assert meta["epoch"] < EPOCHS and not (model / "runs" / "image_text" / "test.json").exists()
    done = _train(stage, model, 2)
    assert "resuming image_text from step" in done.stderr  # a status line
    _assert_same_run(two_process_run, model, small_cache, small_manifest)
    assert _weights(model).keys() == _weights(two_process_run).keys()
    for key, value in _weights(model).items():  # the same processes, the same round-off: identical
        assert torch.equal(value, _weights(two_process_run)[key]), key
    shutil.rmtree(model)
