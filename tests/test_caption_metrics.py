"""Generation metrics against the reference implementations, on real Tux Paint captions."""

from __future__ import annotations

import random

import jiwer
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from oneencoder.evaluation.captions import bleu, caption_scores, caption_words, cer, cider_d, wer
from oneencoder.modalities.text import CAPTION_TEMPLATES, reworded


@pytest.fixture(scope="module")
def corpus(stamps: list[dict]) -> tuple[list[str], list[list[str]]]:
    """80 hypotheses against 1-3 real references each: some exact, some reworded, some wrong."""
    rng = random.Random(0)
    rows = [r for r in stamps if r["caption"]]
    picked = rng.sample(rows, 80)
    hypotheses, references = [], []
    for i, row in enumerate(picked):
        refs = [row["caption"]] + [reworded(row["caption"], rng.choice(CAPTION_TEMPLATES)) for _ in range(i % 3)]
        hyp = [row["caption"], reworded(row["caption"], rng.choice(CAPTION_TEMPLATES)),
               rng.choice(rows)["caption"], "A picture."][i % 4]
        hypotheses.append(hyp)
        references.append(refs)
    return hypotheses, references


def _coco(hypotheses: list[str], references: list[list[str]]) -> tuple[dict, dict]:
    res = {i: [" ".join(caption_words(h))] for i, h in enumerate(hypotheses)}
    gts = {i: [" ".join(caption_words(r)) for r in refs] for i, refs in enumerate(references)}
    return gts, res


def test_bleu_matches_pycocoevalcap(corpus) -> None:
    hypotheses, references = corpus
    gts, res = _coco(hypotheses, references)
    expected, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ours = bleu([caption_words(h) for h in hypotheses], [[caption_words(r) for r in rs] for rs in references])
    assert ours == pytest.approx(expected, abs=1e-6)
    assert 0 < ours[3] < ours[0] < 1


def test_cider_d_matches_pycocoevalcap(corpus) -> None:
    hypotheses, references = corpus
    gts, res = _coco(hypotheses, references)
    expected, expected_each = Cider().compute_score(gts, res)
    ours, each = cider_d([caption_words(h) for h in hypotheses], [[caption_words(r) for r in rs] for rs in references])
    assert ours == pytest.approx(float(expected), abs=1e-6)
    assert each == pytest.approx([float(x) for x in expected_each], abs=1e-6)
    assert ours > 1.0  # a quarter of the hypotheses are exact


def test_wer_and_cer_match_jiwer(corpus) -> None:
    hypotheses, references = corpus
    refs = [rs[0] for rs in references]
    joined = lambda texts: [" ".join(caption_words(t)) for t in texts]  # noqa: E731
    assert wer(hypotheses, refs) == pytest.approx(jiwer.wer(joined(refs), joined(hypotheses)), abs=1e-9)
    assert cer(hypotheses, refs) == pytest.approx(jiwer.cer(joined(refs), joined(hypotheses)), abs=1e-9)


def test_perfect_and_empty_captions() -> None:
    refs = [["A badger."], ["A red apple."]]
    scores = caption_scores(["a badger", "A red apple!"], refs)
    assert scores["BLEU-1"] == pytest.approx(1.0) and scores["WER"] == 0.0
    assert caption_scores(["", ""], refs)["BLEU-4"] < 1e-6
    with pytest.raises(ValueError, match="one hypothesis per sample"):
        bleu([["a"]], [])
