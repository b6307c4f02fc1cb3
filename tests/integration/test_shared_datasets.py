"""Every file of ../shared/datasets loads with its dataset name (skipped when the files are absent)."""
from __future__ import annotations

import pytest

from skiplayer.data.datasets import load_dataset
from skiplayer.metrics.tasks import aggregate, score
from tests.conftest import shared_path

# file in ../shared/datasets -> (dataset name, extra load_dataset arguments)
LOADS = [
    ("gsm8k.jsonl", "gsm8k", {}),
    ("arc_challenge.jsonl", "arc_challenge", {}),
    ("boolq.jsonl", "boolq", {}),
    ("mbpp.jsonl", "mbpp", {}),
    ("nq_open.jsonl", "nq_open", {}),
    ("xsum.jsonl", "xsum_summarization", {}),
    ("cnn_dm.jsonl", "cnn_dm_summarization", {}),
    ("cnn_dm.jsonl", "cnn_dm_lm", {}),
    ("alpaca_100.jsonl", "chat_format", {}),
    ("alpaca_100.jsonl", "custom_jsonl", {"prompt_field": "instruction", "response_field": "output"}),
    ("corpus/wikitext2_raw_test.txt", "text_lm", {}),
    ("corpus/wikipedia_wiki_00.txt", "text_lm", {}),
    ("corpus/pride_and_prejudice.txt", "text_lm", {}),
    ("corpus/botchan.txt", "text_lm", {}),
]


@pytest.mark.parametrize("file_name, dataset, options", LOADS, ids=[f"{f}-{d}" for f, d, _ in LOADS])
def test_shared_file_loads(file_name, dataset, options):
    path = shared_path("datasets", file_name)
    samples = load_dataset(dataset, data_path=str(path), **options)
    assert samples
    assert all(s.prompt.strip() and s.reference.strip() for s in samples)
    assert len({s.id for s in samples}) == len(samples)


def test_every_shared_file_is_covered():
    root = shared_path("datasets")
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "README.md"}
    assert files <= {f for f, _, _ in LOADS}, f"no loader test for {sorted(files - {f for f, _, _ in LOADS})}"


@pytest.mark.parametrize("dataset", ["gsm8k", "arc_challenge", "boolq", "mbpp", "nq_open", "xsum_summarization",
                                     "cnn_dm_summarization", "cnn_dm_lm", "chat_format", "text_lm"])
def test_default_file_found_without_data_path(dataset, monkeypatch):
    shared_path("datasets")
    monkeypatch.delenv("SKIPLAYER_DATA_DIR", raising=False)
    assert load_dataset(dataset, num_samples=3, n_shot=0)


@pytest.mark.parametrize("dataset, metric, answer", [
    ("gsm8k", "gsm8k", lambda s: s.reference),
    ("arc_challenge", "multiple_choice", lambda s: f"The answer is ({s.reference})"),
    ("boolq", "boolq", lambda s: s.reference),
    ("nq_open", "nq_open", lambda s: s.reference),
])
def test_gold_answers_score_perfectly_on_real_rows(dataset, metric, answer):
    """The answer extraction reads every real gold answer back (catches format surprises in the files)."""
    shared_path("datasets")
    samples = load_dataset(dataset)
    result = aggregate([score(metric, answer(s), s) for s in samples])
    assert result.get("accuracy", result.get("exact_match")) == 1.0


def test_n_shot_on_real_gsm8k():
    shared_path("datasets", "gsm8k.jsonl")
    samples = load_dataset("gsm8k", n_shot=3, seed=7, num_samples=5)
    for s in samples:
        assert s.prompt.count("Question:") == 4 and s.id not in s.extra["shot_ids"]
