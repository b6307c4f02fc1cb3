"""`--layer_skip_proportion p`: wraps any policy; each draft layer in [1, exit) is skipped independently with
probability p (layer 0 always runs), from a seeded generator."""
from __future__ import annotations

import random
from dataclasses import replace

from skiplayer.policies.base import DraftPolicy, TokenPlan


class LayerSkipping(DraftPolicy):
    def __init__(self, inner: DraftPolicy, proportion: float, seed: int = 0):
        self.inner, self.proportion = inner, proportion
        self.rng = random.Random(seed + 7919)  # independent of the inner policy's stream
        self.name = f"{inner.name}+skip{proportion:g}"
        self.exit_layer, self.num_speculations, self.n_layers = inner.exit_layer, inner.num_speculations, inner.n_layers

    def round_length(self) -> int:
        return self.inner.round_length()

    def plan(self, index: int) -> TokenPlan:
        plan = self.inner.plan(index)
        skip = frozenset(l for l in range(1, plan.exit_layer) if self.rng.random() < self.proportion)
        return replace(plan, skip_layers=plan.skip_layers | skip)

    def exit_here(self, index, depth, token, confidence) -> bool:
        return self.inner.exit_here(index, depth, token, confidence)

    def keep_drafting(self, step) -> bool:
        return self.inner.keep_drafting(step)

    def update(self, result) -> None:
        self.inner.update(result)
