"""benchmarks/ngram_headroom.py's replayed rounds: acceptance as greedy verification counts it, and the bounds the
table relies on (the oracle never loses to a fixed run length; proposing nothing is plain decoding)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def headroom():
    spec = importlib.util.spec_from_file_location("ngram_headroom", ROOT / "benchmarks" / "ngram_headroom.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def linear_v(context: int, n: int) -> float:
    return 1 + 0.1 * (n - 1)


def test_accepted_leaves_the_last_token_to_verification(headroom):
    assert headroom.accepted([5, 6, 7], [5, 6, 9, 1], 0) == 2
    assert headroom.accepted([5, 6, 7], [5, 6, 7], 0) == 2   # the output's last token is the verified one
    assert headroom.accepted([8], [5, 6], 0) == 0


def test_replay_bounds(headroom):
    phrase = [11, 12, 13, 14, 15, 16]
    pairs = [([1, 2] + phrase + [3], phrase + [4, 5] + phrase[:4]), ([7, 8, 9], [7, 8, 9, 7, 8, 9, 10])]
    plain = headroom.replay(pairs, None, 8, lambda run, order, a: 0, linear_v)
    assert plain == (1.0, 1.0)   # nothing proposed: one token per pass, one step each
    fixed = {d: headroom.replay(pairs, None, 8, lambda run, order, a, d=d: d, linear_v) for d in (1, 2, 4, 8)}
    oracle = headroom.replay(pairs, None, 8, lambda run, order, a: a, linear_v)
    assert fixed[4][0] > 2.0     # the copied phrase is drafted in runs
    assert all(oracle[1] >= rate for _, rate in fixed.values())
    assert oracle[0] == fixed[8][0]  # cutting a run to what is accepted never loses a token
    tokens = sum(len(output) - 1 for _, output in pairs)  # the first output token is the prefill's
    passes = tokens / fixed[8][0]
    assert passes == int(passes)  # whole rounds
