"""Where a run's numbers go while it trains: ``[train] report_to``.

The trainer hands every logged row to a list of reporters and knows nothing else about
them. ``metrics.jsonl`` is always written: it is the run's record, which resume trims,
the curve PNG is drawn from and ``oneencoder runs`` reads. ``"tensorboard"`` adds
TensorBoard event files in ``<run>/tensorboard/`` (open_clip's ``--report-to``).

Rows are flat dicts of numbers. A step row holds ``step``, ``epoch``, ``lr``, every
scalar of the loss dict (``loss``, ``logit_scale``...) and the sampler's ``curriculum/*``
shares; a validation row holds ``epoch``, ``step`` and ``val/*`` metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Protocol

from ..fileio import append_jsonl
from ..progress import status

#: The run's log of steps and validations, in the run folder.
METRICS = "metrics.jsonl"
#: Folder of TensorBoard event files, in the run folder.
TENSORBOARD_DIR = "tensorboard"


class Reporter(Protocol):
    """Receives a run's rows as they are logged (rank 0 only)."""

    def step(self, row: dict[str, float]) -> None: ...

    def validation(self, row: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlReporter:
    """One JSON line per row in ``metrics.jsonl`` (each line written with one ``write``)."""

    def __init__(self, run_dir: Path, resume_step: int = 0) -> None:
        self.path = Path(run_dir) / METRICS

    def step(self, row: dict[str, float]) -> None:
        append_jsonl(self.path, row)

    validation = step

    def close(self) -> None:
        """Nothing to flush: every row is on disk when ``step`` returns."""


class TensorBoardReporter:
    """Scalars for TensorBoard, every one at its global step.

    Step rows go under ``train/`` (plus ``train/temperature`` = 1 / ``logit_scale``),
    ``curriculum/*`` and ``val/*`` keep their names. A resumed run purges the events past
    its step, as ``metrics.jsonl`` drops those rows: the resumed run logs them again.
    """

    def __init__(self, run_dir: Path, resume_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

        # A start at step s drops the events at steps > s of earlier sessions when read back.
        self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=resume_step + 1)

    def step(self, row: dict[str, float]) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key in ("step", "epoch"):
                continue
            self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
        if row.get("logit_scale"):
            self.writer.add_scalar("train/temperature", 1.0 / row["logit_scale"], step)

    def validation(self, row: dict[str, float]) -> None:
        step = int(row["step"])
        self.writer.add_scalar("val/epoch", row["epoch"], step)  # where each epoch ends, in steps
        for key, value in row.items():
            if key.startswith("val/"):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


REPORTERS: dict[str, Callable[[Path, int], Reporter]] = {"jsonl": JsonlReporter,
                                                         "tensorboard": TensorBoardReporter}


def make_reporters(names: list[str], run_dir: str | Path, resume_step: int = 0) -> list[Reporter]:
    """The reporters of ``[train] report_to``; ``jsonl`` always, whether listed or not.

    A reporter whose package is missing is skipped with a one-line hint naming the install.
    """
    out: list[Reporter] = [JsonlReporter(Path(run_dir), resume_step)]
    for name in dict.fromkeys(names):
        if name == "jsonl":
            continue
        try:
            out.append(REPORTERS[name](Path(run_dir), resume_step))
        except ImportError:  # the reporter's package (named as the reporter) is not installed
            status(f"[train] report_to lists {name!r}, but it is not installed: pip install {name} "
                   "(training goes on with metrics.jsonl only)")
    return out


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(step rows, validation rows)`` of a ``metrics.jsonl``; a line cut by a kill is skipped."""
    steps, vals = [], []
    path = Path(path)
    if not path.is_file():
        return steps, vals
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            (vals if "val/score" in row else steps if "loss" in row else []).append(row)
    return steps, vals
