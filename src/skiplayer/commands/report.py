"""`skiplayer report`: plots and a markdown table from benchmark / sweep run directories.
See `skiplayer.bench.report`."""
from __future__ import annotations


def add_arguments(p) -> None:
    from skiplayer.bench.report import add_arguments as _add
    _add(p)


def run(args) -> int:
    from skiplayer.bench.report import run as _run
    return _run(args)
