"""One stage file, several seeds: validation and held-out test R@1 as mean ± std.

Every row of docs/results.md's "Stage 1 v2" table comes from one call. Options of the
stage file are changed with dotted keys whose values are TOML literals, so no stage
file has to be copied for an ablation arm:

    .venv/bin/python benchmarks/stage_seeds.py stages/image_text_lit.toml --seeds 0,1,2 \
        loss.name='"sigmoid"' loss.init_temperature=0.1 data.cache_dir='"outputs/lite2-mpnet"'

With ``--add-to MODEL`` the stage adds its trainable modality to a copy of MODEL per seed
(as ``oneencoder add-modality`` does; ``--anchor`` as there):

    .venv/bin/python benchmarks/stage_seeds.py stages/audio.toml --add-to outputs/demo/model --anchor text \
        data.manifest='"outputs/sounds/combined.jsonl"' data.cache_dir='"outputs/sounds/cache"'

Features missing from the cache are encoded first (as ``oneencoder train`` does). Models
are written to temporary folders and removed; one JSON line per arm is appended to
``--log``. Choices are made on the ``val`` columns; ``test`` is reported, never tuned on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oneencoder.training.add_modality import add_modality_config  # noqa: E402
from oneencoder.training.config import StageConfig, parse_stage, resolve_stage_path  # noqa: E402
from oneencoder.training.prepare import prepare_stage  # noqa: E402
from oneencoder.training.seeds import train_in_copy  # noqa: E402


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``section.key=value`` (value a TOML literal) set into the raw stage table."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: override {item!r} is not key=value")
        *path, last = key.split(".")
        table = raw
        for part in path:
            table = table.setdefault(part, {})
        try:
            table[last] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            raise SystemExit(f"error: override {item!r}: the value is no TOML literal (quote strings: '\"x\"')")
    return raw


def stage_config(raw: dict, source: str, seed: int, add_to: str | None, anchor: str | None,
                 overrides: list[str]) -> StageConfig:
    """The seed's config: the stage itself, or (``add_to``) an add-modality stage on its modality."""
    if add_to is None:
        raw.setdefault("train", {})["seed"] = seed
        return parse_stage(raw, source)
    sections = apply_overrides({}, overrides + [f"train.seed={seed}"])
    data = sections.pop("data", {})
    return add_modality_config(raw["stage"]["trainable"][0], data.get("manifest", raw["data"]["manifest"]),
                               anchor=anchor, cache_dir=data.get("cache_dir", raw["data"].get("cache_dir")),
                               stage=source, overrides=sections)


def run_seed(config: StageConfig, seed: int, add_to: str | None) -> dict:
    start = time.time()
    result = train_in_copy(config, Path(add_to) if add_to else None)  # a fresh copy of the model each seed
    val = {k: v for k, v in result["val"].items() if k.endswith("R@1") or k == "score"}
    # test directions, and test rows marked ``heldout`` per subset (e.g. tuxpaint:image→text)
    test = {d: metrics["R@1"] for d, metrics in result["test"].items()}
    return {"seed": seed, "best_epoch": result["best_epoch"], "seconds": round(time.time() - start, 1),
            "val": val, "test": test}


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", help="stage file or shipped stage name")
    parser.add_argument("overrides", nargs="*", help="section.key=TOML-value")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--log", default="outputs/stage_seeds.jsonl")
    parser.add_argument("--add-to", help="model directory to add the stage's trainable modality to (a copy per seed)")
    parser.add_argument("--anchor", help="with --add-to: the modality to align to")
    args = parser.parse_intermixed_args()
    path = resolve_stage_path(args.stage)
    raw = apply_overrides(tomllib.loads(path.read_text(encoding="utf-8")), args.overrides)
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = {seed: stage_config(raw, str(path), seed, args.add_to, args.anchor, args.overrides) for seed in seeds}
    # encode what the cache lacks, once: seeds share the features
    prepare_stage(configs[seeds[0]], model_dir=args.add_to)
    rows = []
    for seed in seeds:
        rows.append(run_seed(configs[seed], seed, args.add_to))
        print(json.dumps(rows[-1]), flush=True)
    summary = {"stage": str(path), "overrides": args.overrides, "add_to": args.add_to, "anchor": args.anchor,
               "val": {k: mean_std([r["val"][k] for r in rows]) for k in rows[0]["val"]},
               "test": {k: mean_std([r["test"][k] for r in rows]) for k in rows[0]["test"]}}
    print("val  " + "  ".join(f"{k} {v}" for k, v in summary["val"].items()))
    print("test " + "  ".join(f"{k} R@1 {v}" for k, v in summary["test"].items()))
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "a", encoding="utf-8") as f:
        f.write(json.dumps({**summary, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
