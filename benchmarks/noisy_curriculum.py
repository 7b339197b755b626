"""Curriculum ablation v2: where a curriculum is meant to help, on noisy image-text pairs.

Data regimes (validation and test are always Tux Paint's clean val/test splits):

* ``clean``: the Tux Paint demo manifest;
* ``noise20`` / ``noise50``: the same with 20 % / 50 % of the training captions shuffled
  (``oneencoder data corrupt``, seed 0);
* ``openclipart``: Tux Paint train + 8,093 openclipart pairs with their real, noisy captions.

Every arm of a regime runs the same number of optimizer steps (the oracle, with fewer
pairs, runs more epochs to match), 3 seeds, best *validation* epoch kept. Output: mean ±
std of held-out R@1 / R@5 both ways, steps to 95 % of the InfoNCE random arm's final
validation R@1, and each scorer's ROC-AUC at separating the injected pairs (the
``corrupted`` marker is read here, for scoring, never by training). Run:

    .venv/bin/python benchmarks/noisy_curriculum.py --out outputs/noisy_ablation

It needs the demo's manifest and cache (``make demo``) and, for ``openclipart``, its
manifest and cache (docs/openclipart.md). The corrupted caches are seeded with a copy of
the demo cache, so only the corrupted rows are encoded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curriculum_ablation import ARMS as CLEAN_ARMS, _fmt, _merge, _steps_to, run_arm  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
AGREEMENT = {"pair_agreement": 1.0}
# The no-curriculum controls, the pacers that existed before this benchmark, and the noise-aware arms.
ARMS: dict[str, dict] = {
    "random": {},
    "random+hnnce": CLEAN_ARMS["hnnce"],
    **{p: CLEAN_ARMS[p] for p in ("phases", "linear", "root", "geometric", "windows", "self_paced")},
    "trusted_first": {"curriculum": {"pacer": "root", "scorers": AGREEMENT}},
    "two_stage": {"curriculum": {"pacer": "windows", "scorers": AGREEMENT}},
    "superloss": {"curriculum": {"weighting": "superloss"}},
    "trust": {"curriculum": {"weighting": "trust"}},
    "trust+superloss": {"curriculum": {"weighting": "trust+superloss"}},
    "select30": {"curriculum": {"weighting": "trust", "trust_threshold": 0.3}},
    "select50": {"curriculum": {"weighting": "trust", "trust_threshold": 0.5}},
}
NOISE_AWARE = ["trusted_first", "two_stage", "superloss", "trust", "trust+superloss", "select30", "select50"]
REGIMES = {"clean": 0.0, "noise20": 0.2, "noise50": 0.5, "openclipart": None}
OPENCLIPART_ARMS = ("random", "random+hnnce", "trust", "select30", "select50")  # 7x the steps: fewer arms


def prepare_regime(regime: str, demo: Path, openclipart: Path, root: Path) -> Path:
    """Folder with the regime's ``manifest.jsonl`` and ``cache/`` (built once, then reused)."""
    from oneencoder.features.cache import build_cache
    from oneencoder.training.config import load_stage
    from oneencoder.data.sources.corrupt import CORRUPTED_FIELD, corrupt_manifest
    from oneencoder.data.manifest import read_manifest, write_manifest
    from oneencoder.training.pairs import stage_modalities

    fraction = REGIMES[regime]
    if fraction is None:
        return openclipart
    if fraction == 0.0:
        return demo
    data = root / regime
    if not (data / "manifest.jsonl").exists():
        data.mkdir(parents=True, exist_ok=True)
        corrupt_manifest(demo / "manifest.jsonl", data / "manifest.jsonl", fraction, seed=0)
    if not (data / "cache").exists():
        shutil.copytree(demo / "cache", data / "cache.tmp", dirs_exist_ok=True)
        (data / "cache.tmp").rename(data / "cache")
    config = load_stage(REPO / "stages" / "image_text.toml",
                        {"data": {"manifest": str(data / "manifest.jsonl"), "cache_dir": str(data / "cache")}})
    records = read_manifest(config.data.manifest)
    for modality in stage_modalities(config).values():
        build_cache(modality, records, config.data.cache_dir, progress=False)
    oracle = data.parent / f"{regime}-oracle"  # the uncorrupted pairs only, same cache
    if not (oracle / "manifest.jsonl").exists():
        oracle.mkdir(parents=True, exist_ok=True)
        write_manifest(oracle / "manifest.jsonl", [r for r in records if not r.get(CORRUPTED_FIELD)])
        (oracle / "cache").symlink_to((data / "cache").resolve())
    return data


def roc_auc(score: list[float], label: list[bool]) -> float:
    """P(a random positive scores above a random negative), ties counted half (Mann-Whitney)."""
    import numpy as np
    from oneencoder.training.curriculum.scorers import _average_ranks

    s, y = np.asarray(score, dtype=np.float64), np.asarray(label, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def scorer_aucs(data: Path, label_of: callable) -> dict[str, float]:
    """ROC-AUC of every stored scorer (and ``pair_agreement``'s measurements) at flagging ``label_of`` rows."""
    import numpy as np
    from oneencoder.training.curriculum.difficulty import DifficultyTable
    from oneencoder.data.manifest import read_manifest

    table = DifficultyTable.load(data / "cache" / "difficulty-image-text.json")
    rows = {r["id"]: r for r in read_manifest(data / "manifest.jsonl")}
    label = [bool(label_of(rows[i])) for i in table.ids]
    out = {name: roc_auc(score, label) for name, score in table.scores.items()}
    for key, values in table.measurements.get("pair_agreement", {}).items():
        out[f"pair_agreement.{key}"] = roc_auc(-np.asarray(values), label)  # low agreement = suspect
    return out


def online_aucs(model_dir: Path, data: Path, stage: str, label_of: callable) -> dict[str, float]:
    """ROC-AUC of the sampler's loss EMA and of the loss predictor at the end of a self-paced run."""
    from safetensors.torch import load_file
    from oneencoder.training.config import load_stage
    from oneencoder.data.manifest import read_manifest
    from oneencoder.training.pairs import load_pair_split, stage_modalities

    state = load_file(str(model_dir / "runs" / stage / "last.safetensors"))
    config = load_stage(REPO / "stages" / "image_text.toml",
                        {"data": {"manifest": str(data / "manifest.jsonl"), "cache_dir": str(data / "cache")}})
    records = read_manifest(config.data.manifest)
    ids = load_pair_split(records, "train", stage_modalities(config), config.data.cache_dir).ids
    rows = {r["id"]: r for r in records}
    label = [bool(label_of(rows[i])) for i in ids]
    out = {"online loss (EMA)": roc_auc(state["sampler.ema"].tolist(), label)}
    if "sampler.predicted" in state:
        out["loss predictor"] = roc_auc(state["sampler.predicted"].tolist(), label)
    return out


def _jobs(regime: str, arms: dict[str, dict], data: Path, out: Path, seeds: int, steps: int) -> list[tuple]:
    from oneencoder.data.manifest import read_manifest

    n_train = sum(r.get("split") == "train" for r in read_manifest(data / "manifest.jsonl"))
    jobs = []
    for name, override in arms.items():
        arm_data = data.parent / f"{regime}-oracle" if name == "oracle" else data
        n = n_train if name != "oracle" else sum(r.get("split") == "train"
                                                 for r in read_manifest(arm_data / "manifest.jsonl"))
        epochs = max(1, round(steps / max(1, n // 128)))  # equal optimizer steps at batch 128
        for seed in range(seeds):
            jobs.append((name, override, seed, str(REPO / "stages" / "image_text.toml"), epochs, str(arm_data),
                         str(out / regime)))
    return jobs


def summarise(regime: str, runs: list[dict]) -> tuple[str, dict]:
    by_arm: dict[str, list[dict]] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], []).append(r)
    final = statistics.mean(r["final_val_r1"] for r in by_arm["random"])
    target = 0.95 * final
    table, lines = {}, []
    for arm, rs in by_arm.items():
        reach = [s for s in (_steps_to(r["curve"], target) for r in rs) if s is not None]
        full = [s for s in (_steps_to(r["curve"], final) for r in rs) if s is not None]
        row = {"val_R@1": statistics.mean(r["best_val_r1"] for r in rs),
               **{f"{d}_{k}": _fmt([r["test"][d][k] for r in rs]) for d in ("image→text", "text→image")
                  for k in ("R@1", "R@5")},
               "i2t_R@1_mean": statistics.mean(r["test"]["image→text"]["R@1"] for r in rs),
               "steps_to_95": _reached(reach, len(rs)), "steps_to_random_final": _reached(full, len(rs)),
               "steps": rs[0]["steps"]}
        table[arm] = row
        lines.append(f"| {arm} | {row['val_R@1']:.3f} | {row['image→text_R@1']} | {row['image→text_R@5']} | "
                     f"{row['text→image_R@1']} | {row['text→image_R@5']} | {row['steps_to_95']} | "
                     f"{row['steps_to_random_final']} | {row['steps']} |")
    head = (f"**{regime}**\n\n| arm | val R@1 | test i→t R@1 | test i→t R@5 | test t→i R@1 | test t→i R@5 | "
            f"steps to 95% of random's final val R@1 ({target:.3f}) | steps to random's final ({final:.3f}) | steps |"
            "\n|---|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(lines), table


def recovery(table: dict) -> str:
    """How much of what the noise costs the best noise-aware arm (chosen on validation) wins back."""
    aware = [a for a in table if a in NOISE_AWARE or (a.startswith("best:") and any(n in a for n in NOISE_AWARE))]
    if not aware:
        return "no noise-aware arm ran"
    pick = max(aware, key=lambda a: table[a]["val_R@1"])
    base = max(("random", "random+hnnce"), key=lambda a: table.get(a, {}).get("i2t_R@1_mean", -1.0))
    got, floor, ceiling = (table[a]["i2t_R@1_mean"] for a in (pick, base, "oracle"))
    if ceiling <= floor:
        return (f"Here the oracle ({ceiling:.3f}) is no better than the better random arm ({base}, {floor:.3f}) "
                f"on test i→t R@1, so there is nothing to recover; the best noise-aware arm on validation, "
                f"{pick}, has {got:.3f}.")
    share = (got - floor) / (ceiling - floor)
    return (f"Best noise-aware arm on validation: **{pick}**, test i→t R@1 {got:.3f}; better random arm "
            f"({base}) {floor:.3f}; oracle {ceiling:.3f}: it recovers **{share:.0%}** of what the noise costs "
            "(bar: 50 %).")


def regime_text(regime: str, result: dict) -> tuple[str, dict]:
    """Markdown of one regime: the arms' table, then the scorers' ROC-AUC."""
    text, table = summarise(regime, result["runs"])
    if "oracle" in table:
        text += "\n\n" + recovery(table)
    if result["aucs"]:
        what = "injected pairs" if REGIMES[regime] else "captions tagged template / non-English / junk"
        text += (f"\n\nROC-AUC at separating {what} (training pairs):\n\n| scorer | ROC-AUC |\n|---|---|\n"
                 + "\n".join(f"| {k} | {v:.3f} |" for k, v in result["aucs"].items()))
    return text + f"\n\n({regime}: {result['seconds']:.0f} s)", table


def _reached(steps: list[int], seeds: int) -> str:
    """Mean step at which the seeds that got there did, and how many did."""
    if not steps:
        return "never"
    return f"{statistics.mean(steps):.0f}" + ("" if len(steps) == seeds else f" ({len(steps)}/{seeds} seeds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="outputs/demo", help="folder with the demo's manifest.jsonl and cache/")
    parser.add_argument("--openclipart", default="outputs/openclipart", help="folder with its manifest and cache")
    parser.add_argument("--out", default="outputs/noisy_ablation")
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--arms", default=",".join(ARMS), help="subset of: " + ",".join(ARMS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per Tux Paint arm")
    parser.add_argument("--openclipart-steps", type=int, default=1000, help="optimizer steps per openclipart arm")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--extra-arm", action="append", default=[], metavar="NAME=JSON",
                        help='another arm, e.g. select=\'{"curriculum": {"weighting": "trust", "trust_threshold": 0.5}}\'')
    parser.add_argument("--from-json", type=Path, help="print the tables of an earlier run's noisy_ablation.json")
    args = parser.parse_args()
    if args.from_json:
        for regime, result in json.loads(args.from_json.read_text()).items():
            print(regime_text(regime, result)[0] + "\n")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from oneencoder.training.config import load_stage
    from oneencoder.data.sources.corrupt import CORRUPTED_FIELD
    from oneencoder.fileio import write_json_atomic, write_text_atomic
    from oneencoder.data.manifest import read_manifest
    from oneencoder.training.pairs import stage_difficulty

    start, out = time.time(), Path(args.out)
    for spec in args.extra_arm:
        name, _, override = spec.partition("=")
        ARMS[name] = json.loads(override)
        NOISE_AWARE.append(name)
    extra = [s.partition("=")[0] for s in args.extra_arm]
    chosen = [a for a in args.arms.split(",") if a] + extra
    report, everything = [], {}
    for regime in args.regimes.split(","):
        t0 = time.time()
        data = prepare_regime(regime, Path(args.demo), Path(args.openclipart), out / "data")
        config = load_stage(REPO / "stages" / "image_text.toml", {"data": {
            "manifest": str(data / "manifest.jsonl"), "cache_dir": str(data / "cache")}})
        stage_difficulty(config, read_manifest(config.data.manifest))  # once, before the workers
        injected = REGIMES[regime] not in (None, 0.0)
        names = [a for a in chosen if regime != "openclipart" or a in OPENCLIPART_ARMS or a in extra]
        arms = {a: ARMS[a] for a in names}
        if injected:
            arms["oracle"] = {}
        steps = args.openclipart_steps if regime == "openclipart" else args.steps
        with ProcessPoolExecutor(args.workers) as pool:
            runs = list(pool.map(run_arm, _jobs(regime, arms, data, out, args.seeds, steps)))
            # The best combination: the best pacer arm and the best weighting/loss arm, on validation only.
            val = {a: statistics.mean(r["best_val_r1"] for r in runs if r["arm"] == a) for a in arms if a != "oracle"}
            pacers = [a for a in val if "pacer" in ARMS[a].get("curriculum", {})]
            others = [a for a in val if a not in pacers and a != "random"]
            if pacers and others:
                picks = [max(pacers, key=val.get), max(others, key=val.get)]
                combo = _merge(ARMS[picks[0]], ARMS[picks[1]])
                runs += list(pool.map(run_arm, _jobs(regime, {"best:" + "+".join(picks): combo}, data, out,
                                                     args.seeds, steps)))
        aucs = {}
        label_of = ((lambda r: r.get(CORRUPTED_FIELD, False)) if injected
                    else (lambda r: bool(r.get("noise"))) if regime == "openclipart" else None)
        if label_of is not None:
            aucs = scorer_aucs(data, label_of)
            sp = out / regime / "models" / "self_paced-s0"
            if sp.exists():
                aucs.update(online_aucs(sp, data, config.name, label_of))
        everything[regime] = {"aucs": aucs, "runs": runs, "seconds": time.time() - t0}
        text, everything[regime]["table"] = regime_text(regime, everything[regime])
        print(text + "\n", flush=True)
        report.append(text)
    summary = "\n\n".join(report) + f"\n\nablation took {time.time() - start:.0f} s on {os.cpu_count()} cores\n"
    print(summary.splitlines()[-1])
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "noisy_ablation.json", everything)
    write_text_atomic(out / "noisy_ablation.md", summary)


if __name__ == "__main__":
    main()
