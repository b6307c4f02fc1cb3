"""Prompt formats for the benchmark datasets, n-shot assembly and user templates.

The formats follow the ones LayerSkip's benchmark uses ("Article: ...\nSummary:", a 100-word prefix for
language modelling, the raw HumanEval prompt), plus plain "Question: ...\nAnswer:" formats for the QA tasks.
Every function here is pure string work: datasets.py decides which row fields go in.
"""
from __future__ import annotations

import re

from skiplayer.errors import UserError

# Choice letters; MMLU/ARC/RACE use at most five, ten leaves room for MMLU-Pro-style files.
LETTERS = "ABCDEFGHIJ"

# LayerSkip's PREFIX_LENGTH: language-modelling prompts are the first 100 words of the text.
LM_PREFIX_WORDS = 100

MC_HEADER = "The following are multiple choice questions. Answer with the letter of the correct choice.\n\n"


def summarization_prompt(article: str) -> str:
    return f"Article: {article}\nSummary:"


def lm_split(text: str, prefix_words: int = LM_PREFIX_WORDS) -> tuple[str, str]:
    """(prompt, continuation) for language modelling: the first `prefix_words` words, then the rest.

    Short texts (LayerSkip would give an empty reference) are split in half instead, so every
    sample keeps something to predict.
    """
    words = text.split()
    cut = prefix_words if len(words) > prefix_words else max(1, len(words) // 2)
    return " ".join(words[:cut]), " ".join(words[cut:])


def question_prompt(question: str) -> str:
    """GSM8K format: the few-shot demonstrations repeat it with the worked solution after 'Answer:'."""
    return f"Question: {question.strip()}\nAnswer:"


def nq_prompt(question: str) -> str:
    # NQ-Open questions are lower-case and carry no question mark.
    question = question.strip()
    if not question.endswith("?"):
        question += "?"
    return f"Question: {question}\nAnswer:"


def boolq_prompt(question: str, passage: str) -> str:
    """Same shape as the shared LayerSkip BoolQ file, for rows that come as question/passage."""
    question = question.strip()
    if not question.endswith("?"):
        question += "?"
    return f"Question: {question} Context: {passage.strip()} Answer:"


def multiple_choice_prompt(question: str, choices: list[str], article: str | None = None) -> str:
    """Question, one '(A) choice' line each, then 'Answer:' (the model is asked for the letter by MC_HEADER)."""
    lines = []
    if article:
        lines.append(f"Article: {article.strip()}\n")
    lines.append(f"Question: {question.strip()}")
    lines += [f"({LETTERS[i]}) {choice.strip()}" for i, choice in enumerate(choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def mmlu_header(subject: str | None) -> str:
    if not subject:
        return MC_HEADER
    return (f"The following are multiple choice questions about {subject.replace('_', ' ')}. "
            "Answer with the letter of the correct choice.\n\n")


def split_inline_choices(text: str) -> tuple[str, list[str], list[str]]:
    """Split 'question (A) x (B) y ...' (or '(1) x (2) y') into (question, labels, choice texts).

    The shared ARC file inlines its choices this way; ARC labels some questions 1-4 instead of A-D.
    Returns (text, [], []) when no run of at least two consecutive labels is found.
    """
    for label_set in (LETTERS, "123456789"):
        marks = []
        pos = 0
        for label in label_set:
            match = re.compile(rf"(?:^|\s)\({label}\)\s").search(text, pos)
            if not match:
                break
            marks.append((label, match.start(), match.end()))
            pos = match.end()
        if len(marks) >= 2:
            texts = []
            for i, (_, _, end) in enumerate(marks):
                stop = marks[i + 1][1] if i + 1 < len(marks) else len(text)
                texts.append(text[end:stop].strip())
            return text[:marks[0][1]].strip(), [m[0] for m in marks], texts
    return text, [], []


def first_def_line(code: str) -> str | None:
    """The first top-level 'def ...:' line of a reference solution (tells the model which name to use)."""
    for line in code.splitlines():
        if line.startswith("def "):
            return line.strip()
    return None


def mbpp_prompt(description: str, signature: str | None = None, tests: list[str] | None = None) -> str:
    """MBPP's usual format: task, optional test asserts, then the code between [BEGIN] and [DONE].

    The shared MBPP copy has no tests, so the reference's signature is given instead when known.
    """
    text = f"You are an expert Python programmer, and here is your task: {description.strip()}"
    if tests:
        text += " Your code should pass these tests:\n\n" + "\n".join(tests)
    elif signature:
        text += f" Your code should define: {signature}"
    return text + "\n[BEGIN]\n"


def instruction_prompt(instruction: str, context: str = "") -> str:
    """Alpaca rows: the instruction, then the optional input on its own paragraph."""
    instruction = instruction.strip()
    context = (context or "").strip()
    return f"{instruction}\n\n{context}" if context else instruction


def with_shots(block: str, shots: list[tuple[str, str]], header: str = "") -> str:
    """header + one 'prompt answer' demonstration per shot, separated by blank lines, + the block."""
    demos = ""
    for prompt, answer in shots:
        gap = "" if prompt.endswith((" ", "\n")) else " "   # "Answer: C", but "[BEGIN]\ncode"
        demos += f"{prompt}{gap}{answer.strip()}\n\n"
    return header + demos + block


def apply_template(template: str | None, fields: dict, message: str, where: str) -> str:
    """Format a user template with the row's fields; {message} is the default prompt (shots included).

    `{message}` keeps LayerSkip's --template meaning; the row fields let a template restate the format.
    """
    if template is None:
        return message
    values = {k: v for k, v in fields.items() if not k.startswith("__")}
    values.setdefault("message", message)
    try:
        return template.format(**values)
    except KeyError as exc:
        names = ", ".join(sorted(values))
        raise UserError(f"--template uses field {{{exc.args[0]}}} which {where} does not have "
                        f"(fields: {names}); use {{message}} for the default prompt") from None
    except (IndexError, ValueError) as exc:
        raise UserError(f"--template is not a valid Python format string ({exc}); "
                        "name fields like {question} and double literal braces {{ }}") from None
