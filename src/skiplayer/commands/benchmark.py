"""`skiplayer benchmark`: speed and task metrics of a strategy on a dataset, autoregressive side
by side. See `skiplayer.bench.benchmark`."""
from __future__ import annotations


def add_arguments(p) -> None:
    from skiplayer.bench.benchmark import add_arguments as _add
    _add(p)


def run(args) -> int:
    from skiplayer.bench.benchmark import run as _run
    return _run(args)
