"""The caption decoder over several seeds: held-out BLEU-4, CIDEr-D and WER beside both baselines.

Each seed trains the full recipe of ``oneencoder train-decoder`` (one decoder per noise
level, the noise and the projection chosen on validation) into a temporary copy of the
model, then scores the ``--split`` of every modality with captions. Prints mean ± std per
modality and row (decoder, retrieval captioning, the most frequent caption):

    .venv/bin/python benchmarks/caption_seeds.py --model outputs/demo/model \
        --data outputs/demo/manifest.jsonl --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import oneencoder  # noqa: E402
from oneencoder.apps.captions import DECODER_TRAIN, evaluate_captions, fit_decoder, imagenet_captions  # noqa: E402
from oneencoder.data.manifest import read_manifest  # noqa: E402

METRICS = ("BLEU-4", "CIDEr-D", "WER")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--split", default="test")
    parser.add_argument("--no-imagenet", action="store_true", help="Train on the manifest's captions only.")
    parser.add_argument("--log", type=Path, default=None, help="Append one JSON line with every seed's scores.")
    args = parser.parse_args()

    records = read_manifest(args.data)
    extra = [] if args.no_imagenet else imagenet_captions()
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        work = Path(tempfile.mkdtemp(prefix="caption-seeds-"))
        try:
            model = work / "model"
            shutil.copytree(args.model, model, ignore=shutil.ignore_patterns("runs", "decoder"))
            m = oneencoder.load(model, device="cpu")
            start = time.time()
            info = fit_decoder(m, records, args.cache_dir, extra_captions=extra, progress=False,
                               train=dataclasses.replace(DECODER_TRAIN, seed=seed, device="cpu"))
            seconds = time.time() - start
            scores = evaluate_captions(m, records, args.cache_dir, args.split)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        runs.append({"seed": seed, "seconds": round(seconds, 1), "noise_std": info["noise_std"],
                     "projection": info["projection"], "val_cider_d": info["val_cider_d"],
                     "scores": {n: {row: r[row] for row in ("decoder", "retrieval", "prior")} for n, r in scores.items()},
                     "examples": {n: r["examples"][:5] for n, r in scores.items()}})
        print(json.dumps(runs[-1], ensure_ascii=False), flush=True)
    print(f"\n{args.split} split, {len(runs)} seeds (mean ± std); training "
          f"{statistics.mean(r['seconds'] for r in runs) / 60:.1f} min per seed")
    for name in runs[0]["scores"]:
        for row in ("decoder", "retrieval", "prior"):
            cells = []
            for metric in METRICS:
                values = [r["scores"][name][row][metric] for r in runs]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{metric} {statistics.mean(values):.3f} ± {spread:.3f}")
            print(f"{name:9s} {row:10s} " + "  ".join(cells))
    if args.log:
        with args.log.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"model": str(args.model), "data": str(args.data), "runs": runs}) + "\n")


if __name__ == "__main__":
    main()
