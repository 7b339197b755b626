"""One results table for a model directory: every stage's held-out retrieval, trained and
emergent pairs, with chance levels, as text, JSON and a PNG bar chart.

Rows come from ``<model>/runs/<stage>/test.json`` (written by each stage), so the table
reports exactly what each stage measured on its own held-out split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from ..data.sources import HELDOUT_LABELS
from ..fileio import write_json_atomic
from ..modality import MODALITIES
from ..model.checkpoint import read_meta
from .metrics import format_number

# What each held-out subset means: the ``heldout`` values the shipped data builders write.
SUBSET_LABELS = HELDOUT_LABELS


def _subset_order(subset: str) -> int:
    return list(SUBSET_LABELS).index(subset) if subset in SUBSET_LABELS else len(SUBSET_LABELS)


def _metric_style(name: str, modalities: dict[str, dict]) -> str:
    """``ranking`` for modalities reported as MRR/Hits@K (recorded by their spec), else ``recall``."""
    recorded = modalities.get(name, {}).get("metric_style")
    if recorded is None and name in MODALITIES:  # a model saved before the style was recorded
        recorded = MODALITIES.get(name).spec.metric_style
    return recorded or "recall"


def direction_kind(direction: str, pair: list[str]) -> str:
    """``trained`` when a direction joins exactly the stage's pair, else ``emergent``."""
    return "trained" if set(direction.split("→")) == set(pair) else "emergent"


def _row(stage: str, pair: list[str], direction: str, subset: str, result: dict,
         modalities: dict[str, dict]) -> dict[str, Any]:
    a, b = direction.split("→")
    m, c = result["metrics"], result["chance"]
    ranking = any(_metric_style(n, modalities) == "ranking" for n in (a, b))
    return {
        "stage": stage, "direction": direction, "subset": subset,
        "kind": direction_kind(direction, pair),
        "metric_style": "ranking" if ranking else "recall",
        "R@1": m["R@1"], "R@10": m["R@10"], "MRR": m["MRR"],
        "chance_R@1": c["R@1"], "chance_R@10": c["R@10"], "chance_MRR": c["MRR"],
        "R@1_over_chance": m["R@1"] / c["R@1"] if c["R@1"] > 0 else float("inf"),
        "n_queries": result.get("n_query_samples"),
    }


def stage_tests(model_dir: str | Path, meta: dict[str, Any] | None = None) -> Iterator[tuple[dict, dict]]:
    """``(stage entry, test results)`` of every stage whose ``runs/<stage>/test.json`` exists, in training order."""
    model_dir = Path(model_dir)
    for entry in (meta or read_meta(model_dir))["stages"]:
        path = model_dir / "runs" / entry["name"] / "test.json"
        if path.is_file():
            yield entry, json.loads(path.read_text(encoding="utf-8"))["test"]


def stage_directions(entry: dict, test: dict) -> list[tuple[str, str, dict]]:
    """``(subset, direction, result)`` a stage reports: Stage 1 its own pair; an add-modality
    stage every direction that involves its new modality (the trained pair and the emergent
    ones), on the whole test split or, if its records mark held-out subsets, on each subset."""
    pair = entry["pair"]
    if "projection" in entry["trainable"]:  # Stage 1: its own pair only
        wanted = lambda ends: ends <= set(pair)  # noqa: E731
    else:  # add-modality: everything involving the new modality
        new = set(entry["trainable"])
        wanted = lambda ends: bool(ends & new)  # noqa: E731
    # With held-out subsets (e.g. unseen poses vs unseen objects) the pooled split mixes two
    # different questions, so only the subsets are reported.
    parts = (sorted(test["subsets"].items(), key=lambda kv: (_subset_order(kv[0]), kv[0]))
             if test.get("subsets") else [("all", test["directions"])])
    return [(subset, direction, result) for subset, directions in parts for direction, result in directions.items()
            if wanted(set(direction.split("→")))]


def model_results(model_dir: str | Path) -> list[dict[str, Any]]:
    """Rows for every stage of the model, in training order (see :func:`stage_directions`)."""
    meta = read_meta(model_dir)
    return [_row(entry["name"], entry["pair"], direction, subset, result, meta["modalities"])
            for entry, test in stage_tests(model_dir, meta) for subset, direction, result in stage_directions(entry, test)]


def format_results(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table; molecules show MRR and Hits@K, the rest R@K."""
    head = f"{'stage':14s} {'direction':16s} {'kind':8s} {'held out':11s} {'R@1 / Hits@1':>22s} " \
           f"{'R@10 / Hits@10':>22s} {'MRR':>22s} {'R@1 x chance':>12s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cell = lambda k: f"{format_number(r[k])} (chance {format_number(r['chance_' + k])})"  # noqa: E731
        mrr = cell("MRR") if r["metric_style"] == "ranking" else ""
        lines.append(f"{r['stage']:14s} {r['direction']:16s} {r['kind']:8s} {r['subset']:11s} {cell('R@1'):>22s} "
                     f"{cell('R@10'):>22s} {mrr:>22s} {r['R@1_over_chance']:>11.1f}x")
    used = [k for k in SUBSET_LABELS if k != "all" and any(r["subset"] == k for r in rows)]
    if used:
        lines.append("held out: " + "; ".join(f"{k} = {SUBSET_LABELS[k]}" for k in used))
    return "\n".join(lines)


def plot_results(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Horizontal bars of held-out R@1 per direction, chance level as a black tick."""
    import matplotlib

    matplotlib.use("Agg")  # headless: straight to PNG
    import matplotlib.pyplot as plt

    path = Path(path)
    labels = [f"{r['direction']}  [{r['stage']}{'' if r['subset'] == 'all' else ': ' + SUBSET_LABELS.get(r['subset'], r['subset'])}]"
              for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.4))
    ys = range(len(rows))[::-1]
    colours = ["#2b6cb0" if r["kind"] == "trained" else "#dd6b20" for r in rows]
    ax.barh(list(ys), [r["R@1"] for r in rows], color=colours)
    ax.scatter([r["chance_R@1"] for r in rows], list(ys), marker="|", s=160, color="black", zorder=3)
    for y, r in zip(ys, rows):
        ax.text(r["R@1"] + 0.01, y, f"{r['R@1_over_chance']:.1f}x chance", va="center", fontsize=7)
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.set_xlabel("held-out R@1 (Hits@1 for molecules); black tick = chance")
    ax.set_xlim(0, 1.15)  # room for the "x chance" labels
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#2b6cb0", "#dd6b20")]
    ax.legend(handles, ["trained pair", "emergent pair"], loc="lower right", fontsize=8)
    ax.set_title("oneencoder: retrieval on held-out data, every modality pair")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_results(model_dir: str | Path, out_dir: str | Path) -> tuple[list[dict[str, Any]], Path, Path]:
    """Collect the rows, write ``results.json`` and ``results.png`` into ``out_dir``."""
    rows = model_results(model_dir)
    out_dir = Path(out_dir)
    json_path = out_dir / "results.json"
    write_json_atomic(json_path, {"model": str(model_dir), "rows": rows})
    return rows, json_path, plot_results(rows, out_dir / "results.png")
