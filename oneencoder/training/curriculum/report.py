"""An explainable curriculum report: one HTML page with PNG figures.

Figures: difficulty distribution per scorer, Spearman correlations between
scorers, the pacing schedule over training steps, the 12 easiest and 12
hardest samples as thumbnails with their captions and the measurements that
made them easy or hard, and the 12 pairs most suspect of being wrong.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError
from ...fileio import atomic_path, write_text_atomic
from .difficulty import DifficultyTable
from .pacers import create_pacer, list_pacers, schedule
from .scorers import rank_normalise, trust_source


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: figures go straight to PNG
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def plot_distributions(table: DifficultyTable, path: Path) -> None:
    plt = _pyplot()
    names = list(table.scores)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.hist(table.scores[name], bins=30, color="#4c72b0")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("score (higher = harder)", fontsize=8)
    axes[0][0].set_ylabel("samples")
    _save(fig, path)


def scorer_correlations(table: DifficultyTable) -> tuple[list[str], np.ndarray]:
    """Spearman correlation matrix between scorers (Pearson of ranks)."""
    names = list(table.scores)
    ranks = np.stack([rank_normalise(table.scores[n]) for n in names])
    with np.errstate(invalid="ignore"):
        corr = np.corrcoef(ranks) if len(names) > 1 else np.ones((1, 1))
    return names, np.nan_to_num(np.atleast_2d(corr))


def plot_correlations(table: DifficultyTable, path: Path) -> None:
    plt = _pyplot()
    names, corr = scorer_correlations(table)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 1.0 + 0.8 * len(names)))
    im = ax.imshow(corr, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8, label="Spearman ρ")
    _save(fig, path)


def plot_schedule(pacer_name: str, pacer_options: dict, total_steps: int, hn: tuple[float, float], path: Path) -> None:
    plt = _pyplot()
    fig, (ax, ax_all) = plt.subplots(1, 2, figsize=(12, 3.4))
    for name in list_pacers():  # every pacer's window edges, to compare with the stage's choice
        w = schedule(create_pacer(name), total_steps)
        (line,) = ax_all.plot(np.arange(total_steps), w[:, 1], label=name, linewidth=1.2)
        if np.any(w[:, 0] > 0):
            ax_all.plot(np.arange(total_steps), w[:, 0], linestyle=":", color=line.get_color(), linewidth=1)
    ax_all.set_title("all pacers (solid: hardest available, dotted: easiest)", fontsize=9)
    ax_all.set_xlabel("optimizer step")
    ax_all.set_ylim(-0.02, 1.02)
    ax_all.legend(fontsize=7, ncol=2, loc="lower right")
    windows = schedule(create_pacer(pacer_name, **pacer_options), total_steps)
    steps = np.arange(total_steps)
    ax.fill_between(steps, windows[:, 0], windows[:, 1], alpha=0.3, color="#4c72b0", label=f"available ({pacer_name})")
    ax.plot(steps, windows[:, 1], color="#4c72b0")
    ax.plot(steps, windows[:, 0], color="#4c72b0", linestyle=":")
    share = hn[0] + (hn[1] - hn[0]) * steps / max(1, total_steps - 1)
    if hn[1] > 0:
        ax.plot(steps, share, color="#c44e52", label="hard-negative share of batch")
    ax.set_title(f"this stage: {pacer_name}", fontsize=9)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("difficulty quantile (easy 0 → hard 1)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def _thumb(record: dict, size: int = 96) -> np.ndarray:
    """A thumbnail of the first file in ``record`` that PIL can read as an image (blank if none)."""
    from PIL import Image

    from ...modality import file_fields

    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    for key in sorted(file_fields()):
        try:
            with Image.open(record[key]) as opened:
                img = opened.convert("RGBA")
        except Exception:  # not an image, or missing: a report never stops for a thumbnail
            continue
        img.thumbnail((size, size))
        canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2), img)
        break
    return np.asarray(canvas)


def plot_extremes(table: DifficultyTable, combined: np.ndarray, records: dict[str, dict], which: str,
                  path: Path, prefer: list[str], n: int = 12, title: str | None = None, limit: int = 3) -> list[int]:
    """Thumbnails of the n easiest or hardest samples with caption and measurements."""
    plt = _pyplot()
    order = np.argsort(combined, kind="stable")
    picks = list(order[:n] if which == "easiest" else order[::-1][:n])
    cols = 6
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.3, rows * 3.1), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, picks):
        rec = records[table.ids[i]]
        ax.imshow(_thumb(rec))
        caption = str(rec.get("caption", ""))
        caption = caption if len(caption) <= 34 else caption[:32] + "…"
        facts = _top_measurements(table, i, prefer, limit)
        ax.set_title(f"{caption}\nscore {combined[i]:.2f}\n{facts}", fontsize=6.5)
    fig.suptitle(title or f"{n} {which} samples", fontsize=11)
    _save(fig, path)
    return [int(i) for i in picks]


def _top_measurements(table: DifficultyTable, i: int, prefer: list[str], limit: int = 3) -> str:
    """Measurements of the scorers the stage weights first: they are why this sample ranks here."""
    scorers = [s for s in prefer if s in table.measurements] + [s for s in table.measurements if s not in prefer]
    parts = [f"{name}={float(arr[i]):.3g}" for s in scorers for name, arr in table.measurements[s].items()]
    return "\n".join(parts[:limit])


def _trust_in(table: DifficultyTable) -> tuple[str, str] | None:
    """``(scorer, measurement)`` of the trust source (``trust_source``) if the table holds it."""
    try:
        scorer, measurement = trust_source(table.scores)
    except ConfigError:
        return None
    return (scorer, measurement) if measurement in table.measurements.get(scorer, {}) else None


def _suspect_section(table: DifficultyTable, trust: tuple[str, str] | None, suspects: list[int], rows: Any) -> str:
    if not suspects or trust is None:
        return ""
    scorer, measurement = trust
    clean = table.measurements[scorer][measurement]
    return (f"<h2>12 most suspect pairs</h2><p>By <code>{scorer}</code>: the two sides agree least "
            f"(CSLS in frozen spaces, cross-fitted probe). Estimated share of wrong pairs: "
            f"<b>{1 - float(np.mean(clean)):.1%}</b> (mean of 1 − clean probability). The <code>trust</code> "
            f"weighting uses each pair's clean probability as its loss weight.</p>"
            f"<img src=\"suspects.png\" alt=\"suspects\"><table><tr><th>id</th><th>caption</th><th>score</th>"
            f"<th>measurements</th></tr>{rows(suspects)}</table>")


def write_report(table: DifficultyTable, records: list[dict], out_dir: str | Path, *, stage_name: str,
                 weights: dict[str, float], pacer: str, pacer_options: dict, total_steps: int,
                 hard_negatives: tuple[float, float] = (0.0, 0.0)) -> Path:
    """Write ``index.html`` and its PNG figures into ``out_dir``; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_id = {r["id"]: r for r in records}
    combined = table.combined(weights)
    plot_distributions(table, out / "difficulty_distribution.png")
    plot_correlations(table, out / "scorer_correlations.png")
    plot_schedule(pacer, pacer_options, total_steps, hard_negatives, out / "pacing_schedule.png")
    easiest = plot_extremes(table, combined, by_id, "easiest", out / "easiest.png", list(weights))
    hardest = plot_extremes(table, combined, by_id, "hardest", out / "hardest.png", list(weights))
    suspects: list[int] = []
    trust = _trust_in(table)
    if trust is not None:  # which pairs look wrong, and the measurements behind it
        suspects = plot_extremes(table, table.scores[trust[0]], by_id, "hardest", out / "suspects.png",
                                 [trust[0]], title="12 most suspect pairs (least agreement)", limit=4)

    def rows(idx: list[int]) -> str:
        lines = []
        for i in idx:
            rec = by_id[table.ids[i]]
            facts = ", ".join(f"{k}={v:.3g}" for k, v in table.explain(i).items() if isinstance(v, (int, float)))
            lines.append(f"<tr><td>{html.escape(table.ids[i])}</td><td>{html.escape(str(rec.get('caption', '')))}</td>"
                         f"<td>{combined[i]:.3f}</td><td><small>{html.escape(facts)}</small></td></tr>")
        return "\n".join(lines)

    weight_text = ", ".join(f"{k} × {v:g}" for k, v in weights.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Curriculum report: {html.escape(stage_name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
img{{max-width:100%;border:1px solid #ddd;margin:0.5em 0}} td,th{{padding:2px 8px;border-bottom:1px solid #eee;
text-align:left;font-size:13px}}</style></head><body>
<h1>Curriculum report: {html.escape(stage_name)}</h1>
<p>{len(table.ids)} training pairs. Combined difficulty = weighted rank average of {html.escape(weight_text)}.
Pacer <b>{html.escape(pacer)}</b> over {total_steps} steps; hard-negative share {hard_negatives[0]:g} → {hard_negatives[1]:g}.</p>
<h2>Difficulty distribution per scorer</h2><img src="difficulty_distribution.png" alt="distributions">
<h2>Correlation between scorers</h2><img src="scorer_correlations.png" alt="correlations">
<h2>Pacing schedule</h2><img src="pacing_schedule.png" alt="pacing schedule">
<h2>12 easiest samples</h2><img src="easiest.png" alt="easiest"><table><tr><th>id</th><th>caption</th><th>score</th><th>measurements</th></tr>{rows(easiest)}</table>
<h2>12 hardest samples</h2><img src="hardest.png" alt="hardest"><table><tr><th>id</th><th>caption</th><th>score</th><th>measurements</th></tr>{rows(hardest)}</table>
{_suspect_section(table, trust, suspects, rows)}
</body></html>
"""
    write_text_atomic(out / "index.html", page)
    return out / "index.html"
