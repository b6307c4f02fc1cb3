"""Per-sample task metrics and the registry the benchmark runner scores with.

METRICS maps a dataset's `metric` name to a function (generated text, Sample) -> {name: value}.
`score` adds HumanEval pass@1 when the caller allows code execution; `aggregate` averages samples.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Callable

from skiplayer.errors import UserError
from skiplayer.metrics import code
from skiplayer.metrics.text import exact_match, normalize_answer, text_scores

if TYPE_CHECKING:
    from skiplayer.data.datasets import Sample

LETTERS = "ABCDEFGHIJ"

# ------------------------------------------------------------------------------------------- GSM8K numbers

# "1,000" (thousands groups), "18.5", ".5", "18"; optional sign and "$". The look-behind keeps "x2" or the
# "5" of "3.5" from counting as numbers of their own.
_NUMBER = re.compile(r"(?<![\w.])[-−]?\$?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.\d+|\d+)")


def parse_number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace("$", "").replace(",", "").replace("−", "-"))
    except InvalidOperation:
        return None


def numbers_in(text: str) -> list[Decimal]:
    return [n for n in (parse_number(m.group()) for m in _NUMBER.finditer(text)) if n is not None]


def gsm8k_gold(reference: str) -> Decimal | None:
    """The number after the last '####' of a GSM8K solution (the last number if there is no '####')."""
    if "####" in reference:
        found = numbers_in(reference.rsplit("####", 1)[1])
        if found:
            return found[0]
    found = numbers_in(reference)
    return found[-1] if found else None


def gsm8k_prediction(output: str) -> Decimal | None:
    """The model's answer: the number after '####' when it wrote one (few-shot style), else its last number.

    '####' wins because a generation that runs past its answer into a new question would otherwise be
    scored on that question's numbers.
    """
    if "####" in output:
        found = numbers_in(output.split("####", 1)[1])
        if found:
            return found[0]
    found = numbers_in(output)
    return found[-1] if found else None


def gsm8k_accuracy(output: str, sample: "Sample") -> dict[str, float]:
    gold = gsm8k_gold(sample.extra.get("gold") or sample.reference)
    predicted = gsm8k_prediction(output)
    # Decimal compares by value: 18.0 == 18.
    return {"accuracy": float(gold is not None and predicted is not None and predicted == gold)}


# ------------------------------------------------------------------------------------------- multiple choice

_ANSWER_STATEMENT = re.compile(
    r"answer(?:\s+is|\s*[:=])?\s*(?:option|choice)?\s*:?\s*(?P<open>\()?(?P<token>[A-Za-z]|\d)(?P<close>\))?"
    r"(?![A-Za-z0-9])", re.I)
_LEADING = (re.compile(r"(?P<open>\()(?P<token>[A-Za-z]|\d)(?P<close>\))"),                 # "(C) ..."
            re.compile(r"(?P<open>)(?P<token>[A-Za-z]|\d)(?P<close>)(?=[.:,)]|\s*$|\s*\n)"))  # "C." "C" "c)"


def extract_choice(output: str, n_choices: int = 4, numeric_labels: bool = False,
                   choices: list[str] | None = None) -> str | None:
    """The letter a model chose, or None. Tried in order:

    1. the last "answer is (C)" / "Answer: C" / "answer: c" statement (reasoning may come first);
    2. a leading "(C)" (unless the choices are echoed), "C.", "C)" or a lone "C";
    3. exactly one distinct "(C)" anywhere;
    4. the text of exactly one choice.
    A lower-case letter counts only in parentheses or before punctuation/end, so the article in
    "the answer is a rock" is not read as choice A. With numeric_labels (ARC items labelled 1-4),
    digits map to letters the same way the prompt relabels them: 1 -> A, 2 -> B, ...
    """
    letters = LETTERS[:n_choices]
    text = output.replace("*", "").strip()   # markdown bold around the answer

    def as_letter(match: re.Match) -> str | None:
        token = match.group("token")
        if token.isdigit():
            return LETTERS[int(token) - 1] if numeric_labels and 1 <= int(token) <= n_choices else None
        if token.islower() and not (match.group("open") or match.group("close")):
            rest = match.string[match.end():]
            if rest and rest[0] not in ".,;:!?)\n":
                return None
        return token.upper() if token.upper() in letters else None

    statements = [letter for letter in map(as_letter, _ANSWER_STATEMENT.finditer(text)) if letter]
    if statements:
        return statements[-1]
    marked = {m.group(1) for m in re.finditer(r"\(([A-Z])\)", text) if m.group(1) in letters}
    if numeric_labels:
        marked |= {LETTERS[int(d) - 1] for d in re.findall(r"\((\d)\)", text) if 1 <= int(d) <= n_choices}
    for pattern in _LEADING:
        leading = pattern.match(text)
        # A leading "(A)" followed by "(B)", "(C)" is the model echoing the choices, not answering.
        if leading and as_letter(leading) and not (leading.group("open") and len(marked) > 2):
            return as_letter(leading)
    if len(marked) == 1:
        return marked.pop()
    if choices:
        said = normalize_answer(text)
        hits = {LETTERS[i] for i, choice in enumerate(choices)
                if normalize_answer(choice) and said.startswith(normalize_answer(choice))}
        if len(hits) == 1:
            return hits.pop()
    return None


def multiple_choice_accuracy(output: str, sample: "Sample") -> dict[str, float]:
    choices = sample.extra.get("choices") or []
    labels = sample.extra.get("labels") or []
    gold = str(sample.extra.get("gold") or sample.reference).strip().upper()
    predicted = extract_choice(output, n_choices=len(choices) or 4,
                               numeric_labels=bool(labels) and all(str(x).isdigit() for x in labels),
                               choices=choices)
    return {"accuracy": float(predicted == gold)}


# ------------------------------------------------------------------------------------------- BoolQ, NQ

def extract_yes_no(output: str) -> str | None:
    match = re.search(r"\b(yes|no|true|false)\b", output, re.I)
    if not match:
        return None
    return "yes" if match.group(1).lower() in ("yes", "true") else "no"


def boolq_accuracy(output: str, sample: "Sample") -> dict[str, float]:
    gold = str(sample.extra.get("gold") or sample.reference).strip().lower()
    return {"accuracy": float(extract_yes_no(output) == gold)}


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 after normalize_answer."""
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def first_line(output: str) -> str:
    """Short-answer QA reads the first non-empty line; anything after it is the model running on."""
    return next((line.strip() for line in output.strip().splitlines() if line.strip()), "")


def nq_scores(output: str, sample: "Sample") -> dict[str, float]:
    answers = sample.extra.get("answers") or [sample.reference]
    said = first_line(output)
    return {"exact_match": max(exact_match(said, a) for a in answers),
            "f1": max(token_f1(said, a) for a in answers)}


# ------------------------------------------------------------------------------------------- registry

def generation_scores(output: str, sample: "Sample") -> dict[str, float]:
    """ROUGE/BLEU/EM/edit distance against the reference; nothing when there is no reference text."""
    if not sample.reference.strip():
        return {}
    return text_scores(output, sample.reference)


METRICS: dict[str, Callable[[str, "Sample"], dict[str, float]]] = {
    "text": generation_scores,
    "gsm8k": gsm8k_accuracy,
    "multiple_choice": multiple_choice_accuracy,
    "boolq": boolq_accuracy,
    "nq_open": nq_scores,
    "human_eval": generation_scores,   # + pass@1 from score(..., execute_code=True)
}

EXECUTED_METRICS = {"human_eval"}


def score(metric: str, output: str, sample: "Sample", execute_code: bool = False) -> dict[str, float]:
    """Per-sample scores. Code runs only with execute_code=True (the CLI's --execute_code)."""
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    result = dict(METRICS[metric](output, sample))
    if execute_code and metric in EXECUTED_METRICS:
        result.update(code.pass_at_1(output, sample, execute=True))
    return result


def aggregate(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each key over the samples that have it (missing keys and NaN are skipped)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}
