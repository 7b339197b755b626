"""LMDB feature cache: each frozen backbone runs once per sample, ever.

Layout of one cache (a directory per modality, e.g. ``cache/image/``):

* ``__fingerprint__``: JSON of :meth:`Modality.fingerprint`. Opening a cache with
  another fingerprint is refused, so features of different backbones never mix.
* ``f/<id>``: uint32 token count, then fp16 tokens ``[n, D]`` (padding is not stored).
* ``m/<id>``: JSON difficulty measurements from :meth:`Modality.difficulty`.

Rejected samples are listed in ``<modality>.rejects.jsonl`` beside the cache.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .errors import CacheMismatchError, OneEncoderError, SampleError
from .fileio import write_jsonl_atomic
from .modality import Modality

_FINGERPRINT = b"__fingerprint__"
_MAP_SIZE = 1 << 36  # sparse on Linux; grows only as written


class FeatureCache:
    """One modality's fingerprinted token features.

    Args:
        path: Cache directory (created if missing).
        fingerprint: Expected fingerprint; a stored, different one raises ``CacheMismatchError``.
        readonly: Open without write access (training and evaluation).
    """

    def __init__(self, path: str | Path, fingerprint: dict[str, Any], readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly and not (self.path / "data.mdb").exists():
            raise OneEncoderError(f"no feature cache at {self.path}; build it with `oneencoder cache build`")
        self.path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(self.path), map_size=_MAP_SIZE, readonly=readonly, lock=not readonly,
                             subdir=True, max_readers=64)
        self.fingerprint = fingerprint
        self.dim = int(fingerprint["feature_dim"])
        try:
            with self.env.begin(write=not readonly) as txn:
                stored = txn.get(_FINGERPRINT)
                if stored is None:
                    if readonly:
                        raise OneEncoderError(f"feature cache {self.path} has no fingerprint; rebuild it")
                    txn.put(_FINGERPRINT, json.dumps(fingerprint, sort_keys=True).encode())
                else:
                    _check_fingerprint(self.path, json.loads(stored), fingerprint)
        except BaseException:
            self.env.close()  # a refused cache must not stay open in this process
            raise

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ids(self) -> set[str]:
        with self.env.begin() as txn:
            return {k[2:].decode() for k, _ in txn.cursor() if k.startswith(b"f/")}

    def __len__(self) -> int:
        return len(self.ids())

    def put_many(self, items: list[tuple[str, torch.Tensor, dict[str, float]]]) -> None:
        """Write a batch of ``(id, tokens [n, D], measurements)`` in one transaction (resume point)."""
        for sid, tokens, _ in items:  # refused before anything is written: no mixed shapes, ever
            self._check_shape(sid, tokens)
        with self.env.begin(write=True) as txn:
            for sid, tokens, measures in items:
                arr = tokens.detach().to(torch.float16).cpu().numpy()
                txn.put(b"f/" + sid.encode(), struct.pack("<I", arr.shape[0]) + arr.tobytes())
                txn.put(b"m/" + sid.encode(), json.dumps(measures).encode())

    def _check_shape(self, sid: str, tokens: torch.Tensor) -> None:
        limit = int(self.fingerprint.get("max_tokens", 0)) or None
        if tokens.ndim != 2 or tokens.shape[1] != self.dim or (limit and tokens.shape[0] > limit):
            raise CacheMismatchError(
                f"sample {sid!r}: the backbone gave features of shape {tuple(tokens.shape)}, but the cache "
                f"{self.path} is for at most {limit} tokens of width {self.dim} (its fingerprint); the modality's "
                "feature_dim/max_tokens disagree with its backbone")

    def get(self, sid: str) -> torch.Tensor:
        with self.env.begin() as txn:
            return self._decode(sid, txn.get(b"f/" + sid.encode()))

    def get_many(self, ids: list[str]) -> list[torch.Tensor]:
        with self.env.begin() as txn:
            return [self._decode(sid, txn.get(b"f/" + sid.encode())) for sid in ids]

    def measurements(self, ids: list[str]) -> list[dict[str, float]]:
        with self.env.begin() as txn:
            return [json.loads(txn.get(b"m/" + sid.encode()) or b"{}") for sid in ids]

    def _decode(self, sid: str, raw: bytes | None) -> torch.Tensor:
        if raw is None:
            raise OneEncoderError(f"sample {sid!r} is not in the feature cache {self.path}")
        (n,) = struct.unpack("<I", raw[:4])
        arr = np.frombuffer(raw, dtype=np.float16, offset=4).reshape(n, self.dim)
        return torch.from_numpy(arr.copy())


def _check_fingerprint(path: Path, stored: dict, expected: dict) -> None:
    diffs = [k for k in sorted(set(stored) | set(expected)) if stored.get(k) != expected.get(k)]
    if diffs:
        k = diffs[0]
        raise CacheMismatchError(
            f"feature cache {path} was built with {k}={stored.get(k)!r} but this run uses "
            f"{k}={expected.get(k)!r}; use another --cache-dir or delete {path} to rebuild"
        )


def cache_dir_for(root: str | Path, modality: str) -> Path:
    return Path(root) / modality


def rejects_path(root: str | Path, modality: str) -> Path:
    return Path(root) / f"{modality}.rejects.jsonl"


# ----- building -----------------------------------------------------------------


class _SampleDataset(Dataset):
    """Loads and preprocesses in DataLoader workers; a bad sample comes back as its reason."""

    def __init__(self, modality: Modality, records: list[dict], key: str) -> None:
        self.modality, self.records, self.key = modality, records, key

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[str, Any, Any, str | None]:
        rec = self.records[i]
        try:
            if rec.get(self.key) in (None, ""):
                raise SampleError(f"no {self.key!r} field" if self.key not in rec else f"empty {self.key!r}")
            raw, item = self.modality.prepare(rec[self.key])
            return rec["id"], raw, item, None
        except SampleError as e:
            return rec["id"], None, None, str(e)
        except Exception as e:  # any decoder failure is this sample's problem, not the job's
            return rec["id"], None, None, f"{type(e).__name__}: {e}"


def _collate_keep_all(items: list) -> list:
    return items


@dataclass
class BuildReport:
    """What a cache build did; ``rejects`` maps sample id to reason."""

    modality: str
    total: int
    cached_before: int
    encoded: int
    rejects: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.modality}: {self.total} samples, {self.cached_before} already cached, "
                f"{self.encoded} encoded, {len(self.rejects)} rejected")


def build_cache(
    modality: Modality,
    records: list[dict],
    cache_root: str | Path,
    key: str | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> BuildReport:
    """Encode every record not yet cached; bad samples go to the rejects file.

    Interrupted builds resume: finished batches are committed and skipped next time.
    """
    key = key or modality.spec.record_key
    root = Path(cache_root)
    cache = FeatureCache(cache_dir_for(root, modality.spec.name), modality.fingerprint())
    try:
        done = cache.ids()
        # A sample without this modality (field absent or null) is not a bad sample, just not ours;
        # a present but empty value is a reject.
        records = [r for r in records if r.get(key) is not None]
        todo = [r for r in records if r["id"] not in done]
        report = BuildReport(modality.spec.name, len(records), len(records) - len(todo), 0)
        if todo:
            backbone = modality.load_backbone().to(device)
            loader = DataLoader(_SampleDataset(modality, todo, key), batch_size=batch_size,
                                num_workers=num_workers, collate_fn=_collate_keep_all)
            bar = tqdm(total=len(todo), desc=f"cache {modality.spec.name}", unit="sample", disable=not progress)
            for items in loader:
                good = [it for it in items if it[3] is None]
                for sid, _, _, reason in items:
                    if reason is not None:
                        report.rejects[sid] = reason
                if good:
                    tokens, mask = modality.featurize(backbone, [it[2] for it in good])
                    rows = []
                    for (sid, raw, _, _), tok, m in zip(good, tokens, mask):
                        valid = tok[m]
                        rows.append((sid, valid, modality.difficulty(raw, valid)))
                    cache.put_many(rows)
                    report.encoded += len(rows)
                bar.update(len(items))
            bar.close()
        rejects = [{"id": sid, "modality": modality.spec.name, "reason": why} for sid, why in report.rejects.items()]
        write_jsonl_atomic(rejects_path(root, modality.spec.name), rejects)
        return report
    finally:
        cache.close()

