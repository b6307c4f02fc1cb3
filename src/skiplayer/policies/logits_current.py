"""`logits_current`: exit at the first layer >= min_exit_layer whose top-1 probability (final norm + head)
reaches `confidence_threshold`, else at E; optionally end the round when a draft's confidence at its exit is
below `stop_threshold`."""
from __future__ import annotations

from skiplayer.policies.base import DraftPolicy, DraftStep, TokenPlan


class LogitsCurrent(DraftPolicy):
    name = "logits_current"

    def __init__(self, config, n_layers: int):
        super().__init__(config.exit_layer, config.num_speculations, n_layers)
        self.threshold, self.stop_threshold = config.confidence_threshold, config.stop_threshold
        self.probes = frozenset(range(config.min_exit_layer, config.exit_layer))

    def plan(self, index: int) -> TokenPlan:
        return TokenPlan(self.exit_layer, probe_layers=self.probes)

    def exit_here(self, index, depth, token, confidence) -> bool:
        return confidence >= self.threshold

    def keep_drafting(self, step: DraftStep) -> bool:
        return self.stop_threshold is None or step.confidence >= self.stop_threshold
