"""Text-similarity metrics: ROUGE (rouge-score), BLEU (sacrebleu), exact match, character edit distance.

Scales: ROUGE F-measures and exact match are in [0, 1]; BLEU is sacrebleu's 0-100; the edit distance is
a count of characters.  ROUGE uses no stemmer, like the torchmetrics ROUGE that LayerSkip reports.
"""
from __future__ import annotations

import re
import string
from functools import lru_cache

ROUGE_TYPES = ("rouge1", "rouge2", "rouge3", "rougeL", "rougeLsum")
_PUNCTUATION = frozenset(string.punctuation)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)


def _sentence_lines(text: str) -> str:
    """rougeLsum treats newlines as sentence breaks; put one sentence per line when the text has none.

    (rouge-score's own splitter needs NLTK's punkt data, which is not available offline.)
    """
    text = text.strip()
    if "\n" in text:
        return text
    return "\n".join(re.split(r"(?<=[.!?])\s+", text))


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """F-measure of ROUGE-1/2/3/L/Lsum; rouge-score takes the reference (target) first."""
    scores = _rouge_scorer().score(_sentence_lines(reference), _sentence_lines(prediction))
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def bleu(prediction: str, reference: str) -> float:
    """Sentence BLEU (0-100) of one prediction against one reference."""
    import sacrebleu
    return float(sacrebleu.sentence_bleu(prediction, [reference]).score)


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100): n-gram counts pooled over all samples (not the mean of sentence BLEU)."""
    import sacrebleu
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles (a/an/the), single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def char_edit_distance(prediction: str, reference: str) -> int:
    """Levenshtein distance in characters (insertions, deletions, substitutions all cost 1).

    Bit-parallel (Myers 1999 / Hyyrö 2001): one column of the DP table is a pair of bit vectors in
    Python ints, so long references (a whole CNN/DM article for cnn_dm_lm) cost milliseconds, not seconds.
    """
    if not reference:
        return len(prediction)
    if not prediction:
        return len(reference)
    positions: dict[str, int] = {}   # character -> bit mask of where it occurs in the reference
    for i, char in enumerate(reference):
        positions[char] = positions.get(char, 0) | (1 << i)
    mask = (1 << len(reference)) - 1
    last = 1 << (len(reference) - 1)
    plus, minus = mask, 0            # vertical deltas +1 / -1 of the current column
    distance = len(reference)
    for char in prediction:
        match = positions.get(char, 0)
        x_vertical = match | minus
        x_horizontal = (((match & plus) + plus) ^ plus) | match
        h_plus = minus | ~(x_horizontal | plus)
        h_minus = plus & x_horizontal
        if h_plus & last:
            distance += 1
        elif h_minus & last:
            distance -= 1
        h_plus = (h_plus << 1) | 1   # row 0 of the table grows by one per character: global distance
        h_minus <<= 1
        plus = (h_minus | ~(x_vertical | h_plus)) & mask
        minus = h_plus & x_vertical & mask
    return distance


def text_scores(prediction: str, reference: str) -> dict[str, float]:
    """All text metrics of one sample."""
    scores = rouge(prediction, reference)
    scores["bleu"] = bleu(prediction, reference)
    scores["exact_match"] = exact_match(prediction, reference)
    scores["char_edit_distance"] = float(char_edit_distance(prediction, reference))
    return scores
