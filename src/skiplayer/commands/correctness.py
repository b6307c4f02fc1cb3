"""`skiplayer correctness`: greedy self-speculative output must equal greedy autoregressive,
token for token. See `skiplayer.bench.correctness`."""
from __future__ import annotations


def add_arguments(p) -> None:
    from skiplayer.bench.correctness import add_arguments as _add
    _add(p)


def run(args) -> int:
    from skiplayer.bench.correctness import run as _run
    return _run(args)
