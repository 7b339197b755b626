"""``oneencoder eval --robustness``: the held-out retrieval again, with each query modality corrupted or dropped.

**Corrupted.** For every direction ``a→b`` whose query modality offers corruptions
(:meth:`~oneencoder.modality.Modality.corruptions`), each test query is read from its
manifest input again, corrupted (:meth:`~oneencoder.modality.Modality.corrupt`) at each
kind and strength, preprocessed and re-encoded through the frozen backbone, in memory:
no feature cache is written. The gallery stays clean (its cached features). Every
corrupted input is drawn from :func:`corruption_rng` of its sample id, kind and
strength, so a rerun gives the same numbers. Metrics come from
:func:`~oneencoder.evaluation.retrieval.retrieval_between`, as plain ``eval`` reports them.

**Dropped.** For records that hold several input modalities besides the caption (Tux Paint
stamps with an image and a sound, renders with an image and a depth map), the query is the
record's fusion, the mean of its parts' unit embeddings renormalised
(``OneEncoder.compose`` with equal weights), against the captions; then each part is
dropped in turn and the rest fused. These rows use the cached features: nothing is
re-encoded.

Example:
    >>> out = evaluate_robustness(model, modalities, records, "outputs/demo/cache", split="test")
    >>> print(format_robustness(out))
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..data.manifest import CAPTION_FIELD
from ..errors import OneEncoderError, SampleError
from ..modality import Modality
from ..model.parts import OneEncoderModel
from ..progress import progress_bar
from .metrics import format_number
from .retrieval import _first_of_each_group, embed_split, retrieval_between

#: Metrics reported per row, each with its change from clean.
KEYS = ("R@1", "R@5", "R@10", "MRR")
#: How each corrupted input's rng is seeded (recorded in the results).
SEEDING = "random.Random(first 8 bytes of sha256('<sample id>\\0<kind>\\0<strength>'))"

_Embedded = tuple[torch.Tensor, list[str], list[str]]  # unit embeddings [N, d], groups, ids


def corruption_rng(sample_id: str, kind: str, strength: float) -> random.Random:
    """The rng of one corrupted input: the same sample, kind and strength always draw the same."""
    digest = hashlib.sha256(f"{sample_id}\0{kind}\0{float(strength)!r}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def corruptible(modalities: dict[str, Modality], names: str | None = None) -> list[str]:
    """The query modalities to corrupt: those that offer corruptions, or the comma-separated ``names``.

    Raises:
        OneEncoderError: ``names`` lists a modality the evaluation lacks or one without corruptions.
    """
    offered = [n for n, m in modalities.items() if m.corruptions()]
    if names is None:
        return offered
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    for name in chosen:
        if name not in offered:
            why = "offers no corruptions" if name in modalities else "is not among the evaluated modalities"
            raise OneEncoderError(f"--robustness-modalities: {name!r} {why}; choose from {', '.join(offered) or 'none'}")
    if not chosen:
        raise OneEncoderError(f"--robustness-modalities is empty; choose from {', '.join(offered) or 'none'}")
    return chosen


def _limited(ids: list[str], limit: int | None) -> list[int]:
    """Positions of the queries kept: all, or the first ``limit`` by a hash of their id (a spread over
    the split that is the same in every run), in their original order."""
    if limit is None or limit >= len(ids):
        return list(range(len(ids)))
    ranked = sorted(range(len(ids)), key=lambda i: hashlib.sha1(ids[i].encode()).hexdigest())
    return sorted(ranked[:limit])


def _load_raws(modality: Modality, records: dict[str, dict], ids: list[str]) -> list[Any]:
    """Each query's input read again (what was cached was read once already, so a failure means the
    file changed since: one line naming it)."""
    key = modality.spec.record_key
    raws = []
    for sid in ids:
        try:
            raws.append(modality.load(records[sid][key]))
        except Exception as e:  # noqa: BLE001 - any decoder failure names the sample
            raise OneEncoderError(f"{sid}: cannot read its {key!r} again for the robustness evaluation ({e}); "
                                  "rebuild the cache if the file changed") from None
    return raws


@torch.no_grad()
def _corrupted(model: OneEncoderModel, modality: Modality, backbone: torch.nn.Module, raws: list[Any],
               ids: list[str], kind: str, strength: float, batch_size: int, bar: Any) -> tuple[torch.Tensor, int]:
    """Unit embeddings ``[N, d]`` of the corrupted queries, and how many could not be encoded.

    Such an input (a corruption its own preprocessing refuses) embeds as the zero vector: it
    carries no information, so it ranks the gallery in gallery order.
    """
    device = next(model.parameters()).device
    out = torch.zeros(len(raws), model.embed_dim)
    failed = 0
    for start in range(0, len(raws), batch_size):
        items, where = [], []
        for i in range(start, min(start + batch_size, len(raws))):
            try:
                items.append(modality.preprocess(modality.corrupt(raws[i], kind, strength,
                                                                  corruption_rng(ids[i], kind, strength))))
                where.append(i)
            except Exception as e:  # noqa: BLE001 - this input's problem: counted, reported as n_failed
                if isinstance(e, OneEncoderError) and not isinstance(e, SampleError):
                    raise  # an unknown kind or a missing dependency is the run's problem
                failed += 1
        if items:
            tokens, mask = modality.featurize(backbone, items)
            # The cache holds fp16 features: round the same way, so strength 0 would give clean's numbers.
            emb = model(modality.spec.name, tokens.half().float().to(device), mask.to(device)).float().cpu()
            out[torch.tensor(where)] = emb
        bar.update(min(batch_size, len(raws) - start))
    return out.to(device), failed


def _row(result: dict[str, Any], clean: dict[str, float] | None, **fields: Any) -> dict[str, Any]:
    """One row: the metrics, their change from ``clean`` (None: this is the clean row, which also
    carries the chance level of its queries)."""
    metrics = {k: result["metrics"][k] for k in KEYS}
    change = {k: metrics[k] - clean[k] for k in KEYS} if clean is not None else {k: 0.0 for k in KEYS}
    row = {**fields, "metrics": metrics, "change": change, "n_queries": int(result["metrics"]["n_queries"])}
    if clean is None:
        row["chance"] = {k: result["chance"][k] for k in KEYS}
    return row


def _corrupted_rows(model: OneEncoderModel, modalities: dict[str, Modality], embedded: dict[str, _Embedded],
                    records: dict[str, dict], name: str, limit: int | None, batch_size: int,
                    progress: bool) -> list[dict[str, Any]]:
    """Clean and corrupted rows of every direction whose queries are ``name``'s."""
    modality = modalities[name]
    emb_q, groups_q, ids_q = embedded[name]
    keep = _limited(ids_q, limit)
    if modality.spec.dedupe_in_eval:  # identical inputs count once: encode only the one that counts
        keep = [keep[i] for i in _first_of_each_group([groups_q[i] for i in keep])]
    emb_q, groups_q, ids_q = emb_q[keep], [groups_q[i] for i in keep], [ids_q[i] for i in keep]
    targets = [b for b in embedded if b != name and set(groups_q) & set(embedded[b][1])]
    if not targets:
        return []
    dedupe_q = modality.spec.dedupe_in_eval

    def score(queries: torch.Tensor, b: str) -> dict[str, Any]:
        emb_b, groups_b, _ = embedded[b]
        return retrieval_between(queries, groups_q, emb_b, groups_b, dedupe_q, modalities[b].spec.dedupe_in_eval)

    scored = {b: score(emb_q, b) for b in targets}
    clean = {b: scored[b]["metrics"] for b in targets}
    rows = [_row(scored[b], None, direction=f"{name}→{b}", query=name, kind="clean", strength=None,
                 n_failed=0) for b in targets]
    variants = [(kind, s) for kind, strengths in modality.corruptions().items() for s in strengths]
    raws = _load_raws(modality, records, ids_q)
    backbone = modality.load_backbone().to(next(model.parameters()).device)
    with progress_bar(total=len(raws) * len(variants), desc=f"robustness {name}", unit="input",
                      enabled=progress) as bar:
        for kind, strength in variants:
            emb, failed = _corrupted(model, modality, backbone, raws, ids_q, kind, strength, batch_size, bar)
            rows += [_row(score(emb, b), clean[b], direction=f"{name}→{b}", query=name, kind=kind,
                          strength=strength, n_failed=failed) for b in targets]
    return sorted(rows, key=lambda r: r["direction"])  # each direction's rows together, clean first (stable)


def _caption_modality(modalities: dict[str, Modality]) -> str | None:
    return next((n for n, m in modalities.items() if m.spec.record_key == CAPTION_FIELD), None)


def _dropped_rows(modalities: dict[str, Modality], embedded: dict[str, _Embedded],
                  chosen: Sequence[str]) -> list[dict[str, Any]]:
    """Fused queries of records with several input modalities against the captions, each part dropped in turn."""
    target = _caption_modality(modalities)
    parts = [n for n in embedded if n != target]
    if target not in embedded or len(parts) < 2:
        return []
    where = {n: {sid: i for i, sid in enumerate(embedded[n][2])} for n in parts}
    ids = [sid for sid in embedded[parts[0]][2] if all(sid in where[n] for n in parts)]
    if not ids:
        return []
    unit = {n: embedded[n][0][[where[n][sid] for sid in ids]] for n in parts}
    groups = [embedded[parts[0]][1][where[parts[0]][sid]] for sid in ids]
    emb_t, groups_t, _ = embedded[target]
    if not set(groups) & set(groups_t):
        return []

    def fused(names: list[str]) -> dict[str, Any]:
        query = F.normalize(torch.stack([unit[n] for n in names]).sum(0), dim=-1)
        return retrieval_between(query, groups, emb_t, groups_t, False, modalities[target].spec.dedupe_in_eval)

    label = "+".join(parts)
    whole = fused(parts)
    every = whole["metrics"]
    rows = [_row(whole, None, direction=f"{label}→{target}", parts=parts, dropped=None)]
    for gone in parts:
        if gone in chosen:
            rest = [n for n in parts if n != gone]
            rows.append(_row(fused(rest), every, direction=f"{label}→{target}", parts=parts, dropped=gone))
    return rows


def evaluate_robustness(
    model: OneEncoderModel,
    modalities: dict[str, Modality],
    records: list[dict],
    cache_root: str | Path,
    split: str = "test",
    only: Sequence[str] | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Retrieval on ``split`` with each query modality corrupted at each strength, and with parts of
    multi-modality records dropped (see the module docstring).

    Args:
        only: Query modalities to corrupt, and parts to drop (default: all that can be).
        limit: Re-encode at most this many queries per modality (the same ones in every run,
            see :func:`_limited`); their clean row is computed on the same queries.
        batch_size: Inputs per backbone forward.

    Returns:
        ``split``, ``keys`` (the metrics), ``seeding``, ``limit``; ``corrupted``: one row per
        direction and (kind, strength), the clean row first (with ``chance``), each with ``metrics``,
        ``change`` (corrupted minus clean: negative when a metric falls), ``n_queries`` and ``n_failed``;
        ``dropped``: the fused query's row and one per dropped part; ``not_corrupted``: the
        evaluated modalities left clean, with why.
    """
    rows = [r for r in records if r.get("split") == split]
    if not rows:
        raise OneEncoderError(f"the manifest has no {split!r} samples")
    chosen = list(only) if only is not None else corruptible(modalities)
    embedded = embed_split(model, modalities, records, cache_root, split)  # as plain eval embeds them
    by_id = {r["id"]: r for r in rows}
    corrupted: list[dict[str, Any]] = []
    for name in chosen:
        if name in embedded:
            corrupted += _corrupted_rows(model, modalities, embedded, by_id, name, limit, batch_size, progress)
    skipped = {n: ("offers no corruptions" if not m.corruptions() else "not chosen") for n, m in modalities.items()
               if n not in chosen}
    return {"split": split, "keys": list(KEYS), "seeding": SEEDING, "limit": limit, "corrupted": corrupted,
            "dropped": _dropped_rows(modalities, embedded, chosen), "not_corrupted": skipped}


def _cells(row: dict[str, Any], baseline: bool) -> list[str]:
    return [format_number(row["metrics"][k]) + ("" if baseline else f" ({format_number(row['change'][k], True)})")
            for k in KEYS]


def _render(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(line[col]) for line in [header, *body]) for col in range(len(header))]
    lines = [header, ["-" * w for w in widths], *body]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
                     for line in lines)


def format_robustness(result: dict[str, Any]) -> str:
    """The robustness results as text: one table of corrupted queries, one of dropped parts.

    Each cell is the metric and, in brackets, its change from the clean row above it.
    """
    out = []
    if result["corrupted"]:
        body = [[r["direction"], "clean" if r["kind"] == "clean" else f"{r['kind']} {r['strength']:g}",
                 *_cells(r, r["kind"] == "clean")] for r in result["corrupted"]]
        out.append(_render(["direction", "corruption", *KEYS], body))
    if result["dropped"]:
        body = [[r["direction"], "all parts" if r["dropped"] is None else f"without {r['dropped']}",
                 *_cells(r, r["dropped"] is None)] for r in result["dropped"]]
        out.append(_render(["fused query", "parts", *KEYS], body))
    return "\n\n".join(out) if out else "no query modality could be corrupted or dropped"
