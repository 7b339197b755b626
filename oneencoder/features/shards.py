"""Sharded feature extraction: N processes each build one shard, then one merge makes one cache.

``oneencoder cache build --shard i/n`` (a job array) or the same command under ``torchrun``
(shard ``RANK`` of ``WORLD_SIZE``; no process group is needed) writes shard ``i`` to
``<cache>/shards/<i>-of-<n>/``, a cache root of its own with its LMDB, rejects file and a
``<modality>.done.json`` written when the shard is finished. :func:`merge_shards` copies
the finished shards' entries byte for byte into ``<cache>/<modality>/`` and merges their
rejects, so training and evaluation open one cache with one fingerprint, as before.

Samples go to shards by a hash of their id, not by position in the manifest: a sample's
shard then depends on nothing but its id and ``n``, so adding or removing manifest rows
never moves other samples to another shard (whose finished work would be lost), and two
tasks reading different versions of a growing manifest never encode the same sample.
The shards are balanced to within sampling noise (about ``sqrt(N/n)`` samples).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CacheMismatchError, OneEncoderError
from ..names import remove_tree_inside, safe_name
from .cache import FeatureCache, cache_dir_for, cache_lock, read_rejects, rejects_path, update_rejects

_SHARD_DIR = re.compile(r"^(\d+)-of-(\d+)$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise OneEncoderError(f"shard {self.index}/{self.count}: expected i/n with 0 <= i < n, e.g. 0/4")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"i/n"`` as given to ``--shard``."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m or not int(m.group(1)) < int(m.group(2)):
            raise OneEncoderError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. --shard 0/4")
        return cls(int(m.group(1)), int(m.group(2)))

    @classmethod
    def from_env(cls) -> "Shard | None":
        """``RANK`` of ``WORLD_SIZE`` as torchrun sets them; None outside torchrun (or with one process)."""
        if "WORLD_SIZE" not in os.environ:
            return None
        try:
            rank, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
        except ValueError:
            raise OneEncoderError(f"RANK={os.environ.get('RANK')!r} WORLD_SIZE={os.environ['WORLD_SIZE']!r}: "
                                  "expected integers (as torchrun sets them)") from None
        return cls(rank, world) if world > 1 else None

    def owns(self, sid: str) -> bool:
        digest = hashlib.sha1(sid.encode("utf-8", "surrogatepass")).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    def root(self, cache_root: str | Path) -> Path:
        return Path(cache_root) / "shards" / f"{self.index}-of-{self.count}"

    def done_path(self, cache_root: str | Path, modality: str) -> Path:
        return self.root(cache_root) / f"{modality}.done.json"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_counts(cache_root: str | Path, modality: str) -> list[int]:
    """The shard counts ``n`` for which some shard of ``modality`` exists under ``cache_root``."""
    base = Path(cache_root) / "shards"
    found = {int(m.group(2)) for d in (base.iterdir() if base.is_dir() else ())
             if (m := _SHARD_DIR.match(d.name)) and cache_dir_for(d, modality).is_dir()}
    return sorted(found)


@dataclass
class MergeReport:
    """What a merge did: the merged cache's entries and rejects (all of them, not only the shards')."""

    modality: str
    shards: int
    entries: int
    rejects: int
    dropped: int

    def summary(self) -> str:
        line = (f"{self.modality}: merged {self.shards} shard{'s' * (self.shards != 1)}, {self.entries} entries, "
                f"{self.rejects} rejected")
        if self.dropped:
            line += f" ({self.dropped} stale {'entry' if self.dropped == 1 else 'entries'} removed)"
        return line


def merge_shards(modality: str, fingerprint: dict[str, Any], cache_root: str | Path, count: int | None = None,
                 remove: bool = False) -> MergeReport:
    """Merge the finished shards of ``modality`` into ``<cache_root>/<modality>/``.

    Idempotent: entries are copied byte for byte, so a merge killed half way is simply
    rerun. Every shard is checked (finished, not being built, same fingerprint) before
    anything is written. Each shard's outcome wins for its samples: its entries replace
    the merged cache's, and a sample it rejected loses its old entry (its input is now
    bad) and joins the rejects file, whose rows for other samples stay.

    Args:
        count: Merge the shards ``*-of-<count>``; needed only when shards of several counts exist.
        remove: Delete the shards after a successful merge (later sharded builds still skip
            what the merged cache holds).

    Raises:
        OneEncoderError: No shards, shards of several counts, or a shard missing, unfinished or being built.
        CacheMismatchError: A shard was built with another fingerprint.
    """
    safe_name(modality, "modality")  # it names the cache folder, and the shard folders removed below
    shards = _finished_shards(modality, cache_root, count)
    target = cache_dir_for(cache_root, modality)
    report = MergeReport(modality, len(shards), 0, 0, 0)
    with contextlib.ExitStack() as stack:
        stack.enter_context(cache_lock(target))
        parts = []
        for shard in shards:  # every shard is checked before anything is written
            path = cache_dir_for(shard.root(cache_root), modality)
            stack.enter_context(cache_lock(path))
            try:
                parts.append(stack.enter_context(FeatureCache(path, fingerprint, readonly=True)))
            except CacheMismatchError as e:
                raise CacheMismatchError(f"shard {shard}: {e}; rebuild that shard") from None
        merged = stack.enter_context(FeatureCache(target, fingerprint))
        inputs = merged.inputs()
        seen: list[str] = []
        rejects: dict[str, dict] = {}
        for shard, part in zip(shards, parts):
            seen += merged.copy_from(part)
            for sid, row in read_rejects(rejects_path(shard.root(cache_root), modality)).items():
                seen.append(sid)
                if sid in inputs and inputs[sid] == row.get("input"):
                    continue  # this very input is cached: keep its features, not a contradicting reject
                rejects[sid] = row
        stale = [sid for sid in rejects if sid in inputs]  # features of an input that is now rejected
        merged.delete_many(stale)
        report.rejects = update_rejects(rejects_path(cache_root, modality), seen, rejects)
        report.entries, report.dropped = len(merged), len(stale)
    if remove:
        for shard in shards:
            _remove_shard(shard, cache_root, modality)
    return report


def _finished_shards(modality: str, cache_root: str | Path, count: int | None) -> list[Shard]:
    """All ``count`` shards of ``modality``, each finished, or one line saying what is missing."""
    where = Path(cache_root) / "shards"
    if count is None:
        counts = shard_counts(cache_root, modality)
        if not counts:
            raise OneEncoderError(f"no shards of {modality!r} under {where}; build them with "
                                  "`oneencoder cache build --shard i/n`")
        if len(counts) > 1:
            raise OneEncoderError(f"{where} holds shards of {modality!r} for several counts "
                                  f"({', '.join(map(str, counts))}); pass --shards N")
        count = counts[0]
    shards = [Shard(i, count) for i in range(count)]
    for shard in shards:
        done = shard.done_path(cache_root, modality)
        if not done.exists():
            raise OneEncoderError(f"shard {shard} of {modality!r} is not finished (no {done}); run "
                                  f"`oneencoder cache build --shard {shard}` (it resumes), then merge again")
    return shards


def _remove_shard(shard: Shard, cache_root: str | Path, modality: str) -> None:
    root = shard.root(cache_root)
    remove_tree_inside(root, modality)  # = cache_dir_for(root, modality), proven inside the shard
    for leftover in (rejects_path(root, modality), shard.done_path(cache_root, modality),
                     root / f"{modality}.lock"):
        leftover.unlink(missing_ok=True)
    for folder in (root, root.parent):  # only once nothing else (another modality) is left
        with contextlib.suppress(OSError):
            folder.rmdir()
