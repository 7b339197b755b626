"""A labelled zero-shot report: which inputs, their true labels, and how well ``classify`` does.

* :func:`labelled_folder` and :func:`labelled_manifest` gather inputs and true labels from a
  folder of class subfolders (the layout ``data import`` reads) or a manifest field, and
  check them (files exist, at least two labels) before any model is loaded.
* :func:`classification_report` scores predictions as scikit-learn's
  ``classification_report`` does (precision, recall, F1 and support per class, macro and
  support-weighted averages; a class never predicted has precision 0), with top-1 and
  top-5 accuracy beside their chance levels, the confusion matrix and how far the
  probabilities are from calibrated (expected calibration error, ECE, over 10 bins).
* :func:`plot_confusion` draws the confusion matrix as a PNG, written atomically.

Example:
    >>> data = labelled_folder("photos/", model.modalities)
    >>> result = model.classify(data.modality, data.inputs, data.prompt_labels, template="A {}.")
    >>> report = classification_report(data.truth, result, data.labels)
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..data.folder_import import LABEL_FIELD, label_text, scan_folder
from ..data.manifest import CAPTION_FIELD, SPLITS, read_manifest
from ..data.table_import import check_file
from ..errors import OneEncoderError
from ..fileio import atomic_path
from ..modality import MODALITIES

if TYPE_CHECKING:
    from .zeroshot import Classification

#: Bins of the expected calibration error (as Guo et al., 2017).
ECE_BINS = 10
#: Largest matrix whose cells get their counts written in.
_ANNOTATE_UP_TO = 25


@dataclass
class LabelledInputs:
    """Inputs of one modality with their true labels.

    Attributes:
        modality: The inputs' modality.
        inputs: File paths (or values, for a modality that reads none).
        truth: The true label of each input.
        labels: The distinct labels, sorted: the classes to choose among.
        source: What was read, for the report ("photos/ (split test)").
        notes: One-line remarks (inputs skipped for lack of a label...).
    """

    modality: str
    inputs: list[str]
    truth: list[str]
    labels: list[str]
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def prompt_labels(self) -> list[str]:
        """The labels as words for the prompts (``hot_dog`` -> ``hot dog``)."""
        return [label_text(x) for x in self.labels]


def _pick_modality(present: Counter, modality: str | None, where: str) -> str:
    if modality is not None:
        if not present.get(modality):
            raise OneEncoderError(f"{where}: no {modality} inputs (found: {', '.join(present) or 'none'})")
        return modality
    if len(present) != 1:
        raise OneEncoderError(f"{where} holds inputs of {', '.join(sorted(present)) or 'no modality of this model'}; "
                              "name one with --modality")
    return next(iter(present))


def _pick_split(splits: list[str | None], split: str | None, where: str) -> tuple[str | None, str]:
    """The split to classify (None: all) and its description: default test when there is one."""
    if split == "all":
        return None, "all splits"
    if split is not None:
        if split not in SPLITS:
            raise OneEncoderError(f"--split {split!r}: use one of {', '.join(SPLITS)} or all")
        if split not in splits:
            raise OneEncoderError(f"{where}: no inputs in split {split!r}")
        return split, f"split {split}"
    if "test" in splits:
        return "test", "split test"
    return None, "all splits" if any(s is not None for s in splits) else "all files"


def _check(data: LabelledInputs, where: str) -> None:
    """Set the sorted labels; a missing file or fewer than two labels raise, an undecodable file is left out.

    The modality's own ``load`` decodes every file here (milliseconds each), so a broken file
    is a note now, not an error after the model has loaded.
    """
    modality, inputs = data.modality, data.inputs
    if MODALITIES.get(modality).spec.reads_files:
        missing = [x for x in inputs if not os.path.isfile(x)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise OneEncoderError(f"{where}: {modality} file not found: {missing[0]}{more}")
        loader = MODALITIES.get(modality)()
        problems = [check_file(modality, x, loader) for x in inputs]
        bad = [why for why in problems if why]
        if bad:
            data.notes.append(f"{len(bad)} {modality} file(s) that cannot be read left out, e.g. {bad[0]}")
            keep = [i for i, why in enumerate(problems) if not why]
            data.inputs, data.truth = [inputs[i] for i in keep], [data.truth[i] for i in keep]
    truth = data.truth
    labels = sorted(set(truth))
    if len(labels) < 2:
        raise OneEncoderError(f"{where}: {len(truth)} labelled input(s) with {len(labels)} label(s) "
                              f"({', '.join(labels) or 'none'}); classifying needs at least two")
    data.labels = labels


def labelled_folder(folder: str | Path, model_modalities: Sequence[str], modality: str | None = None,
                    split: str | None = None) -> LabelledInputs:
    """Inputs of a folder with class subfolders (and optional split folders and metadata ``label``).

    Args:
        folder: The folder.
        model_modalities: The model's modalities; files of those that read files count.
        modality: The inputs' modality (default: the one modality whose files the folder holds).
        split: ``train``, ``val``, ``test`` or ``all`` (default: test if there are split folders).

    Raises:
        OneEncoderError: no such folder, no files or labels, a missing file, fewer than two labels.
    """
    where = str(folder)
    readers = [m for m in model_modalities if m in MODALITIES and MODALITIES.get(m).spec.reads_files]
    scan = scan_folder(folder, [modality] if modality else readers)
    modality = _pick_modality(scan.modalities(), modality, where)
    samples = [s for s in scan.samples if modality in s.files]
    chosen, described = _pick_split([s.split for s in samples], split, where)
    samples = [s for s in samples if chosen is None or s.split == chosen]
    unlabelled = [s for s in samples if s.label is None]
    samples = [s for s in samples if s.label is not None]
    if not samples:
        raise OneEncoderError(f"{where}: no labelled {modality} files; put them in one subfolder per class "
                              f"(e.g. {where}/cat/1.png) or give a '{LABEL_FIELD}' column in metadata.csv")
    inputs, truth = [s.files[modality] for s in samples], [s.label for s in samples]
    data = LabelledInputs(modality, inputs, truth, [], f"{where} ({described})")
    if unlabelled:
        data.notes.append(f"{len(unlabelled)} {modality} file(s) outside any class subfolder left out")
    _check(data, where)
    return data


def labelled_manifest(path: str | Path, label_field: str, model_modalities: Sequence[str],
                      modality: str | None = None, split: str | None = None) -> LabelledInputs:
    """Inputs of a manifest whose rows hold ``label_field`` (default split: test when it has one).

    Raises:
        OneEncoderError: an unreadable manifest, no such field, a missing file, fewer than two labels.
    """
    rows = read_manifest(path)
    where = str(path)
    keys = {m: MODALITIES.get(m).spec.record_key for m in model_modalities if m in MODALITIES}
    labelled = [r for r in rows if r.get(label_field) not in (None, "")]
    if not labelled:
        raise OneEncoderError(f"{where}: no row has the field {label_field!r} (--label-field)")
    present = Counter(m for r in labelled for m, k in keys.items() if r.get(k) not in (None, ""))
    if modality is None:  # the label is about the inputs, not about the captions that name them
        present = Counter({m: n for m, n in present.items() if keys[m] != CAPTION_FIELD}) or present
    modality = _pick_modality(present, modality, where)
    labelled = [r for r in labelled if r.get(keys[modality]) not in (None, "")]
    chosen, described = _pick_split([r["split"] for r in labelled], split, where)
    labelled = [r for r in labelled if chosen is None or r["split"] == chosen]
    inputs, truth = [r[keys[modality]] for r in labelled], [str(r[label_field]) for r in labelled]
    data = LabelledInputs(modality, inputs, truth, [], f"{where} ({described}, labels from {label_field!r})")
    _check(data, where)
    return data


# ----- the report ------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by their counts."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.sum() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total / max(1, len(confidence)))


def classification_report(truth: Sequence[str], result: "Classification", labels: Sequence[str],
                          k: int = 5) -> dict[str, Any]:
    """Accuracy (top-1, top-k) with chance, per-class precision/recall/F1/support, confusion, calibration.

    Args:
        truth: True label of each input, one of ``labels``.
        result: ``classify``'s result, its columns in the order of ``labels``.
        labels: The class names, as the report shows them.
        k: The wider accuracy (top-5; fewer when there are fewer labels).
    """
    labels = list(labels)
    index = {x: i for i, x in enumerate(labels)}
    y = np.array([index[t] for t in truth])
    order = np.argsort(-result.scores, axis=1, kind="stable")
    pred = order[:, 0]
    k = min(k, len(labels))
    n = len(y)
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    tp, support, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    per_class = []
    for i, label in enumerate(labels):
        p, r = _ratio(tp[i], predicted[i]), _ratio(tp[i], support[i])
        per_class.append({"label": label, "precision": p, "recall": r, "f1": _ratio(2 * p * r, p + r),
                          "support": int(support[i])})
    averages = {}
    for name, weights in (("macro avg", np.ones(len(labels))), ("weighted avg", support.astype(float))):
        averages[name] = {key: float(np.average([c[key] for c in per_class], weights=weights))
                          for key in ("precision", "recall", "f1")}
        averages[name]["support"] = n
    correct = pred == y
    confidence = result.probs[np.arange(n), pred]
    return {
        "n": n, "labels": labels, "k": k,
        "accuracy": {"top1": float(correct.mean()), f"top{k}": float((order[:, :k] == y[:, None]).any(1).mean())},
        "chance": {"top1": 1 / len(labels), f"top{k}": k / len(labels),
                   "majority": float(support.max() / n)},
        "per_class": per_class, "averages": averages, "confusion": confusion.tolist(),
        "calibration": {"ece": expected_calibration_error(confidence, correct),
                        "mean_prob_right": float(confidence[correct].mean()) if correct.any() else None,
                        "mean_prob_wrong": float(confidence[~correct].mean()) if (~correct).any() else None},
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as text: accuracy with chance, then the per-class table (as scikit-learn prints it)."""
    acc, chance, k = report["accuracy"], report["chance"], report["k"]
    lines = [f"top-1 accuracy {acc['top1']:.3f} (chance {chance['top1']:.3f}, always the most common label "
             f"{chance['majority']:.3f})",
             f"top-{k} accuracy {acc[f'top{k}']:.3f} (chance {chance[f'top{k}']:.3f})", ""]
    width = max(12, *(len(c["label"]) for c in report["per_class"]))
    lines.append(f"{'':{width}s}  precision  recall     f1  support")
    for row in report["per_class"] + [{"label": name, **v} for name, v in report["averages"].items()]:
        if row["label"] == "macro avg":
            lines.append("")
        lines.append(f"{row['label']:{width}s}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  "
                     f"{row['support']:7d}")
    return "\n".join(lines)


def plot_confusion(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """The confusion matrix (rows: true label, columns: predicted; shade: share of the row) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless: straight to PNG
    import matplotlib.pyplot as plt

    counts = np.array(report["confusion"])
    labels = report["labels"]
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = min(24.0, 2.5 + 0.45 * len(labels))
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = range(len(labels))
    ax.set_xticks(list(ticks), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(list(ticks), labels, fontsize=8)
    if len(labels) <= _ANNOTATE_UP_TO:
        for i in ticks:
            for j in ticks:
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(title or f"top-1 accuracy {report['accuracy']['top1']:.3f} "
                          f"(chance {report['chance']['top1']:.3f}), {report['n']} inputs", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true label's inputs")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
