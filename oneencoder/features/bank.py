"""Feature banks: a cache's features for a fixed, ordered list of ids, gathered by index for training.

* ``FeatureBank``: the whole cache loaded into memory as padded fp16 ``[N, T, D]``,
  in GPU memory when training on CUDA (no host-device copy per step).
* ``DiskFeatureBank``: for banks that do not fit. The cache's entries are exported
  once into a numpy memory map next to the cache, and each batch is read from it
  (the OS page cache keeps the hot part in RAM); only the batch moves to the device.

Both have the same interface (:class:`Bank`): ``len(bank)``, ``bank.dim`` and
``bank.gather(index) -> (tokens [B, T_b, D] float32, mask [B, T_b])``, with equal
results. :func:`load_banks` picks one by the stage option ``[train] bank``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..errors import ConfigError, OneEncoderError
from ..fileio import atomic_path, sha256_text, write_json_atomic
from .cache import FeatureCache

BANK_KINDS = ("auto", "memory", "disk")
# ``auto`` keeps a split in memory while its padded banks take at most this share of the
# available memory: loading briefly holds the decoded samples and the padded bank together.
MEMORY_SHARE = 1 / 3
_EXPORT_FORMAT = 1
_EXPORT_BLOCK = 4096  # samples read from the LMDB per transaction while exporting


class Bank(Protocol):
    """What training and evaluation need of a bank."""

    def __len__(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class FeatureBank:
    """Padded fp16 tokens ``[N, T, D]`` and lengths for a fixed, ordered list of ids.

    Args:
        tokens: List of ``[n_i, D]`` tensors.
        device: Where the bank lives (GPU memory on CUDA: no host-device copies per step).
    """

    def __init__(self, tokens: list[torch.Tensor], device: str | torch.device = "cpu") -> None:
        if not tokens:
            raise ValueError("FeatureBank needs at least one sample")
        width = max(t.shape[0] for t in tokens)
        dim = tokens[0].shape[1]
        data = torch.zeros(len(tokens), width, dim, dtype=torch.float16)
        lengths = torch.empty(len(tokens), dtype=torch.long)
        for i, t in enumerate(tokens):
            data[i, : t.shape[0]] = t
            lengths[i] = t.shape[0]
        self.data = data.to(device)
        self.lengths = lengths.to(device)

    @classmethod
    def from_padded(cls, data: torch.Tensor, lengths: torch.Tensor | None = None,
                    device: str | torch.device = "cpu") -> "FeatureBank":
        """A bank over features already padded: ``data [N, T, D]`` (stored fp16), ``lengths [N]``
        (default: all T), without a per-sample list (e.g. 10^6 synthetic samples). Entries past
        a sample's length are zeroed."""
        if data.dim() != 3 or data.shape[0] == 0:
            raise ValueError(f"data must be a non-empty [N, T, D] tensor, got {tuple(data.shape)}")
        lengths = torch.full((data.shape[0],), data.shape[1]) if lengths is None else lengths
        if lengths.shape != (data.shape[0],) or int(lengths.max()) > data.shape[1] or int(lengths.min()) < 0:
            raise ValueError(f"lengths must be [N] = [{data.shape[0]}] values in 0..{data.shape[1]}")
        if int(lengths.min()) < data.shape[1]:  # padding must read as zeros, as in the list constructor
            real = torch.arange(data.shape[1], device=data.device) < lengths.to(data.device)[:, None]
            data = data.masked_fill(~real[..., None], 0)
        bank = cls.__new__(cls)  # the list constructor's work is already done
        bank.data = data.to(device=device, dtype=torch.float16)
        bank.lengths = lengths.to(device=device, dtype=torch.long)
        return bank

    @classmethod
    def from_cache(cls, cache: FeatureCache, ids: list[str], device: str | torch.device = "cpu") -> "FeatureBank":
        return cls(cache.get_many(ids), device)

    @classmethod
    def open(cls, path: str | Path, fingerprint: dict, ids: list[str], device: str | torch.device = "cpu") -> "FeatureBank":
        with FeatureCache(path, fingerprint, readonly=True) as cache:
            return cls.from_cache(cache, ids, device)

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def dim(self) -> int:
        return self.data.shape[2]

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``[B, T_b, D]`` (float32) and mask ``[B, T_b]``, trimmed to the batch's longest."""
        index = index.to(self.data.device)
        lengths = self.lengths[index]
        width = int(lengths.max())
        tokens = self.data[index, :width].float()
        mask = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
        return tokens, mask


# ----- past RAM: a memory-mapped export of the cache ------------------------------------


def export_dir(cache: FeatureCache, ids: list[str]) -> Path:
    """Where the export of these ids lives: beside the cache, named by its fingerprint and the id list."""
    key = sha256_text(json.dumps({"fingerprint": cache.fingerprint, "ids": ids}, sort_keys=True))[:16]
    return cache.path.parent / f"{cache.path.name}.export" / key


def _source_state(cache: FeatureCache) -> dict:
    """What changes whenever the cache is written: LMDB's last transaction id and its data files."""
    files = {str(p.relative_to(cache.path)): [p.stat().st_size, p.stat().st_mtime_ns]
             for p in sorted(cache.path.rglob("data.mdb"))}
    env = getattr(cache, "env", None)
    info = env.info() if env is not None else {}
    return {"last_txnid": info.get("last_txnid"), "files": files}


def export_features(cache: FeatureCache, ids: list[str]) -> Path:
    """Export the cache's tokens of ``ids`` once, as a memory map; return its directory.

    Layout: ``tokens.f16`` (raw fp16 rows, every sample's tokens one after another,
    ``[sum n_i, D]``), ``offsets.npy`` (int64 ``[N + 1]``: sample i is rows
    ``offsets[i]:offsets[i+1]``) and ``meta.json``, written last. An export is reused
    only if its ``meta.json`` records the cache's current state (transaction id and data
    file size/mtime), so one made before the cache changed is rebuilt, never read.
    Every file is written atomically; a crash leaves no ``meta.json``, hence a rebuild.
    """
    directory = export_dir(cache, ids)
    meta_path = directory / "meta.json"
    state = _source_state(cache)
    if meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") == _EXPORT_FORMAT and meta.get("source") == state and meta.get("n") == len(ids):
            return directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)  # from here on the old export, if any, is stale
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        with atomic_path(directory / "tokens.f16") as tmp, open(tmp, "wb") as f:
            for start in range(0, len(ids), _EXPORT_BLOCK):
                for i, tokens in enumerate(cache.get_many(ids[start : start + _EXPORT_BLOCK]), start):
                    f.write(tokens.to(torch.float16).numpy().tobytes())
                    offsets[i + 1] = offsets[i] + tokens.shape[0]
        with atomic_path(directory / "offsets.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, offsets)
    except OSError as e:
        raise OneEncoderError(f"cannot write the disk bank export {directory} ({e.strerror}); make the cache's "
                              "folder writable or use [train] bank = \"memory\"") from None
    write_json_atomic(meta_path, {"format": _EXPORT_FORMAT, "n": len(ids), "dim": cache.dim,
                                  "rows": int(offsets[-1]), "source": state, "fingerprint": cache.fingerprint})
    return directory


class DiskFeatureBank:
    """A bank read from a memory-mapped export of a cache (:func:`export_features`).

    Only the gathered batch is read, converted to float32 and moved to ``device``.

    Args:
        directory: An export directory.
        device: Where gathered batches go.
    """

    def __init__(self, directory: str | Path, device: str | torch.device = "cpu") -> None:
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        self.offsets = np.load(directory / "offsets.npy")
        if len(self.offsets) < 2:
            raise ValueError("DiskFeatureBank needs at least one sample")
        self._dim, rows = int(meta["dim"]), int(meta["rows"])
        # An empty file cannot be mapped; a bank of zero-token samples has no rows to read.
        self.tokens = (np.memmap(directory / "tokens.f16", dtype=np.float16, mode="r", shape=(rows, self._dim))
                       if rows else np.zeros((0, self._dim), dtype=np.float16))
        self.lengths = torch.from_numpy(np.diff(self.offsets))
        self.device = torch.device(device)

    @classmethod
    def from_cache(cls, cache: FeatureCache, ids: list[str], device: str | torch.device = "cpu") -> "DiskFeatureBank":
        """Export ``ids`` (or reuse a current export) and open it."""
        return cls(export_features(cache, ids), device)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def dim(self) -> int:
        return self._dim

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``[B, T_b, D]`` (float32) and mask ``[B, T_b]``, trimmed to the batch's longest."""
        index = index.detach().cpu().numpy()
        starts, lengths = self.offsets[index], self.offsets[index + 1] - self.offsets[index]
        width = int(lengths.max()) if len(index) else 0
        positions = np.arange(width)
        mask = positions[None, :] < lengths[:, None]
        rows = np.where(mask, starts[:, None] + positions[None, :], 0)  # padding reads row 0, zeroed below
        tokens = torch.from_numpy(self.tokens[rows.reshape(-1)].reshape(len(index), width, self._dim)).float()
        mask = torch.from_numpy(mask)
        tokens.masked_fill_(~mask[..., None], 0.0)
        return tokens.to(self.device), mask.to(self.device)


# ----- choosing one -------------------------------------------------------------------


def available_memory(device: str | torch.device = "cpu") -> int | None:
    """Bytes free for a bank on ``device``: host RAM, and also free GPU memory on CUDA; None if unknown.

    Host RAM is psutil's ``available`` when psutil is installed (it is not a dependency),
    else ``MemAvailable`` from Linux's /proc/meminfo; elsewhere unknown.
    """
    try:
        import psutil

        free: int | None = int(psutil.virtual_memory().available)
    except ImportError:
        free = None
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        free = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    device = torch.device(device)
    if device.type == "cuda":
        gpu = int(torch.cuda.mem_get_info(device)[0])
        free = gpu if free is None else min(free, gpu)
    return free


def padded_bytes(cache: FeatureCache, n: int) -> int:
    """Size of an in-memory bank of ``n`` of the cache's samples, padded to its longest possible sample."""
    width = int(cache.fingerprint.get("max_tokens", 0) or 0)
    if width <= 0:  # no declared limit: judge by the samples themselves
        width = max((t.shape[0] for t in cache.get_many(sorted(cache.ids())[:256])), default=1)
    return n * width * cache.dim * 2  # fp16


def choose_bank(kind: str, caches: dict[str, FeatureCache], n: int, device: str | torch.device = "cpu") -> str:
    """``memory`` or ``disk`` for the stage option ``[train] bank`` (``auto`` | ``memory`` | ``disk``).

    ``auto`` takes ``disk`` when the padded banks of ``n`` samples of every cache together
    would exceed ``MEMORY_SHARE`` of :func:`available_memory`.

    Raises:
        ConfigError: ``kind`` is not one of ``BANK_KINDS``.
    """
    if kind not in BANK_KINDS:
        raise ConfigError(f"[train] bank = {kind!r}: use one of {', '.join(BANK_KINDS)}")
    if kind != "auto":
        return kind
    free = available_memory(device)
    needed = sum(padded_bytes(cache, n) for cache in caches.values())
    return "disk" if free is not None and needed > MEMORY_SHARE * free else "memory"


def load_banks(caches: dict[str, FeatureCache], ids: list[str], kind: str = "memory",
               device: str | torch.device = "cpu") -> dict[str, Bank]:
    """One bank per cache for the same ids, all in memory or all on disk (``kind`` as in :func:`choose_bank`)."""
    cls = DiskFeatureBank if choose_bank(kind, caches, len(ids), device) == "disk" else FeatureBank
    return {name: cls.from_cache(cache, ids, device) for name, cache in caches.items()}
