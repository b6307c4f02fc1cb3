"""Dataset loaders, prompt formats, n-shot and error messages, on small fixture files in tmp_path."""
from __future__ import annotations

import gzip
import json
import sys

import pytest

from skiplayer.data import datasets as ds
from skiplayer.data import prompts
from skiplayer.data.datasets import DATASETS, Sample, load_dataset
from skiplayer.errors import UserError


@pytest.fixture(autouse=True)
def _no_default_sources(tmp_path, monkeypatch):
    """Unit tests see neither ../shared, $SKIPLAYER_DATA_DIR nor an HF cache: only the files they write."""
    monkeypatch.setattr(ds, "SHARED_DATA_DIR", tmp_path / "no-shared-here")
    monkeypatch.delenv("SKIPLAYER_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)   # `import datasets` now raises ImportError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


GSM8K_ROWS = [{"question": f"Tom has {i} apples and buys 2 more. How many now?",
               "answer": f"{i} + 2 = <<{i}+2={i + 2}>>{i + 2}\n#### {i + 2}"} for i in range(6)]


# ------------------------------------------------------------------------------------------- formats

def test_registry_has_every_benchmark_name():
    wanted = {"cnn_dm_summarization", "cnn_dm_lm", "xsum_summarization", "human_eval", "gsm8k", "arc_challenge",
              "boolq", "mbpp", "mmlu", "nq_open", "race", "spec_bench", "custom_jsonl", "chat_format"}
    assert wanted <= set(DATASETS)
    from skiplayer.metrics.tasks import METRICS
    for spec in DATASETS.values():
        assert spec.metric in METRICS and spec.max_steps > 0 and isinstance(spec.stop_words, list)


def test_gsm8k(tmp_path):
    samples = load_dataset("gsm8k", write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS))
    assert [s.id for s in samples] == [f"gsm8k/{i}" for i in range(6)]
    assert samples[1].prompt == "Question: Tom has 1 apples and buys 2 more. How many now?\nAnswer:"
    assert samples[1].reference.endswith("#### 3")
    assert "\n\nQuestion:" in DATASETS["gsm8k"].stop_words


def test_summarization_formats(tmp_path):
    cnn = write_jsonl(tmp_path / "cnn.jsonl", [{"id": "x", "article": "Rain fell. Roads flooded.",
                                                "highlights": "Rain fell .\nRoads flooded ."}])
    sample = load_dataset("cnn_dm_summarization", cnn)[0]
    assert sample.prompt == "Article: Rain fell. Roads flooded.\nSummary:"
    assert sample.reference == "Rain fell .\nRoads flooded ."
    xsum = write_jsonl(tmp_path / "xsum.jsonl", [{"document": "A long story.", "summary": "Short."}])
    sample = load_dataset("xsum_summarization", xsum)[0]
    assert (sample.prompt, sample.reference) == ("Article: A long story.\nSummary:", "Short.")
    assert "\n\n" in DATASETS["xsum_summarization"].stop_words


def test_cnn_dm_lm_splits_after_100_words(tmp_path):
    article = " ".join(f"w{i}" for i in range(150))
    sample = load_dataset("cnn_dm_lm", write_jsonl(tmp_path / "c.jsonl", [{"article": article, "highlights": "h"}]))[0]
    assert sample.prompt.split() == [f"w{i}" for i in range(100)]
    assert sample.reference.split() == [f"w{i}" for i in range(100, 150)]
    short = load_dataset("cnn_dm_lm", write_jsonl(tmp_path / "s.jsonl", [{"article": "a b c d", "highlights": ""}]))[0]
    assert (short.prompt, short.reference) == ("a b", "c d")


def test_arc_inline_letters_and_digits(tmp_path):
    rows = [{"input": "Which is a gas? (A) ice (B) steam (C) rock (D) wood", "target": "B"},
            {"input": "What do plants need? (1) sunlight (2) plastic (3) noise (4) metal", "target": "1"}]
    samples = load_dataset("arc_challenge", write_jsonl(tmp_path / "arc.jsonl", rows))
    first, second = samples
    assert first.prompt.startswith(prompts.MC_HEADER)
    assert first.prompt.endswith("Question: Which is a gas?\n(A) ice\n(B) steam\n(C) rock\n(D) wood\nAnswer:")
    assert (first.reference, first.extra["gold"], first.extra["choices"][1]) == ("B", "B", "steam")
    # Digit-labelled items are shown with letters; the gold maps 1 -> A.
    assert "(A) sunlight" in second.prompt and "(1)" not in second.prompt
    assert second.reference == "A" and second.extra["labels"] == ["1", "2", "3", "4"]


def test_arc_hf_format(tmp_path):
    row = {"question": "Q?", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "answerKey": "3"}
    sample = load_dataset("arc_challenge", write_jsonl(tmp_path / "a.jsonl", [row]))[0]
    assert sample.reference == "C" and "(C) z" in sample.prompt


def test_mmlu_and_race(tmp_path):
    mmlu = write_jsonl(tmp_path / "m.jsonl", [{"question": "2+2?", "subject": "high_school_math",
                                               "choices": ["3", "4", "5", "6"], "answer": 1}])
    sample = load_dataset("mmlu", mmlu)[0]
    assert sample.prompt.startswith("The following are multiple choice questions about high school math.")
    assert sample.reference == "B" and sample.prompt.endswith("(D) 6\nAnswer:")
    race = write_jsonl(tmp_path / "r.jsonl", [{"example_id": "1", "article": "Tom is tall.", "question": "Who is tall?",
                                               "options": ["Tom", "Ann", "Bob", "Sue"], "answer": "A"}])
    sample = load_dataset("race", race)[0]
    assert "Article: Tom is tall.\n\nQuestion: Who is tall?\n(A) Tom" in sample.prompt
    assert sample.reference == "A"


def test_boolq_shared_and_hf_formats(tmp_path):
    shared = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "Question: is it? Context: yes it is. Answer:",
                                                 "answer": "Yes"}])
    sample = load_dataset("boolq", shared)[0]
    assert (sample.prompt, sample.reference, sample.extra["gold"]) == (
        "Question: is it? Context: yes it is. Answer:", "Yes", "yes")
    hf = write_jsonl(tmp_path / "h.jsonl", [{"question": "is water wet", "passage": "Water is wet.", "answer": False}])
    sample = load_dataset("boolq", hf)[0]
    assert sample.prompt == "Question: is water wet? Context: Water is wet. Answer:" and sample.reference == "No"


def test_nq_open(tmp_path):
    rows = [{"question": "who wrote hamlet", "answer": "Shakespeare"},
            {"question": "capital of france", "answer": ["Paris", "Paris, France"]}]
    first, second = load_dataset("nq_open", write_jsonl(tmp_path / "n.jsonl", rows))
    assert first.prompt == "Question: who wrote hamlet?\nAnswer:" and first.reference == "Shakespeare"
    assert second.reference == "Paris" and second.extra["answers"] == ["Paris", "Paris, France"]


def test_mbpp(tmp_path):
    rows = [{"input": "Write a function to add two numbers.", "target": "def add(a, b):\r\n    return a + b"}]
    sample = load_dataset("mbpp", write_jsonl(tmp_path / "m.jsonl", rows))[0]
    assert sample.prompt.startswith("You are an expert Python programmer, and here is your task: Write a function")
    assert "def add(a, b):" in sample.prompt and sample.prompt.endswith("[BEGIN]\n")
    assert sample.reference == "def add(a, b):\n    return a + b"


def test_human_eval_from_package_and_file(tmp_path):
    samples = load_dataset("human_eval", num_samples=2)
    assert [s.id for s in samples] == ["HumanEval/0", "HumanEval/1"]
    assert samples[0].prompt == samples[0].extra["problem"]["prompt"].rstrip()   # no lone trailing "\n" token
    assert "def has_close_elements" in samples[0].prompt and samples[0].reference.strip()
    problem = {"task_id": "T/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
               "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    path = tmp_path / "he.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(problem) + "\n").encode()))
    sample = load_dataset("human_eval", str(path))[0]
    assert sample.id == "T/0" and sample.extra["problem"]["entry_point"] == "f"
    assert "\ndef " in DATASETS["human_eval"].stop_words


def test_spec_bench_turns(tmp_path):
    rows = [{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."],
             "reference": None},
            {"question_id": 82, "category": "summarization", "turns": ["Summarize: x"], "reference": ["x."]}]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    first, second = load_dataset("spec_bench", path)
    assert (first.id, first.prompt, first.reference, first.turns) == ("spec_bench/81", "Write a poem.", "", [])
    assert second.reference == "x." and second.extra["category"] == "summarization"
    assert load_dataset("spec_bench", path, all_turns=True)[0].turns == ["Now shorter."]


def test_chat_format_alpaca_and_messages(tmp_path):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "text": "..."},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                          {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Bye"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    alpaca, plain, chat = load_dataset("chat_format", path)
    assert (alpaca.prompt, alpaca.reference) == ("Add the numbers.\n\n2 and 3", "5")
    assert plain.prompt == "Say hi."
    assert (chat.prompt, chat.reference, chat.turns) == ("Hello", "Hi.", [])
    assert load_dataset("chat_format", path, all_turns=True)[2].turns == ["Bye"]


def test_custom_jsonl_fields_and_json_list(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"q": "one?", "a": "1"}, {"q": "two?", "a": "2"}]))
    samples = load_dataset("custom_jsonl", str(path), prompt_field="q", response_field="a")
    assert [(s.prompt, s.reference) for s in samples] == [("one?", "1"), ("two?", "2")]
    default = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    assert load_dataset("custom_jsonl", default)[0].reference == "r"


def test_text_lm_reads_plain_text(tmp_path):
    body = "\n".join(" ".join(f"w{i}" for i in range(j, j + 50)) for j in range(0, 400, 50))
    path = tmp_path / "book.txt"
    path.write_text("\ufeffHeader junk\n*** START OF THE BOOK ***\n" + body + "\n*** END OF THE BOOK ***\nLicence\n",
                    encoding="utf-8")
    samples = load_dataset("text_lm", str(path))
    assert len(samples) == 2
    assert samples[0].prompt.split()[0] == "w0" and samples[0].reference.split()[0] == "w100"
    assert "Licence" not in samples[-1].reference and "junk" not in samples[0].prompt


def test_default_file_from_env_dir(tmp_path, monkeypatch):
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps(GSM8K_ROWS[0]))   # no trailing newline, like the real one
    monkeypatch.setenv("SKIPLAYER_DATA_DIR", str(tmp_path))
    assert load_dataset("gsm8k")[0].reference.endswith("#### 2")


# ------------------------------------------------------------------------------------------- selection, n-shot

def test_num_samples_and_seeded_shuffle(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)
    assert [s.id for s in load_dataset("gsm8k", path, num_samples=2)] == ["gsm8k/0", "gsm8k/1"]
    shuffled = [s.id for s in load_dataset("gsm8k", path, random_shuffle=True, seed=3)]
    assert sorted(shuffled) == sorted(f"gsm8k/{i}" for i in range(6))
    assert shuffled == [s.id for s in load_dataset("gsm8k", path, random_shuffle=True, seed=3)]
    assert [s.id for s in load_dataset("gsm8k", path, num_samples=2, random_shuffle=True, seed=3)] == shuffled[:2]


def test_n_shot_excludes_sample_and_is_deterministic(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)
    samples = load_dataset("gsm8k", path, n_shot=2, seed=1)
    for sample in samples:
        own = sample.id.split("/")[1]
        assert len(sample.extra["shot_ids"]) == 2 and sample.id not in sample.extra["shot_ids"]
        assert sample.prompt.count("Question:") == 3
        assert sample.prompt.endswith(f"Question: Tom has {own} apples and buys 2 more. How many now?\nAnswer:")
        assert f"Tom has {own} apples" not in sample.prompt.rsplit("\n\n", 1)[0]   # not among the demos
    # Demonstrations carry the worked answer.
    assert "\n#### " in samples[0].prompt
    again = load_dataset("gsm8k", path, n_shot=2, seed=1)
    assert [s.prompt for s in again] == [s.prompt for s in samples]
    other_seeds = {tuple(load_dataset("gsm8k", path, n_shot=2, seed=seed)[0].extra["shot_ids"]) for seed in range(8)}
    assert len(other_seeds) > 1


def test_n_shot_multiple_choice_and_summary_formats(tmp_path):
    rows = [{"input": f"Q{i}? (A) a (B) b", "target": "AB"[i % 2]} for i in range(3)]
    sample = load_dataset("arc_challenge", write_jsonl(tmp_path / "a.jsonl", rows), n_shot=1, seed=0)[0]
    assert sample.prompt.startswith(prompts.MC_HEADER) and sample.prompt.count(prompts.MC_HEADER) == 1
    assert "Answer: A\n\n" in sample.prompt or "Answer: B\n\n" in sample.prompt
    rows = [{"article": f"Story {i}.", "highlights": f"Line {i} .\nMore {i} ."} for i in range(3)]
    sample = load_dataset("cnn_dm_summarization", write_jsonl(tmp_path / "c.jsonl", rows), n_shot=1)[0]
    assert sample.prompt.count("Article:") == 2 and "Summary: Line" in sample.prompt
    assert "\nMore" not in sample.prompt   # demonstration summaries are on one line


def test_template_with_fields_and_message(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)
    assert load_dataset("gsm8k", path, template="Q: {question}\nA:")[0].prompt.startswith("Q: Tom has 0 apples")
    wrapped = load_dataset("gsm8k", path, template="[INST] {message} [/INST]", n_shot=1)[0]
    assert wrapped.prompt.startswith("[INST] Question:") and wrapped.prompt.count("Question:") == 2


# ------------------------------------------------------------------------------------------- errors

def test_unknown_dataset_lists_names():
    with pytest.raises(UserError, match="unknown dataset .gsm9k.*human_eval.*gsm8k"):
        load_dataset("gsm9k")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UserError) as info:
        load_dataset("gsm8k", str(missing))
    assert str(missing) in str(info.value) and "not found" in str(info.value)


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match=r"empty\.jsonl is empty"):
        load_dataset("gsm8k", str(empty))


def test_broken_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GSM8K_ROWS[0]) + "\n\n{\"question\": \"q\", \n")
    with pytest.raises(UserError) as info:
        load_dataset("gsm8k", str(path))
    message = str(info.value)
    assert f"{path} line 3" in message and "broken JSON" in message and "\n" not in message


def test_missing_field_names_file_line_field_and_fix(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [GSM8K_ROWS[0], {"question": "q", "solution": "s"}])
    with pytest.raises(UserError) as info:
        load_dataset("gsm8k", path)
    message = str(info.value)
    assert f"{path} line 2" in message and "'answer'" in message and "solution" in message
    assert "--prompt_field/--response_field" in message and "custom_jsonl" in message
    custom = write_jsonl(tmp_path / "c.jsonl", [{"q": "x"}])
    with pytest.raises(UserError, match=r"c\.jsonl line 1: missing field 'prompt'.*--prompt_field/--response_field"):
        load_dataset("custom_jsonl", custom)


def test_no_local_file_names_the_fixes():
    # `datasets` is not importable here (fixture): hub datasets say how to install it, the others ask for a file.
    for name in ("gsm8k", "mmlu"):
        with pytest.raises(UserError, match=f"dataset {name}: no local file.*pip install datasets, "
                                            "or pass --data_path FILE"):
            load_dataset(name)
    with pytest.raises(UserError, match="dataset spec_bench has no local file: pass --data_path FILE or put "
                                        "spec_bench.jsonl in"):
        load_dataset("spec_bench")
    with pytest.raises(UserError, match="dataset custom_jsonl has no local file: pass --data_path FILE$"):
        load_dataset("custom_jsonl")


def test_other_bad_options(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS[:2])
    with pytest.raises(UserError, match="--n_shot 2 needs at least 3 rows"):
        load_dataset("gsm8k", path, n_shot=2)
    with pytest.raises(UserError, match="has no n-shot format"):
        load_dataset("human_eval", n_shot=1)
    with pytest.raises(UserError, match=r"--template uses field \{nope\}.*question"):
        load_dataset("gsm8k", path, template="{nope}")
    with pytest.raises(UserError, match="would drop the n-shot examples"):
        load_dataset("gsm8k", path, template="{question}", n_shot=1)
    not_object = tmp_path / "list.jsonl"
    not_object.write_text("[1, 2]\n")
    with pytest.raises(UserError, match=r"list\.jsonl item 1: expected a JSON object"):
        load_dataset("gsm8k", str(not_object))
    bad_target = write_jsonl(tmp_path / "arc.jsonl", [{"input": "Q? (A) x (B) y", "target": "E"}])
    with pytest.raises(UserError, match=r"arc\.jsonl line 1: answer 'E' is not one of the choice labels"):
        load_dataset("arc_challenge", bad_target)


def test_sample_dataclass_defaults():
    sample = Sample(id="x", prompt="p", reference="r")
    assert sample.turns == [] and sample.extra == {}
