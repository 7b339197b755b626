"""Session fixtures shared by the whole suite.

Expensive things happen once per session:

* each real frozen backbone (MiniLM text, EfficientNet-Lite0 image) is loaded once:
  ``load_backbone`` of the built-in modalities is wrapped in a memo keyed by the
  modality's options, so ``build_cache``, the API and the CLI (which all call
  ``load_backbone`` themselves) reuse the one real, frozen module instead of
  reloading it. Nothing is faked: the first call runs the real loader.
* one small real Tux Paint manifest (64 stamps, every split present),
* one feature cache of it (both modalities, the shipped stage file's options),
* one short Stage-1 training run on it.

Everything is written under pytest's temporary directories, never into the repo.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import tomllib  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterator  # noqa: E402

import pytest  # noqa: E402

from oneencoder.data.sources.tuxpaint import tuxpaint_records  # noqa: E402
from oneencoder.features.cache import build_cache  # noqa: E402
from oneencoder.fileio import write_jsonl_atomic  # noqa: E402
from oneencoder.modality import Modality, create_modality  # noqa: E402
from oneencoder.training.config import StageConfig, parse_stage  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAGE_FILE = REPO / "stages" / "image_text.toml"
STAMPS_ROOT = Path("/usr/share/tuxpaint/stamps")

# How many stamps of each split the small manifest takes (64 in all, each split >= 12).
SMALL_QUOTA = {"train": 36, "val": 14, "test": 14}


# ----- real data --------------------------------------------------------------------


@pytest.fixture(scope="session")
def stamps() -> list[dict]:
    """Every installed Tux Paint stamp as a manifest record (sorted by id)."""
    if not STAMPS_ROOT.is_dir():
        pytest.skip(f"Tux Paint stamps are not installed at {STAMPS_ROOT}")
    return tuxpaint_records()


def select_small(records: list[dict], quota: dict[str, int] = SMALL_QUOTA) -> list[dict]:
    """Deterministic subset: in id order, the first ``quota[split]`` stamps of each split."""
    taken = {split: 0 for split in quota}
    out = []
    for rec in sorted(records, key=lambda r: r["id"]):
        split = rec["split"]
        if rec["caption"] and taken.get(split, 0) < quota.get(split, 0):
            out.append(dict(rec))
            taken[split] += 1
    return out


@pytest.fixture(scope="session")
def small_records(stamps: list[dict]) -> list[dict]:
    records = select_small(stamps)
    assert len(records) == sum(SMALL_QUOTA.values())
    return records


@pytest.fixture(scope="session")
def small_manifest(small_records: list[dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a JSONL manifest with 64 real stamps (train, val and test)."""
    path = tmp_path_factory.mktemp("data") / "manifest.jsonl"
    write_jsonl_atomic(path, small_records)
    return path


def make_bad_records(folder: Path, good: dict) -> list[dict]:
    """Three broken samples: a corrupt PNG, a missing image file and an empty caption."""
    folder.mkdir(parents=True, exist_ok=True)
    corrupt = folder / "x.png"
    corrupt.write_bytes(random.Random(0).randbytes(2048))
    base = {"category": "bad", "sound": None, "split": "train"}
    return [
        {**base, "id": "bad/corrupt-png", "image": str(corrupt), "caption": "A corrupt picture.",
         "group": "bad-corrupt"},
        {**base, "id": "bad/missing-file", "image": str(folder / "does-not-exist.png"),
         "caption": "A missing picture.", "group": "bad-missing"},
        {**base, "id": "bad/empty-caption", "image": good["image"], "caption": "", "group": "bad-empty"},
    ]


# Which modality rejects each bad sample, and a fragment of the reason it must give.
BAD_EXPECTED = {
    "bad/corrupt-png": ("image", "cannot decode"),
    "bad/missing-file": ("image", "not found"),
    "bad/empty-caption": ("text", "empty"),
}


@pytest.fixture(scope="session")
def bad_records(small_records: list[dict], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return make_bad_records(tmp_path_factory.mktemp("bad"), small_records[0])


@pytest.fixture(scope="session")
def bad_expected() -> dict[str, tuple[str, str]]:
    """``{bad id: (modality that rejects it, reason fragment)}`` for ``bad_records``."""
    return dict(BAD_EXPECTED)


# ----- stage file and modalities ------------------------------------------------------


@pytest.fixture(scope="session")
def stage_raw() -> dict[str, Any]:
    """The shipped stage file, parsed as TOML (the source of every option used here)."""
    return tomllib.loads(STAGE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def make_config(stage_raw: dict[str, Any]) -> Callable[..., StageConfig]:
    """Factory: the shipped stage with data paths and small, quick training settings.

    ``make_config(manifest, cache_dir, epochs=5, ...)``: keyword overrides go to
    ``[train]``; ``sections={"model": {...}}`` overrides other sections.
    """

    def factory(manifest: Path, cache_dir: Path, sections: dict[str, dict] | None = None,
                **train: Any) -> StageConfig:
        raw = json.loads(json.dumps(stage_raw))  # deep copy
        raw["data"] = {"manifest": str(manifest), "cache_dir": str(cache_dir)}
        raw["train"].update({"epochs": 3, "batch_size": 16, "warmup_steps": 2, "patience": 100,
                             "device": "cpu", "eval_batch_size": 64, **train})
        for section, values in (sections or {}).items():
            raw.setdefault(section, {}).update(values)
        return parse_stage(raw, str(STAGE_FILE))

    return factory


@pytest.fixture(scope="session")
def stage_options(stage_raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: dict(opts) for name, opts in stage_raw.get("modalities", {}).items()}


@pytest.fixture(scope="session")
def stage_modalities(stage_raw: dict[str, Any], stage_options: dict[str, dict]) -> dict[str, Modality]:
    """The stage's two modalities, created with the stage file's options."""
    return {name: create_modality(name, **stage_options.get(name, {})) for name in stage_raw["stage"]["modalities"]}


@pytest.fixture(scope="session")
def text_modality(stage_modalities: dict[str, Modality]) -> Modality:
    return stage_modalities["text"]


@pytest.fixture(scope="session")
def image_modality(stage_modalities: dict[str, Modality]) -> Modality:
    return stage_modalities["image"]


# ----- backbones, loaded once per session ----------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _backbones_once() -> Any:
    """Make every ``load_backbone`` of a built-in modality load the real weights at most once."""
    from oneencoder.modalities.image import ImageModality
    from oneencoder.modalities.text import TextModality

    memo: dict[tuple[str, str], Any] = {}
    patch = pytest.MonkeyPatch()
    for cls in (TextModality, ImageModality):
        original = cls.load_backbone

        def load_once(self: Modality, _original: Callable = original) -> Any:
            key = (_original.__qualname__, json.dumps(self.options, sort_keys=True))
            if key not in memo:
                memo[key] = _original(self)
            return memo[key]

        patch.setattr(cls, "load_backbone", load_once)
    yield memo
    patch.undo()


@pytest.fixture(scope="session")
def text_backbone(text_modality: Modality) -> Any:
    return text_modality.load_backbone()


@pytest.fixture(scope="session")
def image_backbone(image_modality: Modality) -> Any:
    return image_modality.load_backbone()


# ----- cache and trained model ---------------------------------------------------------


@pytest.fixture(scope="session")
def small_cache(small_records: list[dict], stage_modalities: dict[str, Modality],
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Feature cache root of the small manifest, both modalities, built once."""
    root = tmp_path_factory.mktemp("cache")
    for modality in stage_modalities.values():
        report = build_cache(modality, small_records, root, batch_size=32, num_workers=0, progress=False)
        assert report.encoded == len(small_records) and not report.rejects, report.summary()
    return root


@pytest.fixture(scope="session")
def trained_model(small_manifest: Path, small_cache: Path, make_config: Callable[..., StageConfig],
                  tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One short Stage-1 run on the small data: ``{"dir", "summary", "config"}``."""
    from oneencoder.training.stage import run_stage

    config = make_config(small_manifest, small_cache, epochs=3)
    model_dir = tmp_path_factory.mktemp("trained") / "model"
    summary = run_stage(config, model_dir, progress=False)
    return {"dir": model_dir, "summary": summary, "config": config}


# ----- serve ------------------------------------------------------------------------


@contextlib.contextmanager
def _serve_in_thread(app: Any, stop_timeout: float = 20.0) -> Iterator[int]:
    """Run a ``serve`` app on a free 127.0.0.1 port in a thread; yield the port, stop on exit."""
    from oneencoder.apps.serve import bind, server

    sock = bind("127.0.0.1", 0)
    srv = server(app)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start within 30 s"
    try:
        yield sock.getsockname()[1]
    finally:
        srv.should_exit = True
        thread.join(timeout=stop_timeout)


@pytest.fixture(scope="session")
def serve_in_thread() -> Callable[..., contextlib.AbstractContextManager[int]]:
    """``with serve_in_thread(app) as port:`` serves ``app`` on 127.0.0.1 for the block."""
    return _serve_in_thread
