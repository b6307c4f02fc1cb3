"""`skiplayer sweep`: grid over exit layer, speculations, dynamic-exit mode and layer-skip
proportion. See `skiplayer.bench.sweep`."""
from __future__ import annotations


def add_arguments(p) -> None:
    from skiplayer.bench.sweep import add_arguments as _add
    _add(p)


def run(args) -> int:
    from skiplayer.bench.sweep import run as _run
    return _run(args)
