"""A model card (``README.md``) for a model directory, written from the facts it already holds.

Everything on the card comes from ``oneencoder.json`` (modalities, backbones, stage history
with each stage's config and pair counts), ``runs/<stage>/test.json`` (held-out metrics,
chance levels and bootstrap intervals, as ``oneencoder eval`` computes them) and the
modality classes (their backbones' licences, via ``licence_for``). Each stage rewrites it
when it finishes, so the card always describes the model as it is.

Numbers are shown with :func:`~oneencoder.evaluation.metrics.format_number`, as ``eval``
prints them, so the card and ``eval`` on the same model and split show the same digits.

Example:
    >>> write_model_card("outputs/demo/model")
    PosixPath('outputs/demo/model/README.md')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import OneEncoderError
from ..fileio import write_text_atomic
from ..modality import modality_class_for
from ..model.checkpoint import read_meta
from .metrics import MIN_RANKING_QUERIES, format_interval, format_number
from .summary import SUBSET_LABELS, direction_kind, stage_directions, stage_tests

CARD = "README.md"
#: Columns of the results tables: those ``oneencoder eval`` prints.
COLUMNS = ("R@1", "R@5", "R@10", "MRR")
#: A direction whose R@1 is under this multiple of chance is listed as a limitation.
NEAR_CHANCE = 2.0
# Data whose licence the records do not state, recognised by where its files lie (DESIGN.md).
_KNOWN_DATA = {
    "/usr/share/tuxpaint/stamps": "GPL-2 (Debian tuxpaint-stamps-default)",
    "/usr/share/openclipart": "public domain (Debian openclipart-png/-svg)",
}
_LICENCE_FIELDS = ("license", "licence")


def _backbone_licence(name: str, info: dict[str, Any]) -> tuple[str, str]:
    """``(licence, credit)`` the modality's class states for this backbone, or why it is unknown."""
    try:
        cls = modality_class_for(name, info)
    except OneEncoderError:
        return "unknown", f"the class {info.get('class', '?')} that defines it is not installed here"
    hook = getattr(cls, "licence_for", None)
    found = hook(info["backbone"], dict(info.get("options") or {})) if callable(hook) else None
    if not found:
        return "not stated", f"{cls.__name__} states no licence for this backbone; check its source"
    return found


def _data_licence(manifest: str | None) -> str:
    """The licences the manifest's records state, or the known source their files come from."""
    if not manifest or not Path(manifest).is_file():
        return "not known (manifest not found here)"
    stated: set[str] = set()
    sources: set[str] = set()
    with open(manifest, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            stated.update(str(record[k]) for k in _LICENCE_FIELDS if record.get(k))
            for value in record.values():
                if isinstance(value, str) and value.startswith("/"):
                    sources.update(text for root, text in _KNOWN_DATA.items() if value.startswith(root + "/"))
    found = sorted(stated | sources)
    return ", ".join(found) if found else "not stated in the records"


def _cell(result: dict, key: str) -> str:
    """``0.304 [0.236, 0.375] (chance 0.007)``: value, 95 % interval, chance, as ``eval`` shows them."""
    value = format_number(result["metrics"][key])
    bounds = result.get("intervals", {}).get(key)
    interval = f" {format_interval(bounds)}" if bounds else ""
    return f"{value}{interval} (chance {format_number(result['chance'][key])})"


def _anchor(entry: dict) -> str:
    frozen = [n for n in entry["pair"] if n not in entry["trainable"]]
    return f"anchor: {frozen[0]}, frozen" if frozen else "both sides trained"


def _test_counts(entry: dict, test: dict) -> str:
    """Test samples of each modality of the stage's pair (the queries of its directions)."""
    counts = {}
    for direction, result in test["directions"].items():
        start = direction.split("→")[0]
        if start in entry["pair"] and "n_query_samples" in result:
            counts[start] = result["n_query_samples"]
    return ", ".join(f"{n} {counts[n]}" for n in entry["pair"] if n in counts) or "-"


def _limitations(rows: list[tuple[dict, str, str, dict]]) -> list[str]:
    """Lines measured from the held-out numbers: directions near chance, splits too small to rank."""
    lines = []
    small: dict[str, list[int]] = {}  # where -> query counts under MIN_RANKING_QUERIES
    for entry, subset, direction, result in rows:
        m, c = result["metrics"], result["chance"]
        where = f"stage {entry['name']}" + ("" if subset == "all" else f", {SUBSET_LABELS.get(subset, subset)}")
        bounds = result.get("intervals", {}).get("R@1")
        if m["R@1"] < NEAR_CHANCE * c["R@1"]:
            lines.append(f"{direction} R@1 {format_number(m['R@1'])} is near chance ({format_number(c['R@1'])}) "
                         f"on held-out data ({where}).")
        elif bounds and bounds[0] <= c["R@1"]:
            lines.append(f"{direction} R@1 {format_number(m['R@1'])}: its 95 % interval {format_interval(bounds)} "
                         f"reaches chance ({format_number(c['R@1'])}) ({where}).")
        if int(m["n_queries"]) < MIN_RANKING_QUERIES:
            small.setdefault(where, []).append(int(m["n_queries"]))
    for where, counts in small.items():
        fewest = max(min(counts), 1)
        spread = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
        lines.append(f"{where.capitalize()}: {spread} test queries per direction (under "
                     f"{MIN_RANKING_QUERIES}); one query moves R@1 by up to {100 / fewest:.1f} points, so compare "
                     "runs by their intervals.")
    return lines


def _example_input(name: str, info: dict) -> str:
    """A literal input for the loading snippet, from what the modality class declares."""
    try:
        cls = modality_class_for(name, info)
    except OneEncoderError:
        return '"..."'
    if cls.spec.typed_query_example:
        return json.dumps(cls.spec.typed_query_example)
    ext = cls.file_extensions[0] if cls.file_extensions else ""
    return json.dumps(f"path/to/input{ext}")


def build_model_card(model_dir: str | Path) -> str:
    """The card's Markdown text (see the module docstring for its sources)."""
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    held = meta["modalities"]
    tested = list(stage_tests(model_dir, meta))
    rows = [(entry, subset, direction, result) for entry, test in tested
            for subset, direction, result in stage_directions(entry, test)]
    p = meta["projection"]
    out = [f"# Model card: {model_dir.name}", "",
           "Written by oneencoder at the end of every training stage from `oneencoder.json` and "
           "`runs/<stage>/test.json`; edits here are overwritten.", "",
           "## What it embeds", "",
           f"{', '.join(held)} into one shared {meta.get('embed_dim', meta['d_model'])}-wide embedding space "
           f"(unit vectors: compare them by cosine). Each modality's frozen backbone feeds a small trained adapter; "
           f"one Universal Projection ({p.get('layers', '?')} layer(s), {p.get('heads', '?')} heads, "
           f"d_model {meta['d_model']}) maps every modality into the space.", "",
           "## Backbones (frozen) and their licences", "",
           "| modality | backbone | feature width | licence | credit |", "| --- | --- | --- | --- | --- |"]
    for name, info in held.items():
        licence, credit = _backbone_licence(name, info)
        out.append(f"| {name} | `{info['backbone']}` | {info['feature_dim']} | {licence} | {credit} |")
    out += ["", "## Training data, stage by stage", "",
            "| stage | pair | trained | manifest | train pairs | val pairs | test samples | data licence |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    tests = {entry["name"]: test for entry, test in tested}
    for entry in meta["stages"]:
        manifest = (entry.get("config") or {}).get("data", {}).get("manifest")
        test = tests.get(entry["name"])
        out.append(f"| {entry['name']} | {' + '.join(entry['pair'])}; {_anchor(entry)} | "
                   f"{', '.join(entry['trainable'])} | `{manifest}` | {entry.get('n_train', '-')} | "
                   f"{entry.get('n_val', '-')} | {_test_counts(entry, test) if test else '-'} | "
                   f"{_data_licence(manifest)} |")
    out += ["", "## Held-out results", "",
            "Each cell: value, 95 % bootstrap interval over queries, chance level; the numbers `oneencoder eval` "
            "prints for the same data and split. *Trained* directions join a stage's own pair; *emergent* ones "
            "join modalities never trained together.", ""]
    for entry, test in tested:
        picked = [r for r in rows if r[0] is entry]
        for subset in dict.fromkeys(subset for _, subset, _, _ in picked):
            label = "test split" if subset == "all" else f"test split, held out: {SUBSET_LABELS.get(subset, subset)}"
            out += [f"### {entry['name']} ({label})", "",
                    f"| direction | kind | {' | '.join(COLUMNS)} | queries |",
                    f"| --- | --- | {' | '.join('---' for _ in COLUMNS)} | --- |"]
            for _, part, direction, result in picked:
                if part == subset:
                    out.append(f"| {direction} | {direction_kind(direction, entry['pair'])} | "
                               f"{' | '.join(_cell(result, k) for k in COLUMNS)} | {int(result['metrics']['n_queries'])} |")
            out.append("")
    if not tested:
        out += ["No stage has finished its held-out test yet.", ""]
    limits = _limitations(rows)
    out += ["## Known limitations (measured)", "",
            *([f"- {line}" for line in limits] or [f"- No direction is under {NEAR_CHANCE:g}x chance on held-out data."]),
            "- Directions are only as good as their numbers above: data unlike the training data is not measured.", "",
            "## How to load it", "", "```python", "import oneencoder", "",
            f"m = oneencoder.load({json.dumps(str(model_dir))})", "emb = {}"]
    for name, info in held.items():
        out.append(f"emb[{json.dumps(name)}] = m.encode({json.dumps(name)}, [{_example_input(name, info)}])")
    names = [json.dumps(name) for name in held]
    if len(names) > 1:
        out.append(f"print(m.similarity(emb[{names[0]}], emb[{names[1]}]))  # cosine, a [1, 1] matrix")
    first = (meta["stages"][0].get("config") or {}).get("data", {}).get("manifest") if meta["stages"] else None
    out += ["```", "", "```bash", f"oneencoder info {model_dir}",
            f"oneencoder eval --model {model_dir} --manifest {first or '<manifest.jsonl>'} --split test", "```", ""]
    return "\n".join(out)


def write_model_card(model_dir: str | Path) -> Path:
    """Write ``<model_dir>/README.md`` atomically from the directory's facts; returns its path."""
    path = Path(model_dir) / CARD
    write_text_atomic(path, build_model_card(model_dir))
    return path
