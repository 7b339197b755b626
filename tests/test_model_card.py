"""The model card every stage writes into its model directory: its sections, and numbers equal to
what `oneencoder eval` reports for the same model and split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oneencoder.cli.main import app
from oneencoder.evaluation.metrics import format_number
from oneencoder.evaluation.model_card import CARD, NEAR_CHANCE, build_model_card, write_model_card

runner = CliRunner()
SECTIONS = ("## What it embeds", "## Backbones (frozen) and their licences", "## Training data, stage by stage",
            "## Held-out results", "## Known limitations (measured)", "## How to load it")


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def card(trained_model) -> str:
    path = Path(trained_model["dir"]) / CARD
    assert path.is_file(), "the stage did not write its model card"
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def eval_json(trained_model, small_manifest, small_cache, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("card-eval") / "eval.json"
    result = invoke("--quiet", "eval", "--model", trained_model["dir"], "--manifest", small_manifest,
                    "--cache-dir", small_cache, "--split", "test", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _card_rows(card: str) -> dict[str, list[str]]:
    """``{direction: [kind, R@1 cell, R@5 cell, R@10 cell, MRR cell, queries]}`` of the results tables."""
    rows = {}
    for line in card.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and "→" in cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


def test_the_card_has_every_section_and_the_facts_of_the_model(card, trained_model) -> None:
    for section in SECTIONS:
        assert section in card, section
    meta = json.loads((Path(trained_model["dir"]) / "oneencoder.json").read_text())
    assert f"shared {meta['embed_dim']}-wide embedding space" in card
    for name, info in meta["modalities"].items():
        assert f"| {name} | `{info['backbone']}` | {info['feature_dim']} | Apache-2.0 |" in card  # MiniLM, Lite0
    stage = meta["stages"][0]
    data_row = next(line for line in card.splitlines() if line.startswith(f"| {stage['name']} |"))
    assert f"| {stage['n_train']} | {stage['n_val']} | image 14, text 14 |" in data_row
    assert str(trained_model["config"].data.manifest) in data_row
    assert "GPL-2 (Debian tuxpaint-stamps-default)" in data_row  # the stamps' licence, from where they lie
    assert f'oneencoder.load("{trained_model["dir"]}")' in card and 'm.encode("text", ["A badger."])' in card


def test_card_numbers_equal_the_eval_json(card, eval_json) -> None:
    rows = _card_rows(card)
    assert set(rows) == set(eval_json["directions"]) == {"image→text", "text→image"}
    for direction, result in eval_json["directions"].items():
        kind, *cells, queries = rows[direction]
        assert kind == "trained" and int(queries) == int(result["metrics"]["n_queries"])
        for key, cell in zip(("R@1", "R@5", "R@10", "MRR"), cells):
            low, high = result["intervals"][key]
            expected = (f"{format_number(result['metrics'][key])} [{format_number(low)}, {format_number(high)}] "
                        f"(chance {format_number(result['chance'][key])})")
            assert cell == expected, (direction, key)


def test_limitations_follow_the_numbers(card, eval_json) -> None:
    limits = card.split("## Known limitations (measured)")[1].split("##")[0]
    for direction, result in eval_json["directions"].items():
        r1, chance = result["metrics"]["R@1"], result["chance"]["R@1"]
        line = f"{direction} R@1 {format_number(r1)} is near chance ({format_number(chance)}) on held-out data"
        assert (line in limits) == (r1 < NEAR_CHANCE * chance), (direction, r1, chance)
    # 13-14 test queries per direction (captions count once): too few to rank runs, and the card says so.
    counts = sorted(int(r["metrics"]["n_queries"]) for r in eval_json["directions"].values())
    assert f"Stage image_text: {counts[0]}-{counts[-1]} test queries per direction (under 100); one query moves " \
           f"R@1 by up to {100 / counts[0]:.1f} points" in limits


def test_rewriting_the_card_is_atomic_and_reproducible(trained_model, card, tmp_path: Path) -> None:
    model_dir = Path(trained_model["dir"])
    assert build_model_card(model_dir) == card  # a stage's card is the card of its directory
    before = sorted(p.name for p in model_dir.iterdir())
    assert write_model_card(model_dir) == model_dir / CARD
    assert sorted(p.name for p in model_dir.iterdir()) == before  # no temporary file left beside it


def test_info_points_to_the_card(trained_model) -> None:
    result = invoke("info", trained_model["dir"])
    assert result.exit_code == 0, result.output
    assert f"model card (licences, data, held-out results with intervals, limitations): " \
           f"{Path(trained_model['dir']) / CARD}" in result.stdout
