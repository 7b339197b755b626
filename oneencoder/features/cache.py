"""LMDB feature cache: each frozen backbone runs once per sample, ever.

Layout of one cache root (``cache/``), per modality:

* ``<modality>/``: the LMDB environment, holding

  * ``__fingerprint__``: JSON of :meth:`Modality.fingerprint`. Opening a cache with
    another fingerprint is refused, so features of different backbones never mix.
  * ``f/<id>``: uint32 token count, then fp16 tokens ``[n, D]`` (padding is not stored).
  * ``m/<id>``: JSON difficulty measurements from :meth:`Modality.difficulty`.
  * ``k/<id>``: the input the entry was computed from (:func:`input_key`); a build
    re-encodes every entry whose input changed under the same id.

* ``<modality>.rejects.jsonl``: one row per rejected manifest entry, kept across builds.
* ``<modality>.lock``: held by the one process that writes the cache.
* ``shards/<i>-of-<n>/``: roots of the same layout, written by sharded builds and merged
  into this one by :func:`oneencoder.features.shards.merge_shards`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import lmdb
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from ..progress import progress_bar

from ..data.manifest import MAX_ID_BYTES, id_problem
from ..errors import CacheMismatchError, OneEncoderError, SampleError
from ..fileio import write_json_atomic, write_jsonl_atomic
from ..modality import Modality
from ..names import safe_name
from .runtime import check_runtime, runtime_fingerprint, with_runtime
from .workers import loader_options

try:
    import fcntl
except ImportError:  # not POSIX: builders are not serialised
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .shards import Shard

_FINGERPRINT = b"__fingerprint__"
_F, _M, _K = b"f/", b"m/", b"k/"
_MAP_SIZE = 1 << 36  # sparse on Linux; grows only as written


def _key(prefix: bytes, sid: str) -> bytes:
    """The LMDB key of ``sid`` under ``prefix``; an id LMDB cannot hold is a ``SampleError`` naming it.

    Valid ids encode as they always did (``prefix + UTF-8``), so existing caches stay readable.
    """
    try:
        key = prefix + sid.encode()
    except (AttributeError, UnicodeEncodeError):  # not a string, or a lone surrogate
        key = b""
    if not len(prefix) < len(key) <= len(prefix) + MAX_ID_BYTES:  # empty, unencodable or too long
        raise SampleError(id_problem(sid) or f"id {sid!r} cannot be a feature cache key")
    return key


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
            return set(_scan_keys(txn, _F))

    def __len__(self) -> int:
        with self.env.begin() as txn:
            return sum(1 for _ in _scan_keys(txn, _F))

    def inputs(self) -> dict[str, str | None]:
        """Every cached id with the input it was computed from (None: cached before inputs were recorded)."""
        with self.env.begin() as txn:
            recorded = {sid: bytes(value).decode("utf-8", "surrogateescape") for sid, value in _scan_items(txn, _K)}
            return {sid: recorded.get(sid) for sid in _scan_keys(txn, _F)}

    def put_many(self, items: list[tuple[str, torch.Tensor, dict[str, float]]],
                 inputs: Sequence[str] | None = None, drop: Iterable[str] = ()) -> None:
        """Write a batch of ``(id, tokens [n, D], measurements)`` in one transaction (resume point).

        Args:
            items: The entries to write.
            inputs: What each item was computed from (:func:`input_key`); None records nothing.
            drop: Ids whose entries are deleted in the same transaction (stale features).
        """
        for sid, tokens, _ in items:  # refused before anything is written: no mixed shapes or bad keys, ever
            _key(_F, sid)
            self._check_shape(sid, tokens)
        drop = [sid for sid in drop if id_problem(sid) is None]  # an id LMDB cannot hold was never stored
        with self._writing(), self.env.begin(write=True) as txn:
            for sid in drop:
                for prefix in (_F, _M, _K):
                    txn.delete(_key(prefix, sid))
            for i, (sid, tokens, measures) in enumerate(items):
                arr = tokens.detach().to(torch.float16).cpu().numpy()
                txn.put(_key(_F, sid), struct.pack("<I", arr.shape[0]) + arr.tobytes())
                txn.put(_key(_M, sid), json.dumps(measures).encode())
                if inputs is not None:
                    txn.put(_key(_K, sid), inputs[i].encode("utf-8", "surrogateescape"))  # a path of non-UTF-8 bytes
                else:  # a recorded input would now describe other features
                    txn.delete(_key(_K, sid))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed LMDB write (disk full, read-only file system) as one line naming the cache."""
        try:
            yield
        except lmdb.Error as e:
            full = isinstance(e, lmdb.MapFullError) or "space" in str(e).lower() or _nearly_full(self.path)
            what = f"no space left on {self.path}" if full else f"cannot write the feature cache {self.path}"
            raise OneEncoderError(f"{what} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                  "free space or pick another --cache-dir, then rerun to resume") from None

    def delete_many(self, ids: Iterable[str]) -> None:
        self.put_many([], drop=ids)

    def copy_from(self, other: "FeatureCache", chunk: int = 2048) -> list[str]:
        """Copy every entry of ``other`` byte for byte, committing every ``chunk`` ids; returns the ids."""
        with other.env.begin() as src:
            ids = list(_scan_keys(src, _F))
            for start in range(0, len(ids), chunk):
                with self._writing(), self.env.begin(write=True) as dst:
                    for sid in ids[start : start + chunk]:
                        for prefix in (_F, _M, _K):
                            value = src.get(prefix + sid.encode())
                            if value is None:
                                dst.delete(prefix + sid.encode())
                            else:
                                dst.put(prefix + sid.encode(), value)
        return ids

    def _check_shape(self, sid: str, tokens: torch.Tensor) -> None:
        limit = int(self.fingerprint.get("max_tokens", 0)) or None
        if tokens.ndim != 2 or tokens.shape[1] != self.dim or (limit and tokens.shape[0] > limit):
            raise CacheMismatchError(
                f"sample {sid!r}: the backbone gave features of shape {tuple(tokens.shape)}, but the cache "
                f"{self.path} is for at most {limit} tokens of width {self.dim} (its fingerprint); the modality's "
                "feature_dim/max_tokens disagree with its backbone")

    def get(self, sid: str) -> torch.Tensor:
        with self.env.begin() as txn:
            return self._decode(sid, txn.get(_key(_F, sid)))

    def get_many(self, ids: list[str]) -> list[torch.Tensor]:
        with self.env.begin() as txn:
            return [self._decode(sid, txn.get(_key(_F, sid))) for sid in ids]

    def measurements(self, ids: list[str]) -> list[dict[str, float]]:
        with self.env.begin() as txn:
            return [json.loads(txn.get(_key(_M, sid)) or b"{}") for sid in ids]

    def _decode(self, sid: str, raw: bytes | None) -> torch.Tensor:
        if raw is None:
            raise OneEncoderError(f"sample {sid!r} is not in the feature cache {self.path}")
        (n,) = struct.unpack("<I", raw[:4])
        arr = np.frombuffer(raw, dtype=np.float16, offset=4).reshape(n, self.dim)
        return torch.from_numpy(arr.copy())


def _nearly_full(path: Path) -> bool:
    """LMDB reports a full disk as an I/O error; the free space tells them apart."""
    try:
        return shutil.disk_usage(path).free < (64 << 20)
    except OSError:
        return False


def _scan_keys(txn: lmdb.Transaction, prefix: bytes) -> Iterator[str]:
    """Ids under ``prefix``, in key order, without reading the values."""
    cursor = txn.cursor()
    if cursor.set_range(prefix):
        for key in cursor.iternext(keys=True, values=False):
            if not key.startswith(prefix):
                return
            yield key[len(prefix):].decode()


def _scan_items(txn: lmdb.Transaction, prefix: bytes) -> Iterator[tuple[str, bytes]]:
    cursor = txn.cursor()
    if cursor.set_range(prefix):
        for key, value in cursor:
            if not key.startswith(prefix):
                return
            yield key[len(prefix):].decode(), value


def _check_fingerprint(path: Path, stored: dict, expected: dict) -> None:
    diffs = [k for k in sorted(set(stored) | set(expected)) if stored.get(k) != expected.get(k)]
    if diffs:
        k = diffs[0]
        raise CacheMismatchError(
            f"feature cache {path} was built with {k}={stored.get(k)!r} but this run uses "
            f"{k}={expected.get(k)!r}; use another --cache-dir or delete {path} to rebuild"
        )


def cache_dir_for(root: str | Path, modality: str) -> Path:
    """``<root>/<modality>``; the modality name must be a safe single path component."""
    return Path(root) / safe_name(modality, "modality name")


def rejects_path(root: str | Path, modality: str) -> Path:
    return Path(root) / f"{modality}.rejects.jsonl"


def input_key(modality: Modality, value: Any) -> str:
    """What a cached entry is computed from; an entry whose key changed is re-encoded.

    A file is keyed by its resolved path, size and modification time (ns): one ``stat``
    per sample, the quick check of make and rsync. A content hash would read the whole
    data set on every build just to find nothing changed; the price is that an edit which
    keeps both size and mtime goes unseen, and a ``touch`` re-encodes. Any other value
    (a caption, a SMILES string) is keyed by the sha256 of the value itself.
    """
    if modality.spec.reads_files and isinstance(value, (str, os.PathLike)):
        path = os.path.realpath(value)
        try:
            st = os.stat(path)
        except OSError:
            return f"file:{path}:missing"
        return f"file:{path}:{st.st_size}:{st.st_mtime_ns}"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@contextlib.contextmanager
def cache_lock(path: str | Path, shared: bool = False, *, busy: Callable[[str], str] | None = None,
               unwritable: Callable[[OSError], str] | None = None) -> Iterator[None]:
    """Hold ``<cache>.lock``: exclusive to write the cache, shared to read it while shards build.

    A second writer stops with one line naming the cache, instead of encoding the same
    samples twice and overwriting the other's rejects file. The kernel drops the lock
    when its process dies, so a killed build never leaves the cache locked.

    Args:
        busy: The refusal for another folder guarded the same way (a model directory):
            gets the holder's process id ("" if unknown), returns the one-line message.
        unwritable: Its message when the lock file cannot be created.
    """
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        if unwritable is not None:
            raise OneEncoderError(unwritable(e)) from None
        raise OneEncoderError(f"cannot write the feature cache {path}: {e.strerror} ({e.filename}); "
                              "pick a writable --cache-dir") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                if busy is not None:
                    raise OneEncoderError(busy(holder)) from None
                who = f" (process {holder})" if holder else ""
                raise OneEncoderError(f"another `oneencoder cache` command{who} is writing the feature cache "
                                      f"{path}; wait for it to finish, then rerun") from None
            if not shared:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
        if fcntl is not None and not shared:
            os.ftruncate(fd, 0)  # no stale process id for the next refusal to name
    finally:
        os.close(fd)  # releases the lock


def read_rejects(path: str | Path) -> dict[str, dict]:
    """Rows of a rejects file by sample id ({} if there is none)."""
    path = Path(path)
    if not path.exists():
        return {}
    rows: dict[str, dict] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[str(row["id"])] = row
        except (ValueError, KeyError, TypeError):  # ValueError covers bad JSON and bad UTF-8
            raise OneEncoderError(f"{path}:{lineno}: not a rejects row; delete {path} and rebuild to list "
                                  "the rejects again") from None
    return rows


def update_rejects(path: str | Path, seen: Iterable[str], rejects: dict[str, dict]) -> int:
    """Replace the rows of the ids ``seen`` by ``rejects``; rows of other manifests' ids stay.

    Returns:
        How many rows the file holds now.
    """
    rows = read_rejects(path)
    for sid in seen:
        rows.pop(sid, None)
    rows.update(rejects)
    write_jsonl_atomic(path, [rows[sid] for sid in sorted(rows)])
    return len(rows)


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


class _Collate:
    """Runs in the workers too: one batch tensor crosses to the main process (and can be pinned)."""

    def __init__(self, modality: Modality) -> None:
        self.modality = modality

    def __call__(self, samples: list) -> tuple[list[str], list[Any], Any, dict[str, str]]:
        good = [s for s in samples if s[3] is None]
        rejects = {s[0]: s[3] for s in samples if s[3] is not None}
        batch = self.modality.collate([s[2] for s in good]) if good else None
        return [s[0] for s in good], [s[1] for s in good], batch, rejects


@dataclass
class BuildReport:
    """What a cache build did; ``rejects`` maps sample id to reason.

    ``changed`` entries had another input recorded (an edited caption, a replaced file),
    ``unrecorded`` ones none (a cache from before inputs were recorded): both were
    re-encoded and are counted in ``encoded`` too. ``dropped`` stale entries were deleted
    because their new input is rejected.
    """

    modality: str
    total: int
    cached_before: int
    encoded: int
    rejects: dict[str, str] = field(default_factory=dict)
    changed: int = 0
    unrecorded: int = 0
    dropped: int = 0

    def summary(self) -> str:
        notes = [f"{self.changed} changed, re-encoded"] if self.changed else []
        if self.unrecorded:
            notes.append(f"{self.unrecorded} without a recorded input, re-encoded")
        line = (f"{self.modality}: {self.total} samples, {self.cached_before} already cached, "
                f"{self.encoded} encoded" + (f" ({'; '.join(notes)})" if notes else ""))
        line += f", {len(self.rejects)} rejected"
        if self.dropped:
            line += f" ({self.dropped} stale {'entry' if self.dropped == 1 else 'entries'} removed)"
        return line


_ABSENT = object()


@dataclass
class _Plan:
    """What a build compares: each record's input now, and what was cached for it before."""

    want: dict[str, str]  # id -> input_key of the record
    before: dict[str, Any]  # id -> recorded input, None (not recorded) or _ABSENT (not cached)
    own: set[str]  # ids cached in the cache being written (a shard's own, not the merged one's)

    def stale(self, sid: str) -> bool:
        return self.before[sid] != self.want[sid]


def build_cache(
    modality: Modality,
    records: list[dict],
    cache_root: str | Path,
    key: str | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    shard: "Shard | None" = None,
    runtime: str = "torch",
    precision: str = "fp32",
    log: Callable[[str], None] | None = None,
) -> BuildReport:
    """Encode every record whose features are missing or stale; bad samples go to the rejects file.

    An entry is stale when the input it was computed from (:func:`input_key`) is not the
    record's any more, e.g. a caption edited or a file replaced under the same id.
    Interrupted builds resume: finished batches are committed and skipped next time.

    Args:
        shard: Encode only this shard's records, into its own root under ``cache_root``
            (:meth:`Shard.root`); records already up to date in the merged cache are skipped.
        runtime: ``torch``, ``onnx`` or ``auto`` (:mod:`oneencoder.features.runtime`); exported
            graphs and measured choices are kept under ``cache_root``.
        precision: ``fp32`` or ``bf16``; bf16 is part of the fingerprint (its features are not fp32's).
        log: Gets the runtime's one-line notes (the path chosen, its parity).

    Raises:
        OneEncoderError: Another process is writing the same cache.
        CacheMismatchError: The cache was built with another fingerprint.
    """
    key = key or modality.spec.record_key
    name = modality.spec.name
    # A sample without this modality (field absent or null) is not a bad sample, just not ours;
    # a present but empty value is a reject.
    records = [r for r in records if r.get(key) is not None]
    if shard is not None:
        records = [r for r in records if shard.owns(r["id"])]
    # An id LMDB cannot key (too long, a lone surrogate) is that sample's reject, not the build's end.
    unkeyable = {str(r["id"]): (why, input_key(modality, r[key])) for r in records
                 if (why := id_problem(r["id"])) is not None}
    records = [r for r in records if str(r["id"]) not in unkeyable]
    root = Path(cache_root) if shard is None else shard.root(cache_root)
    check_runtime(runtime, precision)
    fingerprint = runtime_fingerprint(modality, precision)
    with cache_lock(cache_dir_for(root, name)):
        if shard is not None:
            shard.done_path(cache_root, name).unlink(missing_ok=True)
        with FeatureCache(cache_dir_for(root, name), fingerprint) as cache:
            own = cache.inputs()
            merged = _merged_inputs(cache_root, name, fingerprint) if shard is not None else {}
            want = {r["id"]: input_key(modality, r[key]) for r in records}
            plan = _Plan(want, {sid: own[sid] if sid in own else merged.get(sid, _ABSENT) for sid in want}, set(own))
            todo = [r for r in records if plan.stale(r["id"])]
            report = BuildReport(name, len(records) + len(unkeyable), len(records) - len(todo), 0,
                                 {sid: why for sid, (why, _) in unkeyable.items()})
            if todo:
                backbone = with_runtime(modality, modality.load_backbone().to(device), runtime, precision,
                                        cache_root, log)
                _encode(modality, backbone, todo, key, plan, cache, report, batch_size, num_workers, device, progress)
        want.update({sid: given for sid, (_, given) in unkeyable.items()})
        rows = {sid: {"id": sid, "modality": name, "reason": why, "input": want[sid]}
                for sid, why in report.rejects.items()}
        update_rejects(rejects_path(root, name), want, rows)
        if shard is not None:  # merge_shards takes only finished shards
            write_json_atomic(shard.done_path(cache_root, name),
                              {"shard": str(shard), "summary": report.summary(), "fingerprint": fingerprint})
    return report


def _encode(modality: Modality, backbone: torch.nn.Module, todo: list[dict], key: str, plan: _Plan,
            cache: FeatureCache, report: BuildReport, batch_size: int, num_workers: int,
            device: str | torch.device, progress: bool) -> None:
    """The DataLoader loop of :func:`build_cache`: decode in workers, encode here, commit per batch."""
    loader = DataLoader(_SampleDataset(modality, todo, key), batch_size=batch_size, collate_fn=_Collate(modality),
                        **loader_options(num_workers, device))
    with progress_bar(total=len(todo), desc=f"cache {modality.spec.name}", unit="sample", enabled=progress) as bar:
        for ids, raws, batch, rejects in loader:
            report.rejects.update(rejects)
            rows = []
            if ids:
                tokens, mask = modality.encode(backbone, batch)
                for sid, raw, tok, m in zip(ids, raws, tokens, mask):
                    valid = tok[m]
                    rows.append((sid, valid, modality.difficulty(raw, valid)))
            stale = [sid for sid in rejects if sid in plan.own]  # never keep features of an input now rejected
            cache.put_many(rows, [plan.want[sid] for sid in ids], drop=stale)
            report.encoded += len(rows)
            report.dropped += len(stale)
            report.changed += sum(1 for sid in ids if plan.before[sid] not in (_ABSENT, None))
            report.unrecorded += sum(1 for sid in ids if plan.before[sid] is None)
            bar.update(len(ids) + len(rejects))


def _merged_inputs(cache_root: str | Path, name: str, fingerprint: dict[str, Any]) -> dict[str, str | None]:
    """Inputs of the merged cache a shard belongs to, read under a shared lock ({} if none yet)."""
    path = cache_dir_for(cache_root, name)
    if not (path / "data.mdb").exists():
        return {}
    with cache_lock(path, shared=True), FeatureCache(path, fingerprint, readonly=True) as merged:
        return merged.inputs()
