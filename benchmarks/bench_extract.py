"""Benchmark: extraction rates (``cache build``, ``m.encode``) against the fastest raw backbone forward.

Per modality, on the same Tux Paint records, batch size and frozen backbone, side by side in one run:

* decode: every record loaded and preprocessed (``modality.prepare``), one process, no backbone;
* raw forward on each runtime (:mod:`oneencoder.features.runtime`): every record decoded and
  preprocessed once up front, then batches of ``modality.featurize(backbone, items)`` timed alone:
  PyTorch fp32 as loaded (NCHW), PyTorch channels_last, PyTorch bf16 autocast (``--bf16``) and
  onnxruntime (the graph exported once per fingerprint, before timing). The fastest of them is
  the reference: the most a build could reach on this machine;
* build (runtime R, workers=W): the real ``build_cache`` into a fresh cache: its DataLoader decodes
  (in W worker processes, or between forwards when W=0), the backbone encodes on R, the
  difficulty measurements run, every batch is committed to LMDB, the rejects file is written;
* encode (runtime R), with ``--model``: ``OneEncoder.encode`` of the same file paths / captions,
  decoding included (the model's modality options are then used for every arm).

The arms alternate for ``--rounds`` rounds so that a change in the load of other processes
hits every arm alike, and each timed run waits for a quiet moment of the CPUs first
(``--quiet-wait``); each run's competing load is printed beside its time. Each arm's best round (the
least disturbed by other processes, as ``timeit`` reports) and its median are printed, with two
ratios: to the fastest raw forward and to decode alone. Loading the backbone, exporting the graph
and the fingerprint probe happen once before timing (fixed costs, not rates).
Run: ``.venv/bin/python benchmarks/bench_extract.py --model outputs/v2/model-lit``.
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
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from oneencoder.apps.api import OneEncoder  # noqa: E402
from oneencoder.data.sources.tuxpaint import tuxpaint_records  # noqa: E402
from oneencoder.features.cache import build_cache  # noqa: E402
import oneencoder.features.runtime as runtime_module  # noqa: E402
from oneencoder.features.runtime import RuntimeBackbone, exportable, runtime_home  # noqa: E402
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


def decode(modality: Modality, inputs: list) -> float:
    """Seconds to load and preprocess every input (what a build's DataLoader does), no backbone."""
    start = time.perf_counter()
    for x in inputs:
        modality.prepare(x)
    return time.perf_counter() - start


def build(modality: Modality, records: list[dict], batch_size: int, workers: int, scratch: Path,
          runtime: str, home: Path) -> float:
    """Seconds for one real ``build_cache`` of ``records`` into a fresh cache on ``runtime``.

    The fresh root gets the graph and measured choice from ``home`` first, as a second build
    beside an existing cache would have them (exporting is a one-off cost, not a rate).
    """
    root = Path(tempfile.mkdtemp(dir=scratch))
    name = modality.spec.name
    if (home / f"{name}.onnx").is_dir():
        shutil.copytree(home / f"{name}.onnx", root / f"{name}.onnx")
    if (home / f"{name}.runtime.json").is_file():
        shutil.copy(home / f"{name}.runtime.json", root)
    try:
        start = time.perf_counter()
        report = build_cache(modality, records, root, batch_size=batch_size, num_workers=workers, progress=False,
                             runtime=runtime)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if report.encoded != len(records):
        raise RuntimeError(f"build encoded {report.encoded} of {len(records)}: {report.summary()}")
    return seconds


def encode(encoder: OneEncoder, name: str, inputs: list, batch_size: int) -> float:
    """Seconds for ``m.encode`` of raw inputs (paths, captions): decode, backbone, head."""
    start = time.perf_counter()
    encoder.encode(name, inputs, batch_size=batch_size, progress=False)
    return time.perf_counter() - start


def _before(run: Callable[[], float]) -> float:
    """``run`` with the backbone fed NCHW inputs, as every build ran before issue 24 (no channels_last)."""
    tuned = runtime_module._is_image_like
    runtime_module._is_image_like = lambda _t: False
    try:
        return run()
    finally:
        runtime_module._is_image_like = tuned


def _parity(m: Modality, backbone: torch.nn.Module, paths: dict, items: list, batch_size: int) -> None:
    """Least cosine of each path's features to fp32 PyTorch's (NCHW, as loaded) on ``items``."""
    ref = torch.cat([m.featurize(backbone, items[i : i + batch_size])[0] for i in range(0, len(items), batch_size)])
    for arm, path in paths.items():
        got = torch.cat([m.featurize(path, items[i : i + batch_size])[0] for i in range(0, len(items), batch_size)])
        cos = torch.nn.functional.cosine_similarity(got.flatten(0, 1).float(), ref.flatten(0, 1).float(), dim=1)
        print(f"parity {m.spec.name} {arm}: least cosine to fp32 {float(cos.min()):.7f} on {len(items)} samples")


def _cores(c: float | None) -> str:
    return "n/a" if c is None else f"{c:.1f}"


def _arms(m: Modality, name: str, records: list[dict], args: argparse.Namespace, scratch: Path,
          home: Path) -> dict:
    """The timed arms of one modality, each a function returning seconds; warmed up, not timed."""
    backbone = m.load_backbone()
    m.load_backbone = lambda b=backbone: b  # the build arms reuse it: its load is not a rate
    inputs = [r[m.spec.record_key] for r in records]
    items = [m.prepare(x)[1] for x in inputs]
    runtimes = [r for r in args.runtimes.split(",") if r != "onnx" or exportable(m)]
    paths = {"raw torch fp32": backbone,
             "raw torch channels_last": RuntimeBackbone(m, backbone, "torch", "fp32")}
    if args.bf16:
        paths["raw torch bf16"] = RuntimeBackbone(m, backbone, "torch", "bf16")
    if "onnx" in runtimes:
        paths["raw onnxruntime"] = RuntimeBackbone(m, backbone, "onnx", "fp32", home, print)
    arms = {"decode": lambda: decode(m, inputs)}
    for arm, path in paths.items():
        raw_forward(m, path, items[: args.batch_size], args.batch_size)  # warm-up (and export), not timed
    _parity(m, backbone, paths, items[: args.parity], args.batch_size)
    for arm, path in paths.items():
        arms[arm] = lambda path=path: raw_forward(m, path, items, args.batch_size)
    if args.before:
        arms["build before (NCHW)"] = lambda: _before(lambda: build(m, records, args.batch_size, 0, scratch,
                                                                     "torch", home))
    for runtime in runtimes:
        for w in [int(w) for w in args.workers.split(",")]:
            arms[f"build {runtime} w={w}"] = lambda w=w, r=runtime: build(m, records, args.batch_size, w, scratch,
                                                                             r, home)
    if args.model is not None:
        for runtime in runtimes:
            enc = OneEncoder(args.model, device="cpu", runtime=runtime)
            enc._backbones[name] = backbone  # loaded once for every arm
            enc.encode(name, inputs[: args.batch_size], batch_size=args.batch_size, progress=False)  # warm-up
            arms[f"m.encode {runtime}"] = lambda enc=enc: encode(enc, name, inputs, args.batch_size)
    return arms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", default=str(REPO / "stages" / "image_text.toml"), help="stage file (default: %(default)s)")
    p.add_argument("--model", type=Path, default=None,
                   help="a model directory: adds m.encode arms, and its modalities' options are used throughout")
    p.add_argument("--modalities", default="image,text", help="comma-separated (default: %(default)s)")
    p.add_argument("--limit", type=int, default=128, help="images per arm; text takes 8x as many (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s, as `cache build`)")
    p.add_argument("--workers", default="0", help="build arms' DataLoader workers (default: %(default)s)")
    p.add_argument("--runtimes", default="torch,onnx", help="build and encode arms' runtimes (default: %(default)s)")
    p.add_argument("--bf16", action="store_true", help="add a raw bf16-autocast arm (slow where the CPU lacks bf16)")
    p.add_argument("--parity", type=int, default=32, help="samples on which each raw path's features are "
                                                           "compared with fp32 PyTorch's (default: %(default)s)")
    p.add_argument("--before", action="store_true", help="add a build arm on the NCHW PyTorch path of before")
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
    names = [n.strip() for n in args.modalities.split(",") if n.strip()]
    if args.model is not None:
        model = OneEncoder(args.model, device="cpu")
        modalities = {n: model.modality(n) for n in names}
        where = f"model {args.model}"
    else:
        config = load_stage(args.stage)
        modalities = create_stage_modalities(config.modality_options, list(config.modalities))
        where = f"stage {config.name}"
    stamps = [r for r in tuxpaint_records() if r["caption"]]
    scratch = Path(tempfile.mkdtemp(prefix="oneencoder-bench-extract-"))
    home = runtime_home()
    print(f"{where}, device=cpu, torch threads={torch.get_num_threads()}, cores={os.cpu_count()}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, batch size {args.batch_size}, "
          f"{args.rounds} rounds; `cache build` default workers here: {default_workers('cpu')}")
    try:
        for name in names:
            m = modalities[name]
            records = stamps[: args.limit * (8 if name == "text" else 1)]
            m.fingerprint()  # the probe and weight hashes, once (cached by the modality)
            arms = _arms(m, name, records, args, scratch, home)
            times: dict[str, list[float]] = {arm: [] for arm in arms}
            loads: dict[str, list[float | None]] = {arm: [] for arm in arms}
            for _ in range(args.rounds):
                for arm, run in arms.items():
                    if args.quiet_wait > 0:
                        wait_for_quiet(args.quiet_wait)
                    load = OtherLoad().start()
                    times[arm].append(run())
                    loads[arm].append(load.cores())
            if args.rounds:  # 0: the parity lines alone
                _report(name, m, len(records), times, loads)
        print("\nratios: samples/s over the fastest raw forward's and over decode's, from each arm's best round "
              "and from its median")
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _report(name: str, m: Modality, n: int, times: dict[str, list[float]], loads: dict[str, list]) -> None:
    raw = {arm: secs for arm, secs in times.items() if arm.startswith("raw ")}
    fastest = min(raw, key=lambda arm: min(raw[arm]))
    ref_best, ref_median = min(raw[fastest]), statistics.median(raw[fastest])
    dec_best, dec_median = min(times["decode"]), statistics.median(times["decode"])
    print(f"\n{name}: {n} samples per arm ({m.backbone_id}); fastest raw forward: {fastest}; "
          f"load average now {os.getloadavg()[0]:.2f}")
    print(f"{'arm':<26} {'best/s':>8} {'/raw':>5} {'/dec':>5} {'median/s':>9} {'/raw':>5} {'/dec':>5}   "
          "seconds per round (other processes' cores)")
    for arm, secs in times.items():
        best, median = min(secs), statistics.median(secs)
        print(f"{arm:<26} {n / best:>8.1f} {ref_best / best:>5.2f} {dec_best / best:>5.2f} {n / median:>9.1f} "
              f"{ref_median / median:>5.2f} {dec_median / median:>5.2f}   "
              + " ".join(f"{s:.2f} ({_cores(c)})" for s, c in zip(secs, loads[arm])))
    best_loads = [loads[arm][secs.index(min(secs))] for arm, secs in times.items()]
    worst = max((c for c in best_loads if c is not None), default=None)
    if note := load_note(f"in the busiest of the {name} arms' best runs", worst):
        print(note)


if __name__ == "__main__":
    sys.exit(main())
