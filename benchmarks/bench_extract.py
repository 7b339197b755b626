"""Benchmark: ``cache build``'s extraction rate against the backbone's raw forward rate.

Per modality, on the same Tux Paint records, batch size and frozen backbone:

* raw forward: every record decoded and preprocessed once up front, then batches
  ``modality.featurize(backbone, items)`` (collate + encode) timed alone: the most a
  build could reach;
* build (workers=W): the real ``build_cache`` into a fresh cache: its DataLoader decodes
  (in W worker processes, or between forwards when W=0), the backbone encodes, the
  difficulty measurements run, every batch is committed to LMDB, the rejects file is written.

The arms alternate for ``--rounds`` rounds so that a change in the load of other processes
hits every arm alike, and each timed run waits for a quiet moment of the CPUs first
(``--quiet-wait``); each run's competing load is printed beside its time. Each arm's best round (the least disturbed by other processes, as
``timeit`` reports) and its median are printed; ``ratio = build rate / raw rate`` for each.
Loading the backbone and the fingerprint probe happen once before timing (a fixed cost of a
build, not a rate). Run: ``.venv/bin/python benchmarks/bench_extract.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from oneencoder.data.sources.tuxpaint import tuxpaint_records  # noqa: E402
from oneencoder.features.cache import build_cache  # noqa: E402
from oneencoder.features.workers import default_workers  # noqa: E402
from oneencoder.modality import Modality, create_stage_modalities  # noqa: E402
from oneencoder.training.config import load_stage  # noqa: E402

from _machine import OtherLoad, load_note, wait_for_quiet  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parent.parent


def raw_forward(modality: Modality, backbone: torch.nn.Module, items: list, batch_size: int) -> float:
    """Seconds for the backbone alone over already preprocessed items."""
    start = time.perf_counter()
    for i in range(0, len(items), batch_size):
        modality.featurize(backbone, items[i : i + batch_size])
    return time.perf_counter() - start


def build(modality: Modality, records: list[dict], batch_size: int, workers: int, scratch: Path) -> float:
    """Seconds for one real ``build_cache`` of ``records`` into a fresh cache."""
    root = Path(tempfile.mkdtemp(dir=scratch))
    try:
        start = time.perf_counter()
        report = build_cache(modality, records, root, batch_size=batch_size, num_workers=workers, progress=False)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if report.encoded != len(records):
        raise RuntimeError(f"build encoded {report.encoded} of {len(records)}: {report.summary()}")
    return seconds


def _cores(c: float | None) -> str:
    return "n/a" if c is None else f"{c:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", default=str(REPO / "stages" / "image_text.toml"), help="stage file (default: %(default)s)")
    p.add_argument("--modalities", default="image,text", help="comma-separated (default: %(default)s)")
    p.add_argument("--limit", type=int, default=128, help="images per arm; text takes 8x as many (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s, as `cache build`)")
    p.add_argument("--workers", default="0,1,2", help="build arms' DataLoader workers (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="alternations of the arms (default: %(default)s)")
    p.add_argument("--quiet-wait", type=float, default=60.0,
                   help="before each timed run, wait up to this many seconds for other processes to leave the "
                        "CPUs idle (0: never wait; default: %(default)s)")
    args = p.parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    config = load_stage(args.stage)
    names = [n.strip() for n in args.modalities.split(",") if n.strip()]
    modalities = create_stage_modalities(config.modality_options, list(config.modalities))
    workers = [int(w) for w in args.workers.split(",")]
    stamps = [r for r in tuxpaint_records() if r["caption"]]
    scratch = Path(tempfile.mkdtemp(prefix="oneencoder-bench-extract-"))
    print(f"stage {config.name}, device=cpu, torch threads={torch.get_num_threads()}, cores={os.cpu_count()}, "
          f"batch size {args.batch_size}, {args.rounds} rounds; `cache build` default workers here: "
          f"{default_workers('cpu')}")
    try:
        for name in names:
            m = modalities[name]
            records = stamps[: args.limit * (8 if name == "text" else 1)]
            m.fingerprint()  # the probe and weight hashes, once (cached by the modality)
            backbone = m.load_backbone()
            m.load_backbone = lambda b=backbone: b  # the build arms reuse it: its load is not a rate
            items = [m.prepare(r[m.spec.record_key])[1] for r in records]
            raw_forward(m, backbone, items[: args.batch_size], args.batch_size)  # warm-up, not timed
            arms = {"raw forward": lambda: raw_forward(m, backbone, items, args.batch_size)}
            for w in workers:
                arms[f"build workers={w}"] = lambda w=w: build(m, records, args.batch_size, w, scratch)
            times: dict[str, list[float]] = {arm: [] for arm in arms}
            loads: dict[str, list[float | None]] = {arm: [] for arm in arms}
            for _ in range(args.rounds):
                for arm, run in arms.items():
                    if args.quiet_wait > 0:
                        wait_for_quiet(args.quiet_wait)
                    load = OtherLoad().start()
                    times[arm].append(run())
                    loads[arm].append(load.cores())
            raw = times["raw forward"]
            print(f"\n{name}: {len(records)} samples per arm ({m.backbone_id})")
            print(f"{'arm':<18} {'best samples/s':>14} {'ratio':>6} {'median samples/s':>17} {'ratio':>6}   "
                  "seconds per round (other processes' cores)")
            for arm, secs in times.items():
                best, median = len(records) / min(secs), len(records) / statistics.median(secs)
                print(f"{arm:<18} {best:>14.1f} {min(raw) / min(secs):>6.2f} {median:>17.1f} "
                      f"{statistics.median(raw) / statistics.median(secs):>6.2f}   "
                      + " ".join(f"{s:.2f} ({_cores(c)})" for s, c in zip(secs, loads[arm])))
            best_loads = [loads[arm][secs.index(min(secs))] for arm, secs in times.items()]
            worst = max((c for c in best_loads if c is not None), default=None)
            if note := load_note(f"in the busiest of the {name} arms' best runs", worst):
                print(note)
        print("\nratio = build samples/s / raw forward samples/s, from each arm's best round and from its median")
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
