"""`consistent_tokens`: exit once the intermediate argmax has been the same for `consistent_tokens_count`
consecutive layers (counting from `min_exit_layer`), or at E."""
from __future__ import annotations

from skiplayer.policies.base import DraftPolicy, TokenPlan


class ConsistentTokens(DraftPolicy):
    name = "consistent_tokens"

    def __init__(self, config, n_layers: int):
        super().__init__(config.exit_layer, config.num_speculations, n_layers)
        self.count = config.consistent_tokens_count
        self.probes = frozenset(range(config.min_exit_layer, config.exit_layer))
        self.last, self.streak = None, 0

    def plan(self, index: int) -> TokenPlan:
        self.last, self.streak = None, 0
        return TokenPlan(self.exit_layer, probe_layers=self.probes)

    def exit_here(self, index, depth, token, confidence) -> bool:
        self.streak = self.streak + 1 if token == self.last else 1
        self.last = token
        return self.streak >= self.count
