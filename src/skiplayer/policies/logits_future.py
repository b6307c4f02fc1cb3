"""`logits_future`: learn the exit depth of future tokens from verified ones.

Rule: every drafted token runs to the current exit depth e, with intermediate predictions at each depth from
min_exit_layer up to e. After verification, each verified token gets the shallowest depth whose prediction equals
the verified token, or E when none up to e did (the right depth lies deeper). The exit depth follows an
exponential moving average of those depths, ema ← (1 − w)·ema + w·mean(depths) with w = --future_ema, and
e = round(ema) clamped to [min_exit_layer, E]. It starts at E.
"""
from __future__ import annotations

from skiplayer.policies.base import DraftPolicy, RoundResult, TokenPlan


class LogitsFuture(DraftPolicy):
    name = "logits_future"

    def __init__(self, config, n_layers: int):
        super().__init__(config.exit_layer, config.num_speculations, n_layers)
        self.min_exit, self.weight = config.min_exit_layer, config.future_ema
        self.ema = float(config.exit_layer)

    @property
    def current_exit(self) -> int:
        return min(self.exit_layer, max(self.min_exit, round(self.ema)))

    def plan(self, index: int) -> TokenPlan:
        e = self.current_exit
        return TokenPlan(e, probe_layers=frozenset(range(self.min_exit, e)))

    def update(self, result: RoundResult) -> None:
        depths = []
        for step, target in zip(result.steps, result.targets):
            matches = [d for d, tok in step.probe_tokens.items() if tok == target]
            depths.append(min(matches) if matches else self.exit_layer)
        if depths:
            self.ema = (1 - self.weight) * self.ema + self.weight * sum(depths) / len(depths)
