"""`random`: each drafted token exits after a layer drawn uniformly from [random_exit_low, random_exit_high]
(defaults: the first and third quartile of 1..E), from a seeded generator."""
from __future__ import annotations

import random

from skiplayer.policies.base import DraftPolicy, TokenPlan


class RandomExit(DraftPolicy):
    name = "random"

    def __init__(self, config, n_layers: int):
        super().__init__(config.exit_layer, config.num_speculations, n_layers)
        self.low, self.high = config.random_exit_range()
        self.rng = random.Random(config.seed)

    def plan(self, index: int) -> TokenPlan:
        return TokenPlan(self.rng.randint(self.low, self.high))
