"""Training curves as a PNG, drawn from ``metrics.jsonl`` alone (so old runs can be drawn too).

Left: the training loss against the step. Right: the validation score (and, for one run,
every validation metric) against the epoch, with the kept (best) epoch marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..fileio import atomic_path
from ..progress import status
from .report import METRICS, read_metrics

#: The curve PNG every stage writes into its run folder at the end of training.
CURVES = "curves.png"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: figures go straight to PNG
    import matplotlib.pyplot as plt

    return plt


def best_epoch(vals: list[dict[str, Any]]) -> tuple[int, float] | None:
    """``(epoch, score)`` the trainer kept: the first epoch with the highest ``val/score``."""
    best = None
    for row in vals:  # strictly greater, as the trainer counts an improvement
        if best is None or row["val/score"] > best[1]:
            best = (int(row["epoch"]), float(row["val/score"]))
    return best


def plot_curves(runs: dict[str, str | Path], path: str | Path) -> Path:
    """Draw the runs' curves (label -> run folder) into one PNG at ``path``, written atomically."""
    plt = _pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 3.8))
    single = len(runs) == 1
    for i, (label, run_dir) in enumerate(runs.items()):
        steps, vals = read_metrics(Path(run_dir) / METRICS)
        colour = "black" if single else f"C{i}"  # one run: its metrics take the colours
        if steps:
            ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], color=colour, linewidth=1.2,
                         label=label)
        if not vals:
            continue
        epochs = [r["epoch"] for r in vals]
        ax_val.plot(epochs, [r["val/score"] for r in vals], color=colour, linewidth=2.2, marker="o",
                    markersize=3, label="score" if single else label)
        if single:  # every metric of the one run, thin, under its score
            for key in (k for k in vals[-1] if k.startswith("val/") and k != "val/score"):  # as logged
                ax_val.plot(epochs, [r.get(key) for r in vals], linewidth=0.9, alpha=0.8, label=key[4:])
        kept = best_epoch(vals)
        if kept is not None:
            ax_val.scatter([kept[0]], [kept[1]], s=90, facecolors="none", edgecolors=colour, zorder=3)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_val.set_xlabel("epoch (circle: the kept epoch)")
    ax_val.set_ylabel("validation")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(" vs ".join(runs) if not single else next(iter(runs)), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def write_run_curves(run_dir: str | Path, label: str | None = None) -> Path | None:
    """``<run>/curves.png`` from the run's ``metrics.jsonl``; None when it logged nothing yet.

    Without matplotlib the run goes on: one line says how to install it.
    """
    run_dir = Path(run_dir)
    if not (run_dir / METRICS).is_file():
        return None
    try:
        return plot_curves({label or run_dir.name: run_dir}, run_dir / CURVES)
    except ImportError:
        status("no training-curve PNG: matplotlib is not installed (pip install matplotlib)")
        return None
