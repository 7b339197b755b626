"""Benchmark: how training and evaluation cost grow with the number of pairs N.

For each N (default 10^4, 10^5, 10^6) a fresh subprocess builds a synthetic pooled bank
of N image–text pairs (unit vectors with group structure, one token per sample, the
shipped Stage 1's feature widths: image 1664 = EfficientNet-Lite0's 1280 + 384 label
semantics, text 384 = MiniLM) and trains ONE epoch of the Stage 1 model with the
library's own parts: ``build_model``, ``PairObjective`` with the stage's loss, a
``RandomBatchSampler`` and the ``Trainer``'s own step (batch 256, AdamW, warmup +
cosine, grad clipping) over the epoch, then its state save, as ``Trainer.fit`` runs
them. Every 10th step (more often in short epochs) a control model on a fixed
10^4-pair bank takes a step too, timed apart, so each N's cost is also given
relative to a control measured under the same load. Another subprocess evaluates a
synthetic retrieval problem of
min(N, --eval-size) queries × as many gallery items (unit vectors as wide as the
stage's embeddings, groups of about 2.5 relevant items) with
``evaluate.retrieval_between``, the streaming path that validation and
``oneencoder evaluate`` use.

Each measurement runs in its own process, so each peak RSS (``getrusage``) is its own.
Ratios compare time per pair against the smallest N of the same run.
Run: ``.venv/bin/python benchmarks/bench_scale.py`` (quick: ``--sizes 1e4,1e5``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from oneencoder.evaluation.retrieval import retrieval_between
from oneencoder.features.bank import FeatureBank
from oneencoder.model.parts import OneEncoderModel, build_model
from oneencoder.runtime import seed_everything
from oneencoder.training.config import StageConfig, load_stage
from oneencoder.training.curriculum import RandomBatchSampler
from oneencoder.training.objective import PairObjective, stage_loss
from oneencoder.training.pairs import PairSplit
from oneencoder.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cache import OtherLoad, _load_note  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Feature widths and frozen language slices of the shipped Stage 1 (modality_meta of
# stages/image_text.toml): read from the backbones there; fixed here so no backbone loads.
FACTS = {"image": {"feature_dim": 1664, "max_tokens": 1, "language_slice": (1280, 1664)},
         "text": {"feature_dim": 384, "max_tokens": 1, "language_slice": (0, 384)}}
_BLOCK = 1 << 16  # samples generated at once (bounds the float32 temporaries)
CONTROL_N = 10_000  # pairs of the control bank whose steps are interleaved with every epoch


def _peak_rss() -> int:
    """Peak resident set of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synthetic_groups(n: int, seed: int) -> torch.Tensor:
    """``[n]`` group codes, about 2.5 samples per group (1 to ~8, Poisson-like), in random order."""
    return torch.randint(0, max(1, (2 * n) // 5), (n,), generator=torch.Generator().manual_seed(seed))


def synthetic_unit_vectors(codes: torch.Tensor, dim: int, noise: float, space: int, seed: int,
                           dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``[n, dim]`` unit vectors: a group's centre plus noise, so same-group samples are near.

    Every group has one 64-d latent (the same for every call); ``space`` seeds the fixed
    random map from latents to ``dim``. Two modalities in different spaces built from the
    same codes are aligned the way paired backbone features are; queries and gallery of
    one space are directly comparable. No ``[groups, dim]`` table is ever held.
    """
    latent = torch.randn(int(codes.max()) + 1, 64, generator=torch.Generator().manual_seed(12345))
    basis = torch.randn(64, dim, generator=torch.Generator().manual_seed(space)) / 8.0
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(len(codes), dim, dtype=dtype)
    for start in range(0, len(codes), _BLOCK):
        c = codes[start : start + _BLOCK]
        centre = F.normalize(latent[c] @ basis, dim=1)
        out[start : start + len(c)] = F.normalize(centre + noise * torch.randn(len(c), dim, generator=gen) / dim**0.5,
                                                  dim=1).to(dtype)
    return out


def synthetic_split(n: int, seed: int) -> PairSplit:
    """N pooled image–text pairs as in-memory FeatureBanks (fp16, one token per sample)."""
    codes = synthetic_groups(n, seed)
    banks = {name: FeatureBank.from_padded(
                 synthetic_unit_vectors(codes, f["feature_dim"], 1.0, space=i, seed=seed + 10 + i)[:, None])
             for i, (name, f) in enumerate(FACTS.items())}
    return PairSplit([str(i) for i in range(n)], [str(int(c)) for c in codes], banks)


def stage1_model(config: StageConfig) -> OneEncoderModel:
    return build_model(config.model, FACTS, {n: config.adapter for n in FACTS})


def _objective(config: StageConfig, split: PairSplit) -> PairObjective:
    return PairObjective(stage1_model(config), stage_loss(config.loss), ("image", "text"), split)


def train_child(n: int, config: StageConfig, warmup: int, control_n: int, control_every: int) -> dict:
    """One epoch of Stage 1 on N synthetic pairs, with a control bank's steps interleaved.

    Every ``control_every`` steps of the epoch (more often if that would give fewer than
    about 40), one step of an identical model on a
    ``control_n``-pair bank runs and is timed apart: the ratio of the two per-pair times
    is measured under the same load, which a shared machine changes from minute to minute.
    The banks' build time is reported apart.
    """
    seed = config.train.seed
    start = time.perf_counter()
    split = synthetic_split(n, seed)
    bank_seconds = time.perf_counter() - start
    seed_everything(seed)
    objective = _objective(config, split)
    initial = {k: v.clone() for k, v in objective.state_dict().items()}
    control_objective = _objective(config, synthetic_split(control_n, seed + 1))
    with tempfile.TemporaryDirectory(prefix="oneencoder-scale-") as tmp:
        def trainer(target: PairObjective, size: int, name: str) -> Trainer:
            sampler = RandomBatchSampler(size, config.train.batch_size, seed)
            return Trainer(config.train, target, sampler, lambda: {"score": 0.0}, lambda _: None,
                           Path(tmp) / name, torch.device("cpu"), progress=False)

        # First steps pay for allocations and thread start-up: not timed, then undone.
        warm, control = trainer(objective, n, "warmup"), trainer(control_objective, control_n, "control")
        objective.train()
        control_objective.train()
        for _ in range(warmup):
            warm._train_step()
            control._train_step()
        objective.load_state_dict(initial)
        timed = trainer(objective, n, "timed")  # fresh AdamW state, sampler at step 0
        load = OtherLoad().start()
        seconds = control_seconds = 0.0
        control_steps = 0
        # At least ~40 control steps however short the epoch, so small N get a steady control too.
        control_every = max(1, min(control_every, timed.sampler.steps_per_epoch // 40))
        for step in range(timed.sampler.steps_per_epoch):  # Trainer.fit's epoch: its steps, then the state save
            start = time.perf_counter()
            timed._train_step()
            seconds += time.perf_counter() - start
            if step % control_every == 0:
                start = time.perf_counter()
                control._train_step()
                control_seconds += time.perf_counter() - start
                control_steps += 1
        start = time.perf_counter()
        timed.save_state()
        seconds += time.perf_counter() - start
    batch = timed.sampler.batch_size
    return {"n": n, "steps": timed.step, "pairs_trained": timed.step * batch, "epoch_seconds": seconds,
            "control_pairs": control_steps * batch, "control_seconds": control_seconds, "bank_seconds": bank_seconds,
            "other_cores": load.cores(), "peak_rss": _peak_rss()}


def eval_child(m: int, dim: int, seed: int) -> dict:
    """Streaming retrieval of M text queries against M images, groups of about 2.5."""
    codes = synthetic_groups(m, seed)
    groups = [str(int(c)) for c in codes]
    queries = synthetic_unit_vectors(codes, dim, 2.0, space=0, seed=seed + 1, dtype=torch.float32)
    gallery = synthetic_unit_vectors(codes, dim, 2.0, space=0, seed=seed + 2, dtype=torch.float32)
    load = OtherLoad().start()
    start = time.perf_counter()
    result = retrieval_between(queries, groups, gallery, groups)
    seconds = time.perf_counter() - start
    return {"m": m, "dim": dim, "eval_seconds": seconds, "other_cores": load.cores(), "peak_rss": _peak_rss(),
            "metrics": result["metrics"], "chance": result["chance"]}


def embedding_width(config: StageConfig) -> int:
    """Width of the stage model's embeddings (learned part + language prior)."""
    model = stage1_model(config).eval()
    with torch.no_grad():
        tokens = torch.zeros(1, 1, FACTS["text"]["feature_dim"])
        return int(model("text", tokens, torch.ones(1, 1, dtype=torch.bool)).shape[1])


def _run_child(args: list[str], threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args, "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"child {' '.join(args)} failed with exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes {text!r}: give numbers such as 1e4,1e5") from None
    if not sizes or min(sizes) < 512:
        raise argparse.ArgumentTypeError(f"--sizes {text!r}: each size must be at least 512 (two batches)")
    return sizes


def _gb(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=_sizes, default=_sizes("1e4,1e5,1e6"), help="pair counts N (default: 1e4,1e5,1e6)")
    p.add_argument("--eval-size", type=lambda s: int(float(s)), default=100_000,
                   help="largest evaluation, queries = gallery = min(N, this) (default: %(default)s)")
    p.add_argument("--stage", default=str(REPO / "stages" / "image_text.toml"),
                   help="stage file (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="default: %(default)s")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed epoch (default: %(default)s)")
    p.add_argument("--control-every", type=int, default=10,
                   help="one step on the 10^4-pair control bank every this many epoch steps, fewer for short epochs "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--child", choices=["train", "eval"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_stage(args.stage, {"train": {"batch_size": args.batch_size, "epochs": 1, "device": "cpu"}})

    if args.child == "train":
        print(json.dumps(train_child(args.n, config, args.warmup, CONTROL_N, args.control_every)))
        return 0
    if args.child == "eval":
        print(json.dumps(eval_child(args.n, embedding_width(config), config.train.seed)))
        return 0

    probe = OtherLoad().start()
    time.sleep(1.0)
    if note := _load_note("before the start (1 s probe)", probe.cores()):
        print(note)
    print(f"stage {config.name} ({config.source}): d_model {config.model.d_model}, layers {config.model.layers}, "
          f"loss {config.loss.name}, batch {args.batch_size}, threads {args.threads}, cpu; features image "
          f"{FACTS['image']['feature_dim']} / text {FACTS['text']['feature_dim']}, pooled (1 token)")
    trains, evals = {}, {}
    for n in args.sizes:
        trains[n] = _run_child(["--child", "train", "--n", str(n), "--stage", args.stage, "--batch-size",
                                str(args.batch_size), "--warmup", str(args.warmup), "--control-every",
                                str(args.control_every)], args.threads)
        m = min(n, args.eval_size)
        if m not in evals:
            evals[m] = _run_child(["--child", "eval", "--n", str(m), "--stage", args.stage], args.threads)
        t, e = trains[n], evals[m]
        print(f"  N={n}: {t['steps']} steps, epoch {t['epoch_seconds']:.1f} s, "
              f"banks built in {t['bank_seconds']:.1f} s, "
              f"train peak {_gb(t['peak_rss'])}; eval {m}x{m} {e['eval_seconds']:.1f} s, peak {_gb(e['peak_rss'])}",
              flush=True)

    def per_pair(t: dict) -> float:
        return t["epoch_seconds"] / t["pairs_trained"]

    def vs_control(t: dict) -> float:
        return per_pair(t) / (t["control_seconds"] / t["control_pairs"])

    base = trains[args.sizes[0]]
    print()
    print(f"training, one epoch (batch {args.batch_size}); control = {CONTROL_N}-pair bank stepped in the same process")
    print(f"{'N':>9} {'steps':>6} {'epoch s':>9} {'us/pair':>8} {'ratio':>6} {'control us/pair':>16} "
          f"{'N/control':>10} {'ratio (ctl)':>12} {'peak RSS':>10}  other load")
    for n in args.sizes:
        t = trains[n]
        other = "n/a" if t["other_cores"] is None else f"{t['other_cores']:.2f} cores"
        control = 1e6 * t["control_seconds"] / t["control_pairs"]
        print(f"{n:>9} {t['steps']:>6} {t['epoch_seconds']:>9.1f} {1e6 * per_pair(t):>8.1f} "
              f"{per_pair(t) / per_pair(base):>6.2f} {control:>16.1f} {vs_control(t):>10.2f} "
              f"{vs_control(t) / vs_control(base):>12.2f} {_gb(t['peak_rss']):>10}  {other}")
    print(f"ratio = time per pair / that at N={args.sizes[0]}; ratio (ctl) = the same, each divided first by its "
          "control's time per pair measured alongside (robust to other load)")
    print()
    print("evaluation: streaming retrieval (retrieval_between), queries = gallery, groups of ~2.5")
    print(f"{'Q x G':>17} {'dim':>5} {'seconds':>9} {'peak RSS':>10} {'R@1':>7} {'chance':>8} {'mAP':>7}  other load")
    for m, e in evals.items():
        other = "n/a" if e["other_cores"] is None else f"{e['other_cores']:.2f} cores"
        print(f"{f'{m} x {m}':>17} {e['dim']:>5} {e['eval_seconds']:>9.1f} {_gb(e['peak_rss']):>10} "
              f"{e['metrics']['R@1']:>7.3f} {e['chance']['R@1']:>8.5f} {e['metrics']['mAP']:>7.3f}  {other}")
    worst = max((x for r in [*trains.values(), *evals.values()] if (x := r["other_cores"]) is not None), default=None)
    if note := _load_note("during the busiest measurement", worst):
        print(note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
