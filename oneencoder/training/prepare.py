"""One way to prepare a stage: resolve its modalities, open or build their caches, load the model.

Every command that trains, evaluates or embeds starts here:

* **a stage** (``train``, ``demo``, ``add-modality``, ``cache build``): the stage file's
  two modalities (an add-modality stage's frozen anchor exactly as the model holds it),
  plus, for an add-modality stage, the model's other modalities whose inputs the
  manifest has (their test pairs are the emergent ones). Their caches are built: missing
  or stale features are encoded, with one summary line per modality.
* **a model** (``eval``, ``index build``, ``classify``, ``embed``): the model directory,
  loaded once, and the modalities it holds (those named, or those the manifest has inputs
  for). Their caches are built for ``eval``, or only opened:
  :class:`~oneencoder.features.lookup.CachedFeatures` finds the cached backbone features of
  an input by what it was computed from, so a sample that was cached is not encoded again.

Example:
    >>> prepared = prepare_stage("image_text", manifest="outputs/demo/manifest.jsonl",
    ...                          cache_dir="outputs/demo/cache")
    >>> run_stage(prepared.config, "outputs/demo/model")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..data.manifest import read_manifest
from ..errors import OneEncoderError
from ..features.cache import BuildReport, build_cache, rejects_path
from ..features.lookup import CachedFeatures
from ..features.views import build_view, view_root
from ..modality import Modality
from ..model.checkpoint import META, load_model, modality_from_meta
from ..names import safe_name
from ..progress import status
from ..runtime import pick_device
from . import distributed as ddp
from .config import StageConfig, load_stage
from .pairs import locked_anchor, model_modalities, stage_modalities, viewed_modalities

if TYPE_CHECKING:
    from ..features.shards import Shard
    from ..model.parts import OneEncoderModel

CACHE_FOLDER = "cache"  # a manifest's default cache root: ``<manifest folder>/cache``, as the demos write it


@dataclass
class PreparedStage:
    """What a command needs before it trains, evaluates or embeds.

    Attributes:
        config: The stage (None when prepared from a model alone).
        records: The manifest's rows ([] without a manifest).
        modalities: The stage's two modalities in the stage's order, or the model's chosen ones.
        emergent: An add-modality stage's other modalities of the model, with inputs in the manifest.
        cache_dir: The feature cache root (None: no cache known).
        model_dir: The model directory, if any.
        model: The loaded model (prepared from a model only; a stage loads its own when it trains).
        meta: The model's ``oneencoder.json`` (with ``model``).
        reports: What each cache build did, by modality.
    """

    config: StageConfig | None
    records: list[dict[str, Any]]
    modalities: dict[str, Modality]
    emergent: dict[str, Modality] = field(default_factory=dict)
    cache_dir: Path | None = None
    model_dir: Path | None = None
    model: "OneEncoderModel | None" = None
    meta: dict[str, Any] | None = None
    reports: dict[str, BuildReport] = field(default_factory=dict)

    def build_caches(self, *, batch_size: int = 32, workers: int = 0, device: str | torch.device = "cpu",
                     shard: "Shard | None" = None, progress: bool = True, log: Callable[[str], None] = status,
                     quiet_when_cached: bool = False, runtime: str = "torch",
                     precision: str = "fp32") -> dict[str, BuildReport]:
        """Encode every missing or stale feature of :attr:`modalities` and :attr:`emergent`.

        Each modality logs ``cache build``'s summary line, and the rejects file when a
        sample was rejected; with ``quiet_when_cached``, only if its build encoded, rejected
        or removed anything. Under ``torchrun`` rank 0 builds while the others wait.

        With ``[data] views = K`` the stage's trainable modalities also get views 1..K-1
        (:mod:`oneencoder.features.views`), built after the plain caches.

        ``runtime``/``precision``: where the backbones run (:mod:`oneencoder.features.runtime`).

        Raises:
            OneEncoderError: No cache root is known, another process writes the cache, or
                views are asked of a sharded build.
        """
        if self.cache_dir is None:
            raise OneEncoderError("no feature cache folder: pass --cache-dir")
        viewed = viewed_modalities(self.config, self.modalities) if self.config is not None else []
        if viewed and shard is not None:
            raise OneEncoderError(f"--views {self.config.data.views} cannot be built by shards; build the shards "
                                  "and merge them, then run `oneencoder cache build --views K` once")
        # A shard is each process's own; otherwise one process encodes and the others wait.
        distributed = self.config is not None and shard is None and ddp.launched_by_torchrun()
        if distributed:  # the stage's training joins the same group later
            ddp.init_distributed(ddp.rank_device(pick_device(self.config.train.device)))
        if not distributed or ddp.is_main():
            for name, modality in {**self.modalities, **self.emergent}.items():
                report = build_cache(modality, self.records, self.cache_dir, batch_size=batch_size,
                                     num_workers=workers, device=device, progress=progress, shard=shard,
                                     runtime=runtime, precision=precision, log=log)
                self.reports[name] = report
                if quiet_when_cached and not (report.encoded or report.rejects or report.dropped):
                    continue
                for line in build_lines(report, self.cache_dir, shard):
                    log(line)
            for name in viewed:
                for k in range(1, self.config.data.views):
                    report = build_view(self.modalities[name], self.records, self.cache_dir, k,
                                        self.config.data.view_seed, batch_size=batch_size, num_workers=workers,
                                        device=device, progress=progress)
                    self.reports[report.modality] = report
                    if quiet_when_cached and not (report.encoded or report.rejects or report.dropped):
                        continue
                    log(report.summary())
                    if report.rejects:
                        log(f"  rejects: {rejects_path(view_root(self.cache_dir, name, k), name)}")
        if distributed:
            ddp.barrier()
        return self.reports

    def cached(self, name: str) -> CachedFeatures:
        """The cached features of modality ``name``, found by input (close it, or use ``with``)."""
        return CachedFeatures(self.modalities[name], self.cache_dir)


def build_lines(report: BuildReport, root: str | Path, shard: "Shard | None" = None) -> list[str]:
    """``cache build``'s lines for one modality: its summary, and where its rejects are."""
    lines = [(f"shard {shard}: " if shard else "") + report.summary()]
    if report.rejects:
        lines.append(f"  rejects: {rejects_path(shard.root(root) if shard else root, report.modality)}")
    return lines


def prepare_stage(stage: StageConfig | str | Path | None = None, *, model_dir: str | Path | None = None,
                  manifest: str | Path | None = None, cache_dir: str | Path | None = None,
                  modalities: Sequence[str] | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                  build_caches: bool = True, progress: bool = True, workers: int = 0,
                  device: str | torch.device = "cpu", log: Callable[[str], None] = status,
                  need_records: bool = True) -> PreparedStage:
    """Resolve the modalities, open or build their caches, and load the model when there is one.

    Args:
        stage: A stage config, or a stage file or shipped stage name (``manifest``,
            ``cache_dir`` and ``overrides`` then win over the file). None: prepare from
            ``model_dir`` alone.
        model_dir: With a stage, the model it trains (an add-modality stage's anchor is read
            from it); without one, the model to load.
        manifest: Without a stage, the rows whose modalities are prepared (optional).
        cache_dir: The cache root. Without a stage: by default :func:`default_cache_dir`.
        modalities: Without a stage, the model's modalities to prepare (default: those the
            manifest has inputs for).
        build_caches: Build the caches (:meth:`PreparedStage.build_caches`) before returning.
        progress, workers, device, log: How the caches are built.
        need_records: With a stage, read its manifest (False: only resolve the modalities and
            the cache root, e.g. to merge shards; pass ``build_caches=False`` with it).

    Raises:
        OneEncoderError: A bad stage, manifest or model directory, or a modality the model lacks.
    """
    if stage is None:
        if model_dir is None:
            raise OneEncoderError("prepare_stage needs a stage or a model directory")
        prepared = _from_model(Path(model_dir), manifest, cache_dir, modalities)
    else:
        if not isinstance(stage, StageConfig):
            given = {"manifest": manifest, "cache_dir": cache_dir}
            data = {**(overrides or {}).get("data", {}), **{k: str(v) for k, v in given.items() if v is not None}}
            stage = load_stage(stage, {**(overrides or {}), "data": data})
        prepared = _from_stage(stage, Path(model_dir) if model_dir is not None else None, need_records)
    if build_caches:
        prepared.build_caches(workers=workers, device=device, progress=progress, log=log)
    return prepared


def _from_stage(config: StageConfig, model_dir: Path | None, need_records: bool) -> PreparedStage:
    records = read_manifest(config.data.manifest) if need_records else []
    modalities = stage_modalities(config, model_dir, records)
    emergent: dict[str, Modality] = {}
    if locked_anchor(config) is not None and model_dir is not None and (model_dir / META).exists():
        emergent = model_modalities(model_dir, records, set(config.modalities))
        for name in emergent:  # names read from the model become cache folders
            safe_name(name, f"{model_dir / META}: modality")
    return PreparedStage(config, records, modalities, emergent, Path(config.data.cache_dir), model_dir)


def _from_model(model_dir: Path, manifest: str | Path | None, cache_dir: str | Path | None,
                names: Sequence[str] | None) -> PreparedStage:
    model, meta = load_model(model_dir)  # registers the model's recorded modality classes first
    held = meta["modalities"]
    for name in names or ():  # before reading any data
        if name not in held:
            raise OneEncoderError(f"this model holds no {name!r} modality; it has {', '.join(held)}")
    records = read_manifest(manifest) if manifest is not None else []
    if names is None:
        names = [n for n, info in held.items() if any(r.get(info["record_key"]) for r in records)]
    modalities = {n: modality_from_meta(n, held[n]) for n in names}
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir(meta, manifest, list(modalities))
    return PreparedStage(None, records, modalities, cache_dir=root, model_dir=model_dir, model=model, meta=meta)


def default_cache_dir(meta: dict[str, Any], manifest: str | Path | None, names: Sequence[str]) -> Path | None:
    """Where a model's inputs are likely cached: the first of ``<manifest folder>/cache`` and the
    caches the model's stages trained on (latest first) that holds one of ``names``; else
    ``<manifest folder>/cache`` (where a build writes), or None without a manifest."""
    beside = Path(manifest).parent / CACHE_FOLDER if manifest is not None else None
    recorded = [(entry.get("config") or {}).get("data", {}).get("cache_dir") for entry in reversed(meta["stages"])]
    for root in [beside, *(Path(r) for r in recorded if isinstance(r, str))]:
        if root is not None and any((root / n / "data.mdb").exists() for n in names):
            return root
    return beside  # where a build would write
