"""Benchmark: one training epoch from the feature cache vs re-encoding every batch.

Both arms train the same Stage 1 model (stage file's model/adapter/loss/train settings) on
the Tux Paint TRAIN split with the same seed, the same batches (one fixed permutation) and
the real optimizer step (``Trainer._train_step``: warmup/cosine LR, AdamW, grad clipping):

* cached: batches are gathered from in-memory FeatureBanks loaded from the LMDB FeatureCache
  (``PairObjective``, exactly what ``oneencoder train`` runs);
* re-encoding: every batch re-reads images and captions from disk, preprocesses, collates
  and runs them through the frozen backbones (as OneEncoder's original code does), then the
  identical adapter + Universal Projection + contrastive loss step.

Cache building, bank loading and backbone loading are timed and printed separately; they
are not part of the epoch times. Run: ``.venv/bin/python benchmarks/bench_cache.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from oneencoder.data.sources.tuxpaint import tuxpaint_records  # noqa: E402
from oneencoder.features.cache import build_cache  # noqa: E402
from oneencoder.modality import Modality, create_stage_modalities  # noqa: E402
from oneencoder.model.checkpoint import modality_meta  # noqa: E402
from oneencoder.model.losses import ContrastiveLoss  # noqa: E402
from oneencoder.model.parts import OneEncoderModel, build_model  # noqa: E402
from oneencoder.runtime import seed_everything  # noqa: E402
from oneencoder.training.config import StageConfig, load_stage  # noqa: E402
from oneencoder.training.curriculum import RandomBatchSampler  # noqa: E402
from oneencoder.training.objective import PairObjective  # noqa: E402
from oneencoder.training.pairs import PairSplit, load_pair_split  # noqa: E402
from oneencoder.training.trainer import Trainer  # noqa: E402

from _machine import OtherLoad, load_note as _load_note  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parent.parent
DEVICE = torch.device("cpu")


class ReencodeObjective(nn.Module):
    """Same contract as ``PairObjective`` (indices -> loss dict), but every batch is
    loaded from disk and encoded by the frozen backbones before the trainable model runs."""

    def __init__(self, model: OneEncoderModel, loss: nn.Module, pair: tuple[str, str], data: PairSplit,
                 records: list[dict], modalities: dict[str, Modality], backbones: dict[str, nn.Module]) -> None:
        super().__init__()
        self.model, self.loss, self.pair = model, loss, pair
        self.records = records  # row i = data.ids[i]
        self.modalities = modalities
        self.backbones = backbones  # plain dict: not submodules, so they stay frozen and in eval mode
        self.register_buffer("groups", data.group_codes, persistent=False)
        self.encode_seconds = 0.0  # load + preprocess + collate + frozen encode, summed over steps

    def _features(self, name: str, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.modalities[name]
        key = m.spec.record_key
        items = [m.prepare(self.records[i][key])[1] for i in index.tolist()]
        tokens, mask = m.featurize(self.backbones[name], items)
        # encode() runs under inference_mode; clone into normal tensors for autograd.
        return tokens.clone(), mask.clone()

    def forward(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        a, b = self.pair
        start = time.perf_counter()
        fa, fb = self._features(a, index), self._features(b, index)
        self.encode_seconds += time.perf_counter() - start
        ea = self.model(a, *fa)
        eb = self.model(b, *fb)
        return self.loss(ea.float(), eb.float(), self.groups[index.to(self.groups.device)])


def stage1_model(config: StageConfig, modalities: dict[str, Modality]) -> OneEncoderModel:
    """The model ``oneencoder train`` builds for a Stage 1 (the library's own factory)."""
    trained = {n: modality_meta(modalities[n]) for n in config.trainable if n != "projection"}
    return build_model(config.model, trained, {n: config.adapter for n in trained})


def run_arm(label: str, make_objective, config: StageConfig, n: int, steps: int, run_dir: Path) -> dict:
    """Warm up one step, reset to the seeded initial state, then time ``steps`` real steps."""
    seed = config.train.seed
    seed_everything(seed)
    lc = config.loss
    loss = ContrastiveLoss(lc.init_temperature, lc.max_logit_scale, lc.learn_temperature)
    objective = make_objective(loss)
    initial = {k: v.clone() for k, v in objective.state_dict().items()}

    def fresh_trainer() -> Trainer:
        sampler = RandomBatchSampler(n, config.train.batch_size, seed)  # epoch 0 = one fixed permutation
        return Trainer(config.train, objective, sampler, lambda: {"score": 0.0}, lambda _: None,
                       run_dir / label, DEVICE, progress=False)

    objective.train()
    fresh_trainer()._train_step()  # warm-up: first batch, not timed, then undone below
    objective.load_state_dict(initial)
    if hasattr(objective, "encode_seconds"):
        objective.encode_seconds = 0.0
    trainer = fresh_trainer()  # new AdamW state, sampler back at step 0
    torch.manual_seed(seed)  # same dropout masks in both arms
    objective.train()
    losses, batches = [], []
    load = OtherLoad().start()
    start = time.perf_counter()
    for _ in range(steps):
        batches.append(trainer.sampler.batch(trainer.step, trainer.total_steps))
        losses.append(trainer._train_step()["loss"])
    seconds = time.perf_counter() - start
    return {"arm": label, "steps": steps, "seconds": seconds, "per_step": seconds / steps, "losses": losses,
            "batches": batches, "other_cores": load.cores(),
            "encode_seconds": getattr(objective, "encode_seconds", None)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", default=str(REPO / "stages" / "image_text.toml"), help="stage file (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="feature cache root (default: a temporary dir, deleted after)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N train pairs (default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the stage file's [train] batch_size")
    p.add_argument("--steps", type=int, default=None, help="cap the timed steps per arm (default: one full epoch)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    overrides = {"train": {"batch_size": args.batch_size, "device": "cpu"}}
    config = load_stage(args.stage, overrides)
    if torch.device(config.train.device).type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)  # as run_stage does on CPU
    names = list(config.modalities)
    modalities = create_stage_modalities(config.modality_options, names)

    train_records = [r for r in tuxpaint_records() if r["split"] == "train"]
    if args.limit is not None:
        train_records = train_records[: args.limit]

    tmp_root = Path(tempfile.mkdtemp(prefix="oneencoder-bench-"))
    cache_root = Path(args.cache_dir) if args.cache_dir else tmp_root / "cache"
    try:
        probe = OtherLoad().start()
        time.sleep(1.0)
        if note := _load_note("before the start (1 s probe)", probe.cores()):
            print(note)
        print(f"stage {config.name} ({config.source}), threads={torch.get_num_threads()}, device=cpu, "
              f"seed={config.train.seed}, batch_size={config.train.batch_size}")

        # 1. Cache build (not part of the epoch time).
        start = time.perf_counter()
        reports = [build_cache(modalities[n], train_records, cache_root, progress=False) for n in names]
        build_seconds = time.perf_counter() - start
        start = time.perf_counter()
        train = load_pair_split(train_records, "train", modalities, cache_root, DEVICE)
        bank_seconds = time.perf_counter() - start
        n = len(train.ids)
        if n < 2:
            print(f"need at least 2 cached train pairs, have {n}", file=sys.stderr)
            return 1
        by_id = {r["id"]: r for r in train_records}
        aligned = [by_id[i] for i in train.ids]

        sampler = RandomBatchSampler(n, config.train.batch_size, config.train.seed)
        epoch_steps = sampler.steps_per_epoch
        steps = min(args.steps, epoch_steps) if args.steps else epoch_steps
        capped = steps < epoch_steps

        print(f"train records: {len(train_records)}, pairs cached in both modalities: {n}, "
              f"batch size: {sampler.batch_size}, steps per epoch: {epoch_steps} (last partial batch dropped)")
        for r in reports:
            print(f"  cache {r.summary()}")
        reused = sum(r.cached_before for r in reports)
        what = (f"reused {reused} cached features, encoded only the rest" if reused
                else "all samples encoded, includes loading the backbones")
        print(f"cache build: {build_seconds:.1f} s into {cache_root} ({what}; not part of the epoch time)")
        print(f"feature banks loaded from LMDB: {bank_seconds:.2f} s (once per run; not part of the epoch time)")

        # 2. Backbones for the re-encoding arm (loaded once, not part of the epoch time).
        start = time.perf_counter()
        backbones = {nm: modalities[nm].load_backbone().to(DEVICE) for nm in names}
        print(f"backbones loaded for the re-encoding arm: {time.perf_counter() - start:.1f} s (not part of the epoch time)")

        pair = (names[0], names[1])
        run_dir = tmp_root / "runs"

        def cached_objective(loss: nn.Module) -> nn.Module:
            return PairObjective(stage1_model(config, modalities), loss, pair, train)

        def reencode_objective(loss: nn.Module) -> nn.Module:
            return ReencodeObjective(stage1_model(config, modalities), loss, pair, train, aligned, modalities, backbones)

        results = [run_arm("cached", cached_objective, config, n, steps, run_dir),
                   run_arm("re-encoding", reencode_objective, config, n, steps, run_dir)]
        a, b = results
        same = all(torch.equal(x, y) for x, y in zip(a["batches"], b["batches"]))
        if not same:
            raise RuntimeError("the two arms saw different batches")

        print()
        print(f"{'arm':<12} {'steps':>5} {'seconds':>9} {'s/step':>9}   {'loss first -> last':<18}  other load")
        for r in results:
            other = "n/a" if r["other_cores"] is None else f"{r['other_cores']:.2f} cores"
            print(f"{r['arm']:<12} {r['steps']:>5} {r['seconds']:>9.2f} {r['per_step']:>9.3f}   "
                  f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}  {other}")
        enc = b["encode_seconds"]
        print(f"re-encoding: {enc:.2f} s of {b['seconds']:.2f} s in load + preprocess + frozen encode "
              f"({100 * enc / b['seconds']:.0f}%)")
        worst = max((r["other_cores"] for r in results if r["other_cores"] is not None), default=None)
        if note := _load_note("during the busier timed arm", worst):
            print(note)
        print("both arms: same seed, same initial weights, same batches (checked), 1 untimed warm-up step each")
        if capped:
            print(f"NOTE: --steps {steps} of {epoch_steps} epoch steps measured in both arms; full-epoch times "
                  f"extrapolated from s/step: cached {a['per_step'] * epoch_steps:.2f} s, "
                  f"re-encoding {b['per_step'] * epoch_steps:.2f} s")
        print("ratio = re-encoding s/step / cached s/step over the same steps (how many times faster cached is)")
        print(f"cached vs re-encoding epoch time ratio: {b['per_step'] / a['per_step']:.1f}x")
        return 0
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
