"""A vector index over one modality's embeddings, searchable from any modality of the same model.

Every modality of a model lives in one space, so an image index answers text, sound or
SMILES queries alike. Small indexes are searched exactly (a blocked matmul + top-k);
above :data:`EXACT_LIMIT` vectors ``kind="auto"`` builds a faiss IVF-PQ index (inverted
lists of a spherical k-means holding 4-bit product-quantized codes; the best
``k x`` :data:`REFINE` candidates are re-ranked on the exact vectors), whose ``nprobe`` is chosen at build
time as the smallest that reaches :data:`TARGET_RECALL` recall@10 against exact search
on a sample of the index's own vectors; ``benchmarks/bench_search.py`` measures it.

On disk (no pickle anywhere)::

    I/
      index.json           format, modality, kind and ANN settings, the model's space, sha256 per file
      vectors.safetensors  "vectors": [N, d] float32, unit norm
      items.jsonl          one row per vector: id, input (path, text, SMILES) and display fields
                           (finite numbers only: JSON has no NaN or Infinity)
      ann.faiss            kind "ivf" only: faiss's own binary format

The model's *space* (the sha256 of its projection, of this modality's adapter and of its
backbone weights) is recorded; a model with another space is refused with one line.
An add-modality stage leaves all three unchanged, so indexes stay valid as a model grows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import ChecksumError, MissingDependencyError, OneEncoderError
from ..fileio import atomic_path, sha256_file, write_json_atomic, write_text_atomic
from ..model.checkpoint import PROJECTION, adapter_file

INDEX_FORMAT = 1
META = "index.json"
VECTORS = "vectors.safetensors"
ITEMS = "items.jsonl"
ANN_FILE = "ann.faiss"
KINDS = ("auto", "exact", "ivf")
#: ``kind="auto"`` searches up to this many vectors exactly (~10 ms per query at d=640 here).
EXACT_LIMIT = 100_000
#: recall@10 against exact search that the IVF's ``nprobe`` is tuned to reach.
TARGET_RECALL = 0.95
_TUNE_QUERIES = 512
_TUNE_MARGIN = 0.01  # the sampling error of recall on 512 queries; tuning aims this much above the target
_TRAIN_PER_LIST = 48  # k-means training vectors per list (faiss wants 39 to 256)
#: ANN candidates per result re-ranked on the exact vectors (codes only shortlist).
REFINE = 20
#: Fewest vectors of an IVF index: half of them train k-means, and each 4-bit product
#: quantizer needs at least 16 training points; an index this small is searched faster exactly.
IVF_MIN_VECTORS = 64
_SCORE_BLOCK = 1 << 24  # scores held at once by exact search: 64 MB of float32


class IndexMismatchError(OneEncoderError):
    """An index was built with another model (or another version of this one)."""


def model_space(meta: dict[str, Any], modality: str) -> dict[str, Any]:
    """What makes ``modality``'s embeddings of a model comparable: projection, adapter, backbone."""
    info = meta["modalities"].get(modality)
    if info is None:
        raise OneEncoderError(f"this model holds no {modality!r} modality; it has {', '.join(meta['modalities'])}")
    return {"projection": meta["files"][PROJECTION], "adapter": meta["files"][adapter_file(modality)],
            "backbone": info["weights_sha256"], "preprocess_version": info["preprocess_version"],
            "embed_dim": int(meta["embed_dim"])}


def _as_queries(queries: Any, dim: int) -> torch.Tensor:
    q = torch.as_tensor(np.asarray(queries) if not isinstance(queries, torch.Tensor) else queries)
    q = q.detach().float().cpu()
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != dim:
        raise OneEncoderError(f"queries of shape {tuple(q.shape)} do not fit an index of {dim}-wide vectors "
                              "(embeddings of another model?)")
    if not torch.isfinite(q).all():
        raise OneEncoderError("queries contain NaN or infinite values")
    return q.contiguous()


def exact_topk(queries: torch.Tensor, vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` inner products ``[Q, k]`` (scores, rows), best first, in blocks of gallery rows.

    Only one ``[Q, block]`` score matrix exists at a time; each block's top-k is merged with
    the running best. (``oneencoder.evaluation.topk.topk_search`` is the suite's shared kernel for this.)
    """
    n = vectors.shape[0]
    k = min(k, n)
    best_s = queries.new_full((queries.shape[0], 0), -math.inf)
    best_i = torch.empty((queries.shape[0], 0), dtype=torch.long)
    rows = max(k, _SCORE_BLOCK // max(1, queries.shape[0]))
    for start in range(0, n, rows):
        s = queries @ vectors[start : start + rows].T
        top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
        cat_s, cat_i = torch.cat([best_s, top_s], 1), torch.cat([best_i, top_i + start], 1)
        best_s, pick = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
        best_i = cat_i.gather(1, pick)
    return best_s, best_i


# ----- strict JSON: items and index.json never hold NaN or Infinity ----------------------------


def _finite_float(text: str) -> float:
    """``json.loads``'s float parser that refuses what JSON cannot hold (``1e999`` reads as inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    """``json.loads``'s hook for ``NaN``, ``Infinity`` and ``-Infinity``: refuse them."""
    raise ValueError(f"{name} is not a JSON value")


def strict_json_loads(text: str) -> Any:
    """``json.loads`` without NaN, Infinity or out-of-range numbers (``ValueError``, ``RecursionError``)."""
    return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)


def non_finite_field(item: dict[str, Any]) -> str | None:
    """The first field of ``item`` holding NaN or an infinity (None if all are finite)."""
    for key, value in item.items():
        if isinstance(value, float) and not math.isfinite(value):
            return str(key)
    return None


# ----- faiss IVF ---------------------------------------------------------------------------


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise MissingDependencyError("ANN indexes need faiss: `pip install faiss-cpu` (pinned in "
                                     "requirements/lock.txt)") from None
    return faiss


def default_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: a power of two near ``sqrt(n)`` (1024 for 10^6), each list
    >= 39 vectors on average (faiss's minimum for training k-means). More lists scan fewer
    vectors per query but cost ``n * nlist`` dot products to build: ``4 sqrt(n)`` took minutes
    for 10^6 vectors on 2 CPU cores."""
    target = max(1, min(math.sqrt(n), n / 39))
    return max(1, 2 ** int(round(math.log2(target))))


def pq_width(dim: int) -> int:
    """Dims per product-quantizer code: 4 where ``dim`` allows (160 4-bit codes, 80 bytes, at d=640)."""
    return next(w for w in (4, 2, 1) if dim % w == 0)


def build_ann(vectors: np.ndarray, nlist: int, seed: int = 0, held_out: np.ndarray | None = None) -> Any:
    """A faiss ``IVF<nlist>,PQ<m>x4fs`` index (inner product): spherical k-means lists holding
    4-bit product-quantized codes, scanned with SIMD "fast scan".

    A flat IVF scan reads every probed float32 vector, which on 10^6 x 640 vectors was no faster
    than one exact matmul over all of them (``benchmarks/bench_search.py``); the codes are 1/32 of
    that, and :func:`ann_search` re-ranks the candidates on the exact vectors.

    Args:
        held_out: Rows left out of the k-means sample (still indexed), so that queries made
            of them see the lists as a new query would (see :func:`tune_nprobe`).
    """
    faiss = _faiss()
    n, d = vectors.shape
    if n < IVF_MIN_VECTORS:
        raise OneEncoderError(f"an IVF index needs at least {IVF_MIN_VECTORS} vectors, got {n}; use kind "
                              "'exact' (or 'auto', exact up to 100,000 vectors), which is also faster at this size")
    pool = np.setdiff1d(np.arange(n), held_out) if held_out is not None and len(held_out) < n else np.arange(n)
    if not isinstance(nlist, (int, np.integer)) or not 1 <= nlist <= len(pool):
        raise OneEncoderError(f"nlist={nlist!r}: an IVF index of {n} vectors takes 1 to {len(pool)} lists "
                              f"(its k-means trains on {len(pool)} of them)")
    ann = faiss.index_factory(d, f"IVF{nlist},PQ{d // pq_width(d)}x4fs", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(ann)
    ivf.cp.spherical = True  # centroids on the unit sphere, as the vectors are
    ivf.cp.niter = 10
    ivf.cp.seed = seed
    sample = np.sort(np.random.default_rng(seed).choice(pool, min(len(pool), _TRAIN_PER_LIST * nlist), replace=False))
    try:
        ann.train(np.ascontiguousarray(vectors[sample]))
        ann.add(vectors)
    except RuntimeError as e:  # faiss's C++ checks: one line, not its stack of source positions
        raise OneEncoderError(f"faiss could not build the IVF index: {_faiss_reason(e)}") from None
    return ann


def _faiss_reason(e: Exception) -> str:
    """The last clause of a faiss error (``Error in ... at File.cpp:66: Error: 'nx >= k'`` -> ``'nx >= k'``)."""
    text = " ".join(str(e).split())
    return text.rsplit("Error: ", 1)[-1][:200]


def ann_search(ann: Any, vectors: np.ndarray, queries: np.ndarray, k: int, nprobe: int,
               refine: int = REFINE) -> tuple[np.ndarray, np.ndarray]:
    """``k * refine`` candidates from the ANN index, re-ranked by exact inner product: ``(scores, rows)``.

    Rows are -1 (scores -inf) where fewer than ``k`` candidates came back.
    """
    _faiss().extract_index_ivf(ann).nprobe = int(nprobe)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    _, cand = ann.search(queries, min(len(vectors), k * refine))
    k = min(k, cand.shape[1])
    scores = np.empty((len(queries), k), dtype=np.float32)
    rows = np.empty((len(queries), k), dtype=np.int64)
    # numpy, not torch: gathering 200 rows of a large tensor took torch 10 ms, numpy 0.3 ms.
    for start in range(0, len(queries), 64):  # 64 x 200 candidates x d floats at a time
        c = cand[start : start + 64]
        s = np.matmul(vectors[np.maximum(c, 0)], queries[start : start + 64, :, None])[..., 0]
        s[c < 0] = -np.inf
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        scores[start : start + 64] = np.take_along_axis(s, order, 1)
        rows[start : start + 64] = np.where(np.isinf(scores[start : start + 64]), -1, np.take_along_axis(c, order, 1))
    return scores, rows


def tuning_rows(n: int, queries: int = _TUNE_QUERIES, seed: int = 0) -> np.ndarray:
    """Rows of the index that :func:`tune_nprobe` uses as queries (held out of k-means)."""
    return np.sort(np.random.default_rng(seed + 1).choice(n, min(n // 2, queries), replace=False))


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def _others(rows: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's first ``k`` entries other than its own query row (and faiss's -1 padding)."""
    out = np.full((rows.shape[0], k), -1, dtype=np.int64)
    for i, (r, o) in enumerate(zip(rows, own)):
        kept = r[(r != o) & (r >= 0)][:k]
        out[i, : len(kept)] = kept
    return out


def tune_nprobe(search: Callable[[np.ndarray, int, int], np.ndarray], vectors: np.ndarray, own: np.ndarray,
                nlist: int, target: float = TARGET_RECALL, k: int = 10) -> tuple[int, float]:
    """Smallest power-of-two ``nprobe`` whose recall@k reaches ``target`` (plus a margin for the
    sampling error): ``(nprobe, recall)``.

    Args:
        search: ``search(queries, k, nprobe) -> rows`` of the ANN index being tuned.
        own: The indexed rows used as queries, held out of k-means training so that the
            lists treat them as new points. Each query's own row is left out of both
            rankings: the measure is about its ``k`` nearest *other* vectors.
    """
    q = np.ascontiguousarray(vectors[own])
    _, exact = exact_topk(torch.from_numpy(q), torch.from_numpy(vectors), k + 1)
    truth = _others(exact.numpy(), own, k)
    nprobe = 1
    while True:
        recall = _recall(_others(search(q, k + 1, nprobe), own, k), truth)
        if recall >= target + _TUNE_MARGIN or nprobe >= nlist:
            return nprobe, recall
        nprobe = min(2 * nprobe, nlist)


# ----- the index ----------------------------------------------------------------------------


@dataclass
class SearchResult:
    """Top-k of each query.

    Attributes:
        scores: ``[Q, k]`` cosine similarities, best first.
        rows: ``[Q, k]`` rows of the index.
        hits: Per query, best first: ``{"rank", "score", "row", "id", "item"}``. ``rank`` (from 1),
            ``score`` (the cosine), ``row`` and ``id`` are the index's own; ``item`` is a copy of
            the indexed item (``id``, ``input`` and the manifest's display fields), so a user
            column named ``score`` or ``rank`` never stands in for the real one. After
            :meth:`with_match_probability`, each hit also holds ``match_probability``.
        match_probability: ``[Q, k]`` calibrated probability that each hit matches its query,
            or None (not asked for, or the model stores no calibration of the direction).
    """

    scores: np.ndarray
    rows: np.ndarray
    hits: list[list[dict[str, Any]]]
    match_probability: np.ndarray | None = None

    def with_match_probability(self, probability: Callable[[np.ndarray], np.ndarray] | None) -> "SearchResult":
        """Give every hit its ``match_probability``: ``probability(cosines)``, or None for each hit
        when there is no calibration (never a made-up number)."""
        p = None if probability is None else np.asarray(probability(self.scores), dtype=np.float64)
        for q, hits in enumerate(self.hits):
            for j, hit in enumerate(hits):
                hit["match_probability"] = None if p is None else float(p[q, j])
        self.match_probability = p
        return self


class VectorIndex:
    """Unit-norm embeddings of one modality with their items, exact or ANN.

    Args:
        vectors: ``[N, d]`` embeddings (``encode`` output).
        items: One dict per vector with at least an ``id`` (e.g. ``{"id", "input"}``).
        modality: What the vectors embed.
        space: :func:`model_space` of the model that embedded them.
        kind: ``"exact"``, ``"ivf"`` or ``"auto"`` (exact up to :data:`EXACT_LIMIT` vectors).
        nlist: IVF lists (default :func:`default_nlist`).
        nprobe: IVF lists scanned per query (default: tuned to ``target_recall``).
        extra: More facts to record in ``index.json`` (e.g. the data it came from).
    """

    def __init__(self, vectors: np.ndarray, items: Sequence[dict[str, Any]], modality: str, space: dict[str, Any],
                 kind: str = "auto", nlist: int | None = None, nprobe: int | None = None,
                 target_recall: float = TARGET_RECALL, extra: dict[str, Any] | None = None,
                 _ann: Any = None, _ann_info: dict[str, Any] | None = None) -> None:
        vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if vectors.ndim != 2:
            raise OneEncoderError(f"index vectors must be [N, d], got shape {vectors.shape}")
        if len(items) != vectors.shape[0]:
            raise OneEncoderError(f"index: {len(items)} items for {vectors.shape[0]} vectors")
        if kind not in KINDS:
            raise OneEncoderError(f"index kind {kind!r}: use one of {', '.join(KINDS)}")
        if not np.isfinite(vectors.sum()) and not np.isfinite(vectors).all():  # the sum is the cheap check
            bad = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
            raise OneEncoderError(f"index vector of row {bad} holds NaN or infinite values")
        if any(not isinstance(it, dict) or "id" not in it for it in items):
            bad = next(i for i, it in enumerate(items) if not isinstance(it, dict) or "id" not in it)
            raise OneEncoderError(f"index item {bad} must be a dict with an 'id', got {str(items[bad])[:80]}")
        self.vectors, self.items, self.modality, self.space = vectors, list(items), modality, dict(space)
        self.extra = dict(extra or {})
        self.kind = kind if kind != "auto" else ("exact" if len(vectors) <= EXACT_LIMIT else "ivf")
        self.ann, self.ann_info = _ann, dict(_ann_info or {})
        if self.kind == "ivf" and self.ann is None:
            nlist = nlist or default_nlist(len(vectors))
            own = tuning_rows(len(vectors))
            self.ann = build_ann(vectors, nlist, held_out=own)
            tuned, recall = tune_nprobe(lambda q, k, p: ann_search(self.ann, vectors, q, k, p)[1], vectors, own,
                                        nlist, target_recall)
            self.ann_info = {"library": "faiss", "type": f"IVF{nlist},PQ{self.dim // pq_width(self.dim)}x4fs",
                             "metric": "inner_product", "nlist": nlist, "nprobe": nprobe or tuned, "refine": REFINE,
                             "target_recall@10": target_recall, "tuned_recall@10": round(recall, 4),
                             "tune_queries": len(own)}

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def ids(self) -> list[str]:
        return [str(it["id"]) for it in self.items]

    def __repr__(self) -> str:
        return f"VectorIndex({self.modality}, {len(self)} x {self.dim}, {self.kind})"

    def search(self, queries: Any, k: int = 10, nprobe: int | None = None) -> SearchResult:
        """The ``k`` most similar vectors to each query embedding (``[Q, d]`` or ``[d]``).

        Args:
            nprobe: IVF lists to scan (more: slower, closer to exact); default the tuned value.
        """
        if not isinstance(k, int) or k < 1:
            raise OneEncoderError(f"k must be a positive integer, got {k!r}")
        q = _as_queries(queries, self.dim)
        k = min(k, len(self))
        if k == 0:
            empty = np.zeros((q.shape[0], 0))
            return SearchResult(empty.astype(np.float32), empty.astype(np.int64), [[] for _ in range(q.shape[0])])
        if self.kind == "exact":
            s, r = exact_topk(q, torch.from_numpy(self.vectors), k)
            scores, rows = s.numpy(), r.numpy()
        else:
            scores, rows = ann_search(self.ann, self.vectors, q.numpy(), k, nprobe or self.ann_info["nprobe"],
                                      int(self.ann_info.get("refine", REFINE)))
        # The index's own fields first and the user's apart, under "item": a manifest column
        # named "score" or "rank" cannot replace the real value.
        hits = [[{"rank": rank, "score": float(s), "row": int(r), "id": str(self.items[r]["id"]),
                  "item": dict(self.items[r])}
                 for rank, (s, r) in enumerate(zip(srow, rrow), 1) if r >= 0]
                for srow, rrow in zip(scores.tolist(), rows.tolist())]
        return SearchResult(np.asarray(scores, dtype=np.float32), np.asarray(rows, dtype=np.int64), hits)

    def check_model(self, meta: dict[str, Any], model_dir: str | Path = "the model") -> None:
        """Raise ``IndexMismatchError`` unless ``meta`` (a model's ``oneencoder.json``) embeds into this index's space."""
        try:
            theirs = model_space(meta, self.modality)
        except OneEncoderError:
            raise IndexMismatchError(f"index of {self.modality} vectors, but {model_dir} holds no {self.modality!r} "
                                     "modality: it was built with another model") from None
        for key in ("projection", "adapter", "backbone", "preprocess_version", "embed_dim"):
            if theirs[key] != self.space.get(key):
                what = {"projection": "projection", "adapter": f"{self.modality} adapter",
                        "backbone": f"{self.modality} backbone weights"}.get(key, key)
                name = f"index {self.extra['path']}" if self.extra.get("path") else "this index"
                raise IndexMismatchError(
                    f"{name} was built with another model: its {what} {str(self.space.get(key))[:12]} differs "
                    f"from {str(theirs[key])[:12]} in {model_dir}; rebuild it with "
                    f"`oneencoder index build --model {model_dir}`")

    # ----- storage ------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What ``index.json`` records (less the file checksums)."""
        return {"format_version": INDEX_FORMAT, "modality": self.modality, "count": len(self), "dim": self.dim,
                "kind": self.kind, "ann": self.ann_info or None, "space": self.space,
                **{k: v for k, v in self.extra.items() if k != "path"}}

    def save(self, out_dir: str | Path) -> Path:
        """Write the index to ``out_dir`` (each file atomically; ``index.json`` last).

        Raises:
            OneEncoderError: ``out_dir`` is a file (or lies under one), or an item holds a
                value JSON cannot write (NaN, an infinity), named by its row and field.
        """
        from safetensors.numpy import save_file

        out = Path(out_dir)
        lines = "".join(_item_line(it, row) for row, it in enumerate(self.items))  # before touching the folder
        make_index_dir(out)
        (out / META).unlink(missing_ok=True)  # an interrupted overwrite then reads as no index, not a stale one
        with atomic_path(out / VECTORS) as tmp:
            save_file({"vectors": self.vectors}, str(tmp), metadata={"format": "oneencoder-index"})
        write_text_atomic(out / ITEMS, lines)
        files = [VECTORS, ITEMS]
        if self.ann is not None:
            with atomic_path(out / ANN_FILE) as tmp:
                _faiss().write_index(self.ann, str(tmp))
            files.append(ANN_FILE)
        else:
            (out / ANN_FILE).unlink(missing_ok=True)
        write_json_atomic(out / META, {**self.info(), "files": {f: sha256_file(out / f) for f in files}})
        self.extra["path"] = str(out)
        return out

    @classmethod
    def load(cls, index_dir: str | Path, verify: bool = True) -> "VectorIndex":
        """Read an index written by :meth:`save`, checking every file's sha256 (``verify``)."""
        from safetensors.numpy import load_file

        index_dir = Path(index_dir)
        meta = read_index_meta(index_dir)
        for name, expected in meta["files"].items():
            if name not in (VECTORS, ITEMS, ANN_FILE):  # a name from the file: never a path elsewhere
                raise OneEncoderError(f"{index_dir / META}: lists an unknown file {name[:80]!r}; rebuild the index")
            path = index_dir / name
            if not path.is_file():
                raise ChecksumError(f"{path} is missing from the index; rebuild it with `oneencoder index build`")
            if verify and sha256_file(path) != expected:
                raise ChecksumError(f"{path}: sha256 does not match {META}; the file was modified or corrupted, "
                                    "rebuild the index")
        try:
            vectors = load_file(str(index_dir / VECTORS))["vectors"]
        except Exception as e:  # safetensors raises its own types for a damaged header
            raise ChecksumError(f"{index_dir / VECTORS}: not a readable safetensors file ({type(e).__name__}); "
                                "rebuild the index") from None
        items = _read_items(index_dir / ITEMS)
        if vectors.ndim != 2 or len(vectors) != meta["count"] or len(items) != meta["count"]:
            raise OneEncoderError(f"{index_dir}: {META} says {meta['count']} vectors, the files hold "
                                  f"{len(vectors)} vectors and {len(items)} items; rebuild the index")
        ann = None
        if meta["kind"] == "ivf":
            try:
                ann = _faiss().read_index(str(index_dir / ANN_FILE))
            except RuntimeError as e:
                raise ChecksumError(f"{index_dir / ANN_FILE}: faiss cannot read it ({_faiss_reason(e)}); "
                                    "rebuild the index") from None
        extra = {k: v for k, v in meta.items()
                 if k not in ("format_version", "modality", "count", "dim", "kind", "ann", "space", "files")}
        return cls(vectors, items, meta["modality"], meta["space"], kind=meta["kind"],
                   extra={**extra, "path": str(index_dir)}, _ann=ann, _ann_info=meta.get("ann") or {})


def read_index_meta(index_dir: str | Path) -> dict[str, Any]:
    """``index.json`` of an index directory, checked for its format."""
    path = Path(index_dir) / META
    if not path.is_file():
        raise OneEncoderError(f"{index_dir} is not an index (no {META}); build one with `oneencoder index build`")
    try:
        meta = strict_json_loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise OneEncoderError(f"{path}: corrupt JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # NaN, 1e999, nesting deeper than Python's stack, not UTF-8
        raise OneEncoderError(f"{path}: unreadable JSON ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != INDEX_FORMAT:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise OneEncoderError(f"{path}: index format {str(version)[:40]} is not supported (need {INDEX_FORMAT})")
    _check_meta(path, meta)
    return meta


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """One line for an ``index.json`` whose fields were edited into something no build writes."""
    def bad(what: str) -> OneEncoderError:
        return OneEncoderError(f"{path}: {what}; the file was edited or damaged, rebuild the index "
                               "with `oneencoder index build`")

    kind, files, ann = meta.get("kind"), meta.get("files"), meta.get("ann")
    if kind not in ("exact", "ivf"):
        raise bad(f"kind {str(kind)[:40]!r} is not 'exact' or 'ivf'")
    if not isinstance(meta.get("modality"), str) or not isinstance(meta.get("space"), dict):
        raise bad("its modality or space is missing")
    if not isinstance(meta.get("count"), int) or isinstance(meta.get("count"), bool) or meta["count"] < 0:
        raise bad(f"count {str(meta.get('count'))[:40]} is not a number of vectors")
    if not isinstance(files, dict) or not {VECTORS, ITEMS} <= set(files) \
            or not all(isinstance(v, str) for v in files.values()):
        raise bad(f"its files do not list {VECTORS} and {ITEMS} with their sha256")
    if kind == "ivf":
        settings = [ann.get("nprobe"), ann.get("refine", REFINE)] if isinstance(ann, dict) else [None]
        if ANN_FILE not in files or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                            for v in settings):
            raise bad(f"kind 'ivf' needs {ANN_FILE} and its ann settings (nprobe, refine), which it does not record")


def make_index_dir(out: Path) -> None:
    """Create the index folder ``out``; one line if it is a file or lies under one."""
    if out.exists() and not out.is_dir():
        raise OneEncoderError(f"{out} is a file, not an index folder; choose another output folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file on the way: a/file.txt/ix
        raise OneEncoderError(f"{out}: a part of the path is a file, not a folder; "
                              "choose another output folder") from None


def _item_line(item: dict[str, Any], row: int) -> str:
    """One ``items.jsonl`` line; an item JSON cannot hold (NaN, an infinity) is one line naming it."""
    where = f"index item {str(item.get('id'))[:80]!r} (row {row})"
    try:
        line = json.dumps(item, ensure_ascii=False, allow_nan=False)
    except ValueError:  # NaN or an infinity
        field = non_finite_field(item) or "?"
        raise OneEncoderError(f"{where}: field {field!r} is {item.get(field)}, which JSON cannot hold; "
                              "use a finite number or none") from None
    except TypeError as e:  # a numpy number, bytes, an object
        raise OneEncoderError(f"{where}: {e}; items hold strings, numbers, booleans, lists and dicts") from None
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: \\u escapes keep it, as the cache's JSONL does
        line = json.dumps(item, allow_nan=False)
    return line + "\n"


def _read_items(path: Path) -> list[dict[str, Any]]:
    """``items.jsonl``, strictly: a line with NaN, Infinity or no ``id`` is one line naming it."""
    items = []
    # "\n" only: splitlines() would also cut at U+2028 or U+0085 inside a caption.
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line:
            continue
        try:
            item = strict_json_loads(line)
        except (ValueError, RecursionError) as e:
            raise OneEncoderError(f"{path}:{lineno}: not a JSON item ({str(e)[:100]}); rebuild the index") from None
        if not isinstance(item, dict) or "id" not in item:
            raise OneEncoderError(f"{path}:{lineno}: not an item with an id; rebuild the index")
        items.append(item)
    return items


def load_index(index_dir: str | Path, verify: bool = True) -> VectorIndex:
    """Shorthand for :meth:`VectorIndex.load`."""
    return VectorIndex.load(index_dir, verify)
