"""Draft policies: where each drafted token exits and how many tokens a round drafts.

`build_policy(config, n_layers)` turns the CLI's `--dynamic_early_exit_mode` and its parameters into a policy;
`--layer_skip_proportion` wraps any of them with random layer skipping.
"""
from __future__ import annotations

from dataclasses import dataclass

from skiplayer.errors import check
from skiplayer.policies.base import DraftPolicy, DraftStep, RoundResult, TokenPlan

from skiplayer.policies.adaptive import Adaptive, CostModel
from skiplayer.policies.consistent_tokens import ConsistentTokens
from skiplayer.policies.logits_current import LogitsCurrent
from skiplayer.policies.logits_future import LogitsFuture
from skiplayer.policies.random_exit import RandomExit

DRAFT_SOURCES = ("self", "ngram", "both")

# Policy settings a user leaves unset (the CLI's flags, `skiplayer.generate`'s keywords). With none of exit_layer,
# num_speculations, draft_source, dynamic_early_exit_mode given: the configuration measured best on the default model
# (docs/trees.md, benchmarks/trees.py), n-gram candidates beside the self-draft chain in one token tree, sized by
# `adaptive` from measured costs, at the draft's exit layer. With any of them given: LayerSkip's defaults for the rest
# (a static self-draft chain), so a LayerSkip command means what it means there.
BEST_POLICY = {"draft_source": "both", "dynamic_early_exit_mode": "adaptive", "num_speculations": 2}
LAYERSKIP_POLICY = {"draft_source": "self", "dynamic_early_exit_mode": "none", "num_speculations": 4}
POLICY_CHOICES = ("exit_layer", *BEST_POLICY)  # giving any of these asks for LayerSkip's defaults


def unset_policy_defaults(given) -> dict:
    """What the settings of BEST_POLICY's keys default to for a user who gave the settings named in `given`."""
    return LAYERSKIP_POLICY if set(given) & set(POLICY_CHOICES) else BEST_POLICY

MODES: dict[str, type] = {"none": DraftPolicy, "consistent_tokens": ConsistentTokens, "random": RandomExit,
                          "logits_current": LogitsCurrent, "logits_future": LogitsFuture, "adaptive": Adaptive}


@dataclass
class PolicyConfig:
    exit_layer: int = 8
    num_speculations: int = 4
    dynamic_early_exit_mode: str = "none"
    layer_skip_proportion: float = 0.0
    min_exit_layer: int = 1
    consistent_tokens_count: int = 4
    random_exit_low: int | None = None
    random_exit_high: int | None = None
    confidence_threshold: float = 0.9
    stop_threshold: float | None = None
    future_ema: float = 0.5
    seed: int = 0
    # Where candidates come from: the model's shallow layers ("self", LayerSkip), n-gram lookup in prompt + output
    # ("ngram", prompt-lookup decoding: no draft layers at all), or both merged into one token tree.
    draft_source: str = "self"
    ngram_tokens: int = 4   # longest n-gram run per round
    ngram_max: int = 3      # longest suffix matched (then shorter ones, down to 1 token)
    ngram_table: bool = True  # no match in the context: the draft's n-gram table drafts (if the draft has one)
    # Draft trees: the draft head's ranks 2..tree_width at each drafted position join the tree as siblings of the
    # chain's token (no extra draft layers: the head ranked them already); tree_budget caps the nodes beside the
    # pending token (the siblings with the highest draft path probability fill what the chain and n-grams leave).
    tree_width: int = 1
    tree_budget: int | None = None

    @property
    def self_draft(self) -> bool:
        return self.draft_source in ("self", "both")

    @property
    def ngram(self) -> bool:
        return self.draft_source in ("ngram", "both")

    def validate(self, n_layers: int) -> "PolicyConfig":
        check(1 <= self.exit_layer < n_layers,
              f"--exit_layer must be in [1, {n_layers - 1}] for this {n_layers}-layer model (got {self.exit_layer})")
        check(self.num_speculations >= 1, f"--num_speculations must be >= 1 (got {self.num_speculations})")
        check(self.dynamic_early_exit_mode in MODES,
              f"unknown --dynamic_early_exit_mode '{self.dynamic_early_exit_mode}': use one of {', '.join(MODES)}")
        check(0.0 <= self.layer_skip_proportion <= 1.0,
              f"--layer_skip_proportion must be in [0, 1] (got {self.layer_skip_proportion})")
        check(1 <= self.min_exit_layer <= self.exit_layer,
              f"--min_exit_layer must be in [1, --exit_layer={self.exit_layer}] (got {self.min_exit_layer})")
        check(self.consistent_tokens_count >= 1,
              f"--consistent_tokens_count must be >= 1 (got {self.consistent_tokens_count})")
        check(0.0 < self.confidence_threshold <= 1.0,
              f"--confidence_threshold must be in (0, 1] (got {self.confidence_threshold})")
        check(self.stop_threshold is None or 0.0 < self.stop_threshold <= 1.0,
              f"--stop_threshold must be in (0, 1] (got {self.stop_threshold})")
        check(0.0 < self.future_ema <= 1.0, f"--future_ema must be in (0, 1] (got {self.future_ema})")
        check(self.draft_source in DRAFT_SOURCES,
              f"unknown --draft_source '{self.draft_source}': use one of {', '.join(DRAFT_SOURCES)}")
        check(self.ngram_tokens >= 1, f"--ngram_tokens must be >= 1 (got {self.ngram_tokens})")
        check(1 <= self.ngram_max <= 8, f"--ngram_max must be in [1, 8] (got {self.ngram_max})")
        check(1 <= self.tree_width <= 8, f"--tree_width must be in [1, 8] (got {self.tree_width})")
        check(self.tree_budget is None or self.tree_budget >= 1,
              f"--tree_budget must be >= 1 node (got {self.tree_budget})")
        check(self.tree_width == 1 or self.self_draft,
              f"--tree_width {self.tree_width} ranks the self-draft's candidates: use --draft_source self or both")
        low, high = self.random_exit_range()
        check(1 <= low <= high <= self.exit_layer,
              f"--random_exit_low/--random_exit_high must satisfy 1 <= low <= high <= --exit_layer "
              f"(got {low}, {high}, exit layer {self.exit_layer})")
        return self

    @property
    def max_nodes(self) -> int:
        """Most tree nodes a round verifies beside the pending token."""
        nodes = self.num_speculations * self.tree_width * self.self_draft + self.ngram_tokens * self.ngram
        return nodes if self.tree_budget is None else min(nodes, self.tree_budget)

    def random_exit_range(self) -> tuple[int, int]:
        """Defaults: the first and third quartile of 1..exit_layer."""
        low = self.random_exit_low if self.random_exit_low is not None else max(1, round(self.exit_layer / 4))
        high = self.random_exit_high if self.random_exit_high is not None else max(low, round(3 * self.exit_layer / 4))
        return low, high


def build_policy(config: PolicyConfig, n_layers: int, costs: CostModel | None = None,
                 calibrated: dict[int, float] | None = None) -> DraftPolicy:
    """`costs` (measured) and `calibrated` (exit layer -> acceptance measured at calibration) inform the adaptive
    policy: it then chooses among the calibrated exit layers, starting from their measured acceptance."""
    config.validate(n_layers)
    cls = MODES[config.dynamic_early_exit_mode]
    if cls is DraftPolicy:
        policy = cls(config.exit_layer, config.num_speculations, n_layers)
    elif cls is Adaptive:
        policy = Adaptive(config, n_layers, costs, calibrated=calibrated)
    else:
        policy = cls(config, n_layers)
    if config.layer_skip_proportion > 0:
        from skiplayer.policies.skipping import LayerSkipping
        policy = LayerSkipping(policy, config.layer_skip_proportion, config.seed)
    return policy


__all__ = ["BEST_POLICY", "LAYERSKIP_POLICY", "POLICY_CHOICES", "unset_policy_defaults", "DRAFT_SOURCES", "DraftPolicy", "DraftStep", "RoundResult", "TokenPlan", "PolicyConfig", "build_policy", "MODES", "CostModel"]
