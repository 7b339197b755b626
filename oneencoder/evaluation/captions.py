"""Generation metrics over captions: BLEU-1..4 and CIDEr-D as the COCO caption evaluation
computes them, WER and CER as speech recognition does.

Every metric takes hypotheses and references already tokenised by :func:`caption_words`
(lower case, words of letters and digits; punctuation dropped, as COCO's PTB tokeniser
drops it), so a score never depends on capitals or a final full stop.

* :func:`bleu`: corpus BLEU (Papineni et al., 2002) with the COCO scorer's choices: n-gram
  counts clipped by the most any one reference has, the *closest* reference length per
  sentence for the brevity penalty, and ``1e-15``/``1e-9`` smoothing of empty counts.
* :func:`cider_d`: CIDEr-D (Vedantam et al., 2015): tf-idf n-gram vectors (n = 1..4),
  document frequencies over the references of the evaluated set, clipped hypothesis
  weights, a Gaussian length penalty (sigma 6), times 10. Like the COCO scorer, the length
  it compares is the number of *bigrams* (a quirk kept so numbers agree with papers).
* :func:`wer` and :func:`cer`: word and character edit distance over the total reference
  length (substitutions + deletions + insertions), corpus-wide.

``tests/test_caption_metrics.py`` checks each against the reference implementation
(pycocoevalcap's ``Bleu`` and ``Cider``, jiwer) on real captions.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_WORD = re.compile(r"[a-z0-9]+")


def caption_words(text: str) -> list[str]:
    """``"A Tamworth pig."`` -> ``["a", "tamworth", "pig"]``."""
    return _WORD.findall(text.lower())


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]) -> None:
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"need one hypothesis per sample and at least one sample, got {len(hypotheses)} "
                         f"hypotheses for {len(references)} reference lists")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every sample needs at least one reference")


def bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
         n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenised hypotheses, each against its list of tokenised references."""
    _check(hypotheses, references)
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        most: dict[tuple, int] = {}
        for ref in refs:
            for gram, count in _ngrams(ref, n).items():
                most[gram] = max(most.get(gram, 0), count)
        for gram, count in _ngrams(hyp, n).items():
            correct[len(gram) - 1] += min(most.get(gram, 0), count)
        for k in range(n):
            guess[k] += max(0, len(hyp) - k)
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]  # closest; ties: shorter
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1 / (k + 1)))
    ratio = (hyp_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _tfidf(counts: Counter, df: Counter, log_docs: float, n: int) -> tuple[list[dict], list[float], int]:
    vec: list[dict] = [{} for _ in range(n)]
    norm = [0.0] * n
    bigrams = 0
    for gram, tf in counts.items():
        k = len(gram) - 1
        vec[k][gram] = tf * (log_docs - math.log(max(1.0, df[gram])))
        norm[k] += vec[k][gram] ** 2
        if k == 1:
            bigrams += tf
    return vec, [math.sqrt(x) for x in norm], bigrams


def cider_d(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
            n: int = 4, sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D of the corpus and of each sample, document frequencies taken over these references."""
    _check(hypotheses, references)
    ref_counts = [[_ngrams(r, n) for r in refs] for refs in references]
    df: Counter = Counter()
    for counts in ref_counts:
        df.update({gram for c in counts for gram in c})
    log_docs = math.log(len(references))
    per_sample = []
    for hyp, counts in zip(hypotheses, ref_counts):
        vh, nh, lh = _tfidf(_ngrams(hyp, n), df, log_docs, n)
        total = [0.0] * n
        for ref in counts:
            vr, nr, lr = _tfidf(ref, df, log_docs, n)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
            for k in range(n):
                value = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    value /= nh[k] * nr[k]
                total[k] += value * penalty
        per_sample.append(sum(total) / n / len(counts) * 10.0)
    return sum(per_sample) / len(per_sample), per_sample


def _edits(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (unit costs), one row at a time."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def wer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Word error rate: total word edits over total reference words (each text one reference)."""
    if len(hypotheses) != len(references) or not references:
        raise ValueError("need one hypothesis per reference and at least one pair")
    pairs = [(caption_words(h), caption_words(r)) for h, r in zip(hypotheses, references)]
    words = sum(len(r) for _, r in pairs)
    if words == 0:
        raise ValueError("the references hold no words")
    return sum(_edits(r, h) for h, r in pairs) / words


def cer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Character error rate over the texts as :func:`caption_words` joins them (one space between words)."""
    if len(hypotheses) != len(references) or not references:
        raise ValueError("need one hypothesis per reference and at least one pair")
    pairs = [(" ".join(caption_words(h)), " ".join(caption_words(r))) for h, r in zip(hypotheses, references)]
    chars = sum(len(r) for _, r in pairs)
    if chars == 0:
        raise ValueError("the references hold no characters")
    return sum(_edits(r, h) for h, r in pairs) / chars


def caption_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU-1..4, CIDEr-D and (against each sample's first reference) WER of plain-text captions."""
    hyp = [caption_words(h) for h in hypotheses]
    refs = [[caption_words(r) for r in rs] for rs in references]
    scores = {f"BLEU-{k + 1}": value for k, value in enumerate(bleu(hyp, refs))}
    scores["CIDEr-D"] = cider_d(hyp, refs)[0]
    scores["WER"] = wer(list(hypotheses), [rs[0] for rs in references])
    return scores
