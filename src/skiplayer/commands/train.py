"""`skiplayer train`: the LayerSkip recipe (layer dropout + early-exit loss) on a corpus or a JSONL dataset."""
from __future__ import annotations

import json

from skiplayer.train.trainer import add_train_arguments, run_train


def add_arguments(p):
    add_train_arguments(p)


def run(args) -> int:
    summary = run_train(args)
    print(json.dumps(summary, indent=2, default=str))
    return 0
