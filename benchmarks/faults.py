"""Fault injection: ``kill -9`` at every file-write boundary and at random times, then resume.

Every run is the real CLI in a subprocess. A *boundary kill* wraps ``os.replace`` (the
last step of every atomic file write, see ``oneencoder/fileio.py``) so that the process
dies with ``os._exit`` right after the k-th replacement: exactly between two writes. A
*timed kill* sends SIGKILL to the process group after a random delay (the LMDB cache
commits through its own transactions, not ``os.replace``). After each kill the same
command runs again, to completion, and the result is compared byte for byte with an
uninterrupted run: weights files, the cache's measurements and inputs, rejects, the metric
log, and ``oneencoder.json`` without its wall-clock entries. The cache's features are
compared to within fp16 rounding: a resumed build batches the samples it still lacks
differently, and a backbone's last bit can depend on its batch (``oneencoder/features/rounding.py``).

``tests/test_faults.py`` runs a few kills of each kind; this script runs them all:

    .venv/bin/python benchmarks/faults.py --out outputs/faults
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import numpy as np

from oneencoder.features.rounding import same_features

REPO = Path(__file__).resolve().parent.parent

# Runs the CLI with os.replace wrapped: FAULT_KILL_AT=k exits after the k-th call; FAULT_COUNT_FILE
# receives the number of calls of a run that was not killed; FAULT_TRACE_FILE, each call's target.
_WRAPPER = """
import atexit, os, sys
_replace, _calls = os.replace, [0]
_at = int(os.environ.get("FAULT_KILL_AT", "0"))
_trace = os.environ.get("FAULT_TRACE_FILE")
def replace(*args, **kwargs):
    _replace(*args, **kwargs)
    _calls[0] += 1
    if _trace:
        with open(_trace, "a") as f:
            f.write(f"{_calls[0]} {args[1]}\\n")
    if _calls[0] == _at:
        os._exit(137)
os.replace = replace
if os.environ.get("FAULT_COUNT_FILE"):
    atexit.register(lambda: open(os.environ["FAULT_COUNT_FILE"], "w").write(str(_calls[0])))
sys.argv = ["oneencoder", *sys.argv[1:]]
from oneencoder.cli.main import main
main()
"""
# Wall-clock values that differ between any two runs.
_VOLATILE = {"time", "train_seconds", "seconds"}


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1"}


def run_cli(args: list[str], kill_at: int = 0, count_file: Path | None = None, trace_file: Path | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
    env = _env()
    env["FAULT_KILL_AT"] = str(kill_at)
    if count_file is not None:
        env["FAULT_COUNT_FILE"] = str(count_file)
    if trace_file is not None:
        env["FAULT_TRACE_FILE"] = str(trace_file)
    return subprocess.run([sys.executable, "-c", _WRAPPER, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def run_killed_after(args: list[str], seconds: float, timeout: float = 900) -> bool:
    """Start the CLI and SIGKILL its whole process group after ``seconds``; True if it was still running."""
    job = subprocess.Popen([sys.executable, "-c", _WRAPPER, *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=_env(), start_new_session=True)
    try:
        job.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=timeout)
        return True


def run_killed_once_writing(args: list[str], started: Path, after: float, timeout: float = 900) -> bool:
    """Start the CLI, and SIGKILL it ``after`` seconds once ``started`` exists (its first write); True if killed."""
    job = subprocess.Popen([sys.executable, "-c", _WRAPPER, *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=_env(), start_new_session=True)
    deadline = time.time() + timeout
    while not started.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(after)
    if job.poll() is not None:
        return False
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=timeout)
    return True


def _scrub(value):
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def fingerprint_model(model_dir: Path) -> dict[str, str]:
    """sha256 of every weights file, the scrubbed ``oneencoder.json``, test report and metric log."""
    out = {}
    for path in sorted(model_dir.rglob("*.safetensors")):
        if "runs" not in path.relative_to(model_dir).parts:
            out[str(path.relative_to(model_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    out["oneencoder.json"] = json.dumps(_scrub(json.loads((model_dir / "oneencoder.json").read_text())), sort_keys=True)
    for rel in sorted(p.relative_to(model_dir) for p in model_dir.glob("runs/*/test.json")):
        out[str(rel)] = json.dumps(_scrub(json.loads((model_dir / rel).read_text())), sort_keys=True)
    for rel in sorted(p.relative_to(model_dir) for p in model_dir.glob("runs/*/metrics.jsonl")):
        out[str(rel)] = (model_dir / rel).read_text()
    return out


def cached_ids(cache_dir: Path) -> set[str]:
    """``modality/id`` of every cached feature."""
    import lmdb

    out = set()
    for data in sorted(cache_dir.glob("*/data.mdb")):
        env = lmdb.open(str(data.parent), readonly=True, lock=False)
        with env.begin() as txn:
            out |= {f"{data.parent.name}/{k[2:].decode()}" for k, _ in txn.cursor() if k.startswith(b"f/")}
        env.close()
    return out


class FeaturesToRounding:
    """One modality's cached features, equal to another's when every entry is within fp16 rounding.

    A resumed build encodes the samples it still lacks in other batches than an uninterrupted
    build, and a backbone's last bits can depend on the batch (``oneencoder/features/rounding.py``).
    """

    def __init__(self, features: dict[str, np.ndarray]) -> None:
        self.features = features

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeaturesToRounding) or self.features.keys() != other.features.keys():
            return False
        return all(same_features(a, other.features[sid]) for sid, a in self.features.items())

    def __repr__(self) -> str:
        return f"FeaturesToRounding({len(self.features)} entries)"


def fingerprint_cache(cache_dir: Path) -> dict[str, object]:
    """Every cached entry per modality: ids, token counts, measurements and inputs exactly (a hash),
    the features to within fp16 rounding; and the rejects."""
    import lmdb

    out: dict[str, object] = {}
    for data in sorted(cache_dir.glob("*/data.mdb")):
        env = lmdb.open(str(data.parent), readonly=True, lock=False)
        digest, features = hashlib.sha256(), {}
        with env.begin() as txn:
            for key, value in txn.cursor():
                if key.startswith(b"f/"):  # 4-byte token count, then fp16 features
                    features[key[2:].decode()] = np.frombuffer(value, dtype=np.float16, offset=4)
                    value = value[:4]
                digest.update(key + b"\0" + value)
        env.close()
        out[data.parent.name] = digest.hexdigest()
        out[f"{data.parent.name} features"] = FeaturesToRounding(features)
    for rejects in sorted(cache_dir.glob("*.rejects.jsonl")):
        out[rejects.name] = "".join(sorted(rejects.read_text().splitlines(keepends=True)))
    return out


@dataclass
class Tally:
    kind: str
    kills: int = 0
    resumed: int = 0
    identical: int = 0
    lost: int = 0
    failures: list[str] = field(default_factory=list)

    def row(self) -> str:
        return f"| {self.kind} | {self.kills} | {self.resumed} | {self.identical} | {self.lost} |"


def make_data(out: Path, per_split: dict[str, int], with_sound: bool = False, name: str = "manifest.jsonl") -> Path:
    """A manifest of real Tux Paint stamps: the first ``per_split[split]`` captioned ones (with a sound) of each split."""
    sys.path.insert(0, str(REPO))
    from oneencoder.data.sources.tuxpaint import tuxpaint_records
    from oneencoder.fileio import write_jsonl_atomic

    taken = {s: 0 for s in per_split}
    rows = []
    for rec in tuxpaint_records():
        wanted = rec["caption"] and (rec["sound"] or not with_sound)
        if wanted and taken.get(rec["split"], 0) < per_split.get(rec["split"], 0):
            rows.append(rec)
            taken[rec["split"]] += 1
    rows.append({"id": "broken-file", "image": "/nonexistent/stamp.png", "sound": "/nonexistent/stamp.ogg",
                 "caption": "A lost stamp.", "split": "train"})
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out / name, rows)
    return out / name


def stage_file(out: Path, manifest: Path, cache: Path, epochs: int, shipped: str = "image_text") -> Path:
    """A shipped stage, short (``epochs``, batches of 16, 2 warm-up steps), on this data."""
    text = (REPO / "stages" / f"{shipped}.toml").read_text()
    text = re.sub(r'(?m)^manifest = ".*"$', f'manifest = "{manifest}"', text)
    text = re.sub(r'(?m)^cache_dir = ".*"$', f'cache_dir = "{cache}"', text)
    text = re.sub(r"(?m)^epochs = \d+$", f"epochs = {epochs}", text)
    text = re.sub(r"(?m)^batch_size = \d+$", "batch_size = 16", text)
    text = re.sub(r"(?m)^warmup_steps = \d+$", "warmup_steps = 2", text)
    path = out / f"{shipped}.toml"
    path.write_text(text)
    return path


def _check(tally: Tally, done: subprocess.CompletedProcess, got: dict, want: dict, label: str,
           lost: int = 0) -> None:
    if done.returncode != 0:
        tally.failures.append(f"{label}: rerun exited {done.returncode}: {done.stderr.strip()[-300:]}")
        return
    tally.resumed += 1
    if got == want:
        tally.identical += 1
    else:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        tally.failures.append(f"{label}: differs in {diff}")
    tally.lost += lost


Kills = Union[list[int], Callable[[list[str]], list[int]], None]


def boundary_kills(kind: str, args: list[str], new_model: Callable[[str], Path], kills: Kills,
                   count: Path) -> tuple[Tally, int]:
    """Run ``args + [model]`` once to list its ``os.replace`` targets, then kill a fresh run after each
    chosen one and rerun it to the end, comparing with the uninterrupted result.

    ``kills``: the 1-based boundaries, a function choosing them from the targets, or None (all).
    """
    reference = new_model("reference")
    trace = count.with_suffix(".trace")
    trace.unlink(missing_ok=True)
    done = run_cli([*args, str(reference)], count_file=count, trace_file=trace)
    assert done.returncode == 0, done.stderr[-2000:]
    total = int(count.read_text())
    targets = [line.split(" ", 1)[1] for line in trace.read_text().splitlines()]
    want = fingerprint_model(reference)
    tally = Tally(f"{kind}, at file-write boundaries")
    chosen = kills(targets) if callable(kills) else kills
    for k in chosen if chosen is not None else range(1, total + 1):
        model = new_model(f"killed-{k}")
        first = run_cli([*args, str(model)], kill_at=k)
        if first.returncode != 137:
            tally.failures.append(f"boundary {k}: not killed (exit {first.returncode})")
            continue
        tally.kills += 1
        _check(tally, run_cli([*args, str(model)]), fingerprint_model(model), want, f"{kind} boundary {k}/{total}")
        shutil.rmtree(model)
    return tally, total


def train_boundaries(work: Path, stage: Path, kills: Kills = None) -> tuple[Tally, int]:
    """Kill ``train`` (Stage 1 into a new directory) at file-write boundaries; the reference is ``work/reference``."""
    return boundary_kills("train", ["train", "--stage", str(stage), "--model"], lambda name: work / name, kills,
                          work / "replace-count")


def add_modality_boundaries(work: Path, stage1_model: Path, stage: Path, manifest: Path, cache: Path,
                            kills: Kills = None) -> tuple[Tally, int]:
    """Kill ``add-modality audio`` on copies of a Stage-1 model at file-write boundaries.

    The caches are built first (by a run into a throwaway copy), so the boundaries counted are the
    stage's own: its resume states and the model-directory updates that add the audio adapter.
    """
    def copy_of_stage1(name: str) -> Path:
        model = work / f"add-{name}"
        shutil.copytree(stage1_model, model, ignore=shutil.ignore_patterns("runs"))
        return model

    args = ["add-modality", "audio", "--stage", str(stage), "--data", str(manifest), "--cache-dir", str(cache),
            "--workers", "0", "--model"]
    warm = copy_of_stage1("warm-up")
    done = run_cli([*args, str(warm)])
    assert done.returncode == 0, done.stderr[-2000:]
    shutil.rmtree(warm)
    return boundary_kills("add-modality", args, copy_of_stage1, kills, work / "add-replace-count")


def after_first_commit_point(targets: list[str]) -> list[int]:
    """The boundary just after the first model update's journal: committed, not yet renamed into place."""
    return [next(i for i, t in enumerate(targets, 1) if t.endswith(".commit.json"))]


def cache_timed_kills(work: Path, stage: Path, manifest: Path, kills: int, rng: random.Random) -> Tally:
    """SIGKILL ``cache build`` at ``kills`` random times while it writes; resume; compare.

    Each kill comes a random share of the reference build's writing time after the first
    write of the image cache, so it lands while samples are encoded and committed (image,
    then text) rather than during start-up; a run that still finishes first is retried.
    """
    args = ["cache", "build", "--stage", str(stage), "--manifest", str(manifest), "--workers", "2", "--cache-dir"]
    reference = work / "cache-reference"
    first_write = time.time()
    job = subprocess.Popen([sys.executable, "-c", _WRAPPER, *args, str(reference)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env=_env())
    while not (reference / "image" / "data.mdb").exists() and job.poll() is None:
        time.sleep(0.01)
        first_write = time.time()
    _, err = job.communicate()
    assert job.returncode == 0, err[-2000:]
    writing = time.time() - first_write
    want, want_ids = fingerprint_cache(reference), cached_ids(reference)
    tally = Tally("cache build, at random times")
    for attempt in range(2 * kills):
        if tally.kills == kills:
            break
        root = work / f"cache-killed-{attempt}"
        delay = rng.uniform(0.0, 0.9 * writing)
        if not run_killed_once_writing([*args, str(root)], root / "image" / "data.mdb", delay):
            shutil.rmtree(root)
            continue
        tally.kills += 1
        done = run_cli([*args, str(root)])
        _check(tally, done, fingerprint_cache(root), want, f"cache kill {delay:.1f} s after its first write",
               lost=len(want_ids - cached_ids(root)))
        shutil.rmtree(root)
    print(f"cache build: {writing:.1f} s of writing in the uninterrupted run")
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "faults")
    parser.add_argument("--cache-kills", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["cache", "train", "add-modality"], help="run one kind of kill only")
    args = parser.parse_args()
    work = args.out
    shutil.rmtree(work, ignore_errors=True)
    manifest = make_data(work / "data", {"train": 36, "val": 14, "test": 14})
    cache = work / "data" / "cache"
    stage = stage_file(work, manifest, cache, args.epochs)
    start = time.time()
    rng = random.Random(args.seed)
    tallies = []
    boundaries = {}
    if args.only in (None, "cache"):
        tallies.append(cache_timed_kills(work, stage, manifest, args.cache_kills, rng))
    if args.only != "cache":
        if not cache.exists():
            run_cli(["cache", "build", "--stage", str(stage), "--workers", "0"])
        # --only add-modality still needs the uninterrupted Stage-1 model (work/reference): no kills then.
        train_tally, boundaries["train"] = train_boundaries(work, stage, kills=None if args.only != "add-modality" else [])
        if args.only != "add-modality":
            tallies.append(train_tally)
    if args.only in (None, "add-modality"):
        sounds = make_data(work / "data", {"train": 24, "val": 8, "test": 8}, with_sound=True, name="audio.jsonl")
        audio_stage = stage_file(work, sounds, cache, args.epochs, shipped="audio")
        add_tally, boundaries["add-modality"] = add_modality_boundaries(work, work / "reference", audio_stage,
                                                                        sounds, cache)
        tallies.append(add_tally)
    for command, total in boundaries.items():
        print(f"{total} file-write boundaries in one {args.epochs}-epoch {command} run")
    print(f"{time.time() - start:.0f} s in all\n")
    print("| kills of | kills | reruns that resumed | byte-identical results | samples lost |")
    print("| --- | --- | --- | --- | --- |")
    for tally in tallies:
        print(tally.row())
    for tally in tallies:
        for failure in tally.failures:
            print(f"FAIL {tally.kind}: {failure}")
    sys.exit(1 if any(t.failures for t in tallies) else 0)


if __name__ == "__main__":
    main()
