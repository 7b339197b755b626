"""Curriculum ablation on Tux Paint image-text: equal optimizer steps, 3 seeds per arm.

Every arm trains the shipped Stage-1 file for the same number of epochs (no early
stopping; the best *validation* epoch is kept, as in normal training) and reports:

* mean ± std over seeds of held-out (test) R@1 and R@5, image→text and text→image;
* validation R@1 (mean of both directions), which is what selects the "best" arm;
* steps to reach 95% of the random arm's final validation R@1 (mean over seeds).

The test split is never used to choose anything. Run:

    .venv/bin/python benchmarks/curriculum_ablation.py --out outputs/ablation

It needs the demo's manifest and cache (``make demo`` or ``oneencoder cache build``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Arms that do not name a loss use plain InfoNCE, so "random" is the no-curriculum control
# whatever the stage file's default loss is.
ARMS: dict[str, dict] = {
    "random": {},
    "anti": {"curriculum": {"pacer": "anti"}},
    "phases": {"curriculum": {"pacer": "phases"}},
    "linear": {"curriculum": {"pacer": "linear"}},
    "root": {"curriculum": {"pacer": "root"}},
    "geometric": {"curriculum": {"pacer": "geometric"}},
    "windows": {"curriculum": {"pacer": "windows"}},
    "self_paced": {"curriculum": {"pacer": "self_paced"}},
    "hard_negatives": {"curriculum": {"hard_negatives": 0.5}},
    "hnnce": {"loss": {"name": "hnnce", "beta": 2.0}},
    "margin": {"loss": {"name": "margin", "max_margin": 0.2}},
}


def _merge(base: dict, override: dict) -> dict:
    out = json.loads(json.dumps(base))
    for section, values in override.items():
        out.setdefault(section, {}).update(values)
    return out


def run_arm(args: tuple[str, dict, int, str, int, str, str]) -> dict:
    """Train one (arm, seed) in a worker process; returns its curves and test metrics."""
    name, override, seed, stage_path, epochs, data_dir, out_dir = args
    import torch

    torch.set_num_threads(1)  # two workers share two cores
    from oneencoder.training.config import parse_stage
    from oneencoder.training.stage import run_stage

    raw = tomllib.loads(Path(stage_path).read_text())
    raw = _merge(raw, {"loss": {"name": "infonce", "beta": 0.0, "max_margin": 0.0},
                       "curriculum": {"pacer": "random", "hard_negatives": 0.0}})
    raw = _merge(raw, override)
    raw = _merge(raw, {"data": {"manifest": f"{data_dir}/manifest.jsonl", "cache_dir": f"{data_dir}/cache"},
                       "train": {"seed": seed, "epochs": epochs, "patience": epochs + 1}})
    model_dir = Path(out_dir) / "models" / f"{name}-s{seed}"
    start = time.time()
    # A finished run with the same settings is re-reported, not retrained (the runs are seeded
    # and deterministic on CPU), so an interrupted or extended ablation picks up where it was.
    summary = run_stage(parse_stage(raw, stage_path), model_dir, resume=True, overwrite=True,
                        restart_if_changed=True, progress=False)
    history = [json.loads(line) for line in open(model_dir / "runs" / raw["stage"]["name"] / "metrics.jsonl")]
    curve = [(h["step"], (h["val/image→text/R@1"] + h["val/text→image/R@1"]) / 2) for h in history if "val/score" in h]
    test = {d: r["metrics"] for d, r in summary["test"]["directions"].items()}
    chance = {d: r["chance"] for d, r in summary["test"]["directions"].items()}
    best = max(curve, key=lambda c: c[1])
    return {"arm": name, "seed": seed, "curve": curve, "best_val_r1": best[1], "final_val_r1": curve[-1][1],
            "steps": summary["steps"], "test": test, "chance": chance, "seconds": time.time() - start}


def _steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    for step, value in curve:
        if value >= target:
            return step
    return None


def _fmt(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def summarise(results: list[dict]) -> tuple[str, dict]:
    by_arm: dict[str, list[dict]] = {}
    for r in results:
        by_arm.setdefault(r["arm"], []).append(r)
    random_final = statistics.mean(r["final_val_r1"] for r in by_arm["random"])
    target = 0.95 * random_final
    rows, table = [], {}
    for arm, runs in by_arm.items():
        reach = [_steps_to(r["curve"], target) for r in runs]
        reached = [s for s in reach if s is not None]
        row = {
            "val_R@1": statistics.mean(r["best_val_r1"] for r in runs),
            "test_i2t_R@1": _fmt([r["test"]["image→text"]["R@1"] for r in runs]),
            "test_i2t_R@5": _fmt([r["test"]["image→text"]["R@5"] for r in runs]),
            "test_t2i_R@1": _fmt([r["test"]["text→image"]["R@1"] for r in runs]),
            "test_t2i_R@5": _fmt([r["test"]["text→image"]["R@5"] for r in runs]),
            "steps_to_95pct_random": (f"{statistics.mean(reached):.0f}" + ("" if len(reached) == len(runs)
                                      else f" ({len(reached)}/{len(runs)} seeds)")) if reached else "never",
            "total_steps": runs[0]["steps"],
        }
        table[arm] = row
        rows.append(f"| {arm} | {row['val_R@1']:.3f} | {row['test_i2t_R@1']} | {row['test_i2t_R@5']} | "
                    f"{row['test_t2i_R@1']} | {row['test_t2i_R@5']} | {row['steps_to_95pct_random']} | {row['total_steps']} |")
    chance = results[0]["chance"]["image→text"]
    header = ("| arm | val R@1 (selects) | test i→t R@1 | test i→t R@5 | test t→i R@1 | test t→i R@5 | "
              f"steps to 95% of random (val R@1 {target:.3f}) | steps |\n|---|---|---|---|---|---|---|---|")
    text = (header + "\n" + "\n".join(rows) + f"\n\nChance: i→t R@1 {chance['R@1']:.3f}, R@5 {chance['R@5']:.3f}; "
            f"t→i R@1 {results[0]['chance']['text→image']['R@1']:.3f}.")
    return text, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default=str(Path(__file__).resolve().parent.parent / "stages" / "image_text.toml"))
    parser.add_argument("--data", default="outputs/demo", help="folder with manifest.jsonl and cache/")
    parser.add_argument("--out", default="outputs/ablation")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ",".join(ARMS))
    parser.add_argument("--no-combine", dest="combine", action="store_false", help="skip the best-combination arm")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (Path(args.data) / "manifest.jsonl").exists():
        sys.exit(f"error: {args.data}/manifest.jsonl not found; run `make demo` first")
    start = time.time()
    arms = {a: ARMS[a] for a in args.arms.split(",")}
    jobs = [(a, o, s, args.stage, args.epochs, args.data, args.out) for a, o in arms.items() for s in range(args.seeds)]
    # The difficulty table is computed once (stored next to the cache) before workers start.
    from oneencoder.training.config import load_stage
    from oneencoder.data.manifest import read_manifest
    from oneencoder.training.pairs import stage_difficulty

    config = load_stage(args.stage, {"data": {"manifest": f"{args.data}/manifest.jsonl", "cache_dir": f"{args.data}/cache"}})
    stage_difficulty(config, read_manifest(config.data.manifest))
    with ProcessPoolExecutor(args.workers) as pool:
        results = []
        for r in pool.map(run_arm, jobs):
            print(f"{r['arm']:>15s} seed {r['seed']}: best val R@1 {r['best_val_r1']:.3f}, "
                  f"test i→t R@1 {r['test']['image→text']['R@1']:.3f} ({r['seconds']:.0f} s)", flush=True)
            results.append(r)
        if "random" in arms and args.combine:
            # "best combination": the best pacer and the best negative/loss arm, chosen on validation only.
            val = {a: statistics.mean(r["best_val_r1"] for r in results if r["arm"] == a) for a in arms}
            pacers = [a for a in arms if a not in ("random", "anti") and "pacer" in ARMS[a].get("curriculum", {})]
            others = [a for a in arms if a in ("hard_negatives", "hnnce", "margin")]
            picks = [max(group, key=val.get) for group in (pacers, others) if group]
            combo = {}
            for pick in picks:
                combo = _merge(combo, ARMS[pick])
            name = "best:" + "+".join(picks)
            print(f"best combination on validation: {name}", flush=True)
            for r in pool.map(run_arm, [(name, combo, s, args.stage, args.epochs, args.data, args.out)
                                        for s in range(args.seeds)]):
                print(f"{r['arm']:>15s} seed {r['seed']}: best val R@1 {r['best_val_r1']:.3f}, "
                      f"test i→t R@1 {r['test']['image→text']['R@1']:.3f} ({r['seconds']:.0f} s)", flush=True)
                results.append(r)
    text, table = summarise(results)
    print(text)
    print(f"\nablation took {time.time() - start:.0f} s on {os.cpu_count()} cores")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from oneencoder.fileio import write_json_atomic, write_text_atomic

    write_json_atomic(out / "ablation.json", {"table": table, "runs": results})
    write_text_atomic(out / "ablation.md", text + "\n")


if __name__ == "__main__":
    main()
