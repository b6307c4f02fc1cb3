"""`adaptive` (ours): pick the exit layer and draft length each round to maximise expected tokens per second.

Model. With acceptance probability a at exit layer e, drafting k tokens yields E[N] = (1 - a^(k+1)) / (1 - a)
tokens per round (accepted drafts + one verified token), at cost k·draft(e) + verify(e, k+1), in units of one
autoregressive step. The rate E[N]/cost is compared across candidate exit layers and k = 0..K; k = 0 is plain
autoregressive decoding (rate 1).

Estimates. Acceptance per candidate layer is a Beta posterior (prior Beta(1, 3)) updated from verified drafts (a
draft counts as a success if accepted, a failure if it was the first rejected one; later drafts are unobserved). Each round samples
from the posteriors (Thompson sampling), so untried layers get explored and bad ones fade. Costs come from a
profile of the model measured at start-up (`CostModel`) and are refined online from measured round times.

Within a round, drafting stops when the next draft's expected gain per unit cost falls below the round's running
rate, using the drafts' confidences (mapped to acceptance probabilities learned online) for the positions already
drafted. When no setting beats autoregressive decoding, the policy decodes autoregressively for a back-off period
(doubling up to 64 rounds, reset only once the posterior means say drafting pays) and then probes again, so it is
never meaningfully slower than autoregressive.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from skiplayer.policies.base import DraftPolicy, DraftStep, RoundResult, TokenPlan


@dataclass
class CostModel:
    """Costs in units of one autoregressive step (all layers + full LM head, one position)."""
    n_layers: int
    layer: float                                   # one layer, one position
    head: float                                    # the draft's LM head, one position
    verify: list = field(default_factory=list)     # verify[n]: full pass over n positions (verify[0] unused)
    step_seconds: float = 0.0                      # seconds of one autoregressive step, as profiled
    # measured draft steps / profiled ones, learned online: the profile times the draft head and layers back to
    # back, with their weights in cache; inside decoding the full model streams between two drafts and evicts
    # them (Zen 5, default model: a draft step cost twice its profiled time, so chains were chosen that lost 5%)
    draft_scale: float = 1.0
    # v(n) timed again at a long context (each extra position attends to all of it): verify_at interpolates between
    # the two profiles by the current context, which the policy takes from the rounds
    verify_long: list = field(default_factory=list)
    profile_context: int = 64
    long_context: int = 0
    context: int = 0

    @classmethod
    def nominal(cls, n_layers: int, max_n: int = 16, head: float = 0.2, slope: float = 0.1) -> "CostModel":
        """A plausible profile used in tests or before measuring: verification grows linearly with positions."""
        layer = (1 - head) / n_layers
        return cls(n_layers, layer, head, [0.0] + [1 + slope * (n - 1) for n in range(1, max_n + 1)])

    def draft(self, exit_layer: int) -> float:
        return (exit_layer * self.layer + self.head) * self.draft_scale

    def verify_at(self, n: int) -> float:
        """v(n) at the current context: the short profile, moved towards the long one (extrapolated up to half
        as far again beyond it)."""
        v = self.verify[n]
        if self.verify_long and self.context > self.profile_context:
            w = min(1.5, (self.context - self.profile_context) / (self.long_context - self.profile_context))
            v += w * (self.verify_long[n] - v)
        return v

    def verify_from(self, exit_layer: int, n: int) -> float:
        """Verification of n positions starting at `exit_layer` (plus the last draft's shallow layers)."""
        n = min(n, len(self.verify) - 1)
        shallow = exit_layer * self.layer
        return self.verify_at(n) * (1 - shallow) + shallow

    def observe_draft(self, exit_layers: list[int], seconds: float, weight: float = 0.1) -> None:
        """A round's draft steps (their exit layers) took `seconds` in all."""
        profiled = sum(e * self.layer + self.head for e in exit_layers) * self.step_seconds
        if profiled > 0 and seconds > 0:
            self.draft_scale += weight * (seconds / profiled - self.draft_scale)


# Drafting must promise this much more than autoregressive decoding: the start-up profile times layers, heads and
# verification passes but not the per-draft Python work around them, which made settings predicted at +0-10% lose
# 5% on the vanilla default model (benchmarks/policies.py --only adaptive).
AR_MARGIN = 1.1


def expected_tokens(alpha: float, k: int) -> float:
    if alpha >= 1.0:
        return k + 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


class Adaptive(DraftPolicy):
    name = "adaptive"

    def __init__(self, config, n_layers: int, costs: CostModel | None = None, calibrated: dict | None = None):
        super().__init__(config.exit_layer, config.num_speculations, n_layers)
        E, low = config.exit_layer, config.min_exit_layer
        calibrated = {e: a for e, a in (calibrated or {}).items() if low <= e <= E}
        self.candidates = sorted(calibrated) or sorted({max(low, round(E * f)) for f in (0.25, 0.5, 0.75)} | {E})
        self.costs = costs or CostModel.nominal(n_layers, max_n=config.max_nodes + 1)
        # Beta(successes + 1, failures + 3): a plain early exit of a vanilla model rarely agrees with the full model
        # (0.05-0.4 measured on the default model), so optimistic exploration would waste whole rounds. A calibrated
        # layer starts from its measured acceptance (worth 10 drafts).
        self.posterior = {e: [1.0, 3.0] for e in self.candidates}
        for e, a in calibrated.items():
            self.posterior[e] = [1.0 + 10 * a, 1.0 + 10 * (1 - a)]
        self.conf_bins = [[1.0, 1.0] for _ in range(10)]            # acceptance given draft confidence
        self.rng = random.Random(config.seed)
        self.backoff, self.ar_left = 4, 0
        self.exit, self.k = E, 0
        self._round = []
        # n-gram branch of a token tree: acceptance of a run's d-th token given the ones before it were right, per
        # length of the suffix it matched (longer matches are right more often); prior Beta(2, 2)
        self.ngram_posterior: dict[tuple[int, int], list[float]] = {}
        # draft-tree siblings: P(target = the draft head's rank-r candidate | its parent was reached), prior Beta(1, 9)
        self.rank_posterior: dict[int, list[float]] = {}
        # (rounds where the self-draft chain got further than the n-gram run beside it, rounds with both), per kind
        # of run (context or table): the branches often name the same token, and then the drafts bought nothing
        self.beside_posterior: dict[bool, list[float]] = {}
        self._ngram_expected = 0.0  # expected tokens the round's kept n-gram run adds

    def posterior_means(self) -> dict[int, float]:
        return {e: a / (a + b) for e, (a, b) in self.posterior.items()}

    # Choosing a round ------------------------------------------------------------------------------------------
    def best_setting(self, alphas: dict[int, float]) -> tuple[int, int, float]:
        """(exit layer, k, rate) maximising expected tokens per unit cost; k = 0 means autoregressive."""
        best = (self.exit_layer, 0, AR_MARGIN / self.costs.verify_from(0, 1))
        for e, a in alphas.items():
            for k in range(1, self.num_speculations + 1):
                rate = expected_tokens(a, k) / (k * self.costs.draft(e) + self.costs.verify_from(e, k + 1))
                if rate > best[2]:
                    best = (e, k, rate)
        return best

    def round_length(self) -> int:
        if self.ar_left > 0:
            self.ar_left -= 1
            return 0
        sampled = {e: self.rng.betavariate(a, b) for e, (a, b) in self.posterior.items()}
        self.exit, self.k, _ = self.best_setting(sampled)
        if self.k == 0:
            # Nothing pays: decode autoregressively for a while, then probe the most promising layer again.
            self.ar_left, self.backoff = self.backoff, min(64, self.backoff * 2)
            means = self.posterior_means()
            self.exit = max(means, key=means.get)
            self.k = 1
        self._round = []
        self._ngram_expected = 0.0
        return self.k

    def plan(self, index: int) -> TokenPlan:
        return TokenPlan(self.exit)

    # Within a round ------------------------------------------------------------------------------------------
    def _accept_prob(self, confidence: float) -> float:
        a, b = self.conf_bins[min(9, int(confidence * 10))]
        return a / (a + b)

    def keep_drafting(self, step: DraftStep) -> bool:
        self._round.append(self._accept_prob(step.confidence))
        j = len(self._round)
        if j >= self.k:
            return False
        all_accepted, expected = 1.0, 1.0
        for p in self._round:
            all_accepted *= p
            expected += all_accepted
        a, b = self.posterior[self.exit]
        cost = j * self.costs.draft(self.exit) + self.costs.verify_from(self.exit, j + 1)
        gain = all_accepted * a / (a + b)
        extra = self.costs.draft(self.exit) + self.costs.verify_from(self.exit, j + 2) - self.costs.verify_from(self.exit, j + 1)
        return gain / extra >= expected / cost

    def tree_plan(self, drafts: int, order: int, available: int) -> tuple[int, float]:
        """(n-gram run length, expected tokens per unit cost) of the best tree with `drafts` self-drafts and up to
        `available` n-gram candidates matched on `order` tokens. The branches are alternatives for the first
        token, so their expected accepted tokens add up; each extra candidate must add more expected tokens than
        its share of the wider verification pass costs (v(n), profiled)."""
        a, b = self.posterior.get(self.exit, (1.0, 3.0))
        alpha = a / (a + b)
        own = sum(alpha ** j for j in range(1, drafts + 1))
        # beside a run, the chain only adds where it gets further than the run: learned, starting from what
        # independent branches would give (the first draft right and the run's first token wrong), weight 2
        wins, rounds = self.beside_posterior.get(order < 0, (0.0, 0.0))
        prior = alpha * (1 - self._ngram_alpha(order, 1))
        beside = own * min(1.0, (wins + 2 * prior) / (rounds + 2) / alpha)
        spent = drafts * self.costs.draft(self.exit)
        best, best_rate, reach, ngram = 0, 0.0, 1.0, 0.0
        for d in range(available + 1):
            if d:
                reach *= self._ngram_alpha(order, d)
                ngram += reach
            expected = 1.0 + (beside if d else own) + ngram
            rate = expected / (spent + self.costs.verify_from(self.exit if drafts else 0, 1 + drafts + d))
            if rate > best_rate:
                best, best_rate = d, rate
        return best, best_rate

    def drafts_beside(self, order: int, available: int) -> int:
        """Self-drafts (up to this round's k) worth drafting next to an n-gram run: none unless they promise
        AR_MARGIN more tokens per unit cost than the run alone, as drafting must against plain decoding (the profile
        does not time a draft's work around its layers and head; without the margin adaptive + n-grams ran 2-3%
        behind the same policy with no self-draft on gsm8k, HumanEval and cnn_dm, Zen 5)."""
        rates = [self.tree_plan(k, order, available)[1] for k in range(self.k + 1)]
        best = max(range(1, self.k + 1), key=rates.__getitem__, default=0)
        return best if best and rates[best] > AR_MARGIN * rates[0] else 0

    def ngram_tokens(self, drafts: int, order: int, available: int) -> int:
        d = self.tree_plan(drafts, order, available)[0]
        reach, self._ngram_expected = 1.0, 0.0
        for j in range(1, d + 1):
            reach *= self._ngram_alpha(order, j)
            self._ngram_expected += reach
        return d

    def siblings(self, candidates: list, steps: list[DraftStep], nodes: int) -> int:
        """The prefix of the ranked siblings that maximises expected tokens per unit cost: sibling (step i, rank r)
        adds P(chain accepted up to node i) * P(rank r right | reached), learned per rank; every node widens the
        verification pass (v(n), profiled)."""
        reach = [1.0]
        for st in steps:
            reach.append(reach[-1] * self._accept_prob(st.confidence))
        expected = 1.0 + sum(reach[1:]) + self._ngram_expected
        spent = len(steps) * self.costs.draft(self.exit)
        best, best_rate = 0, expected / (spent + self.costs.verify_from(self.exit, nodes))
        for n, c in enumerate(candidates, start=1):
            a, b = self.rank_posterior.get(c.rank, (1.0, 9.0))
            expected += reach[c.step] * a / (a + b)
            rate = expected / (spent + self.costs.verify_from(self.exit, nodes + n))
            if rate > best_rate:
                best, best_rate = n, rate
        return best

    def _ngram_alpha(self, order: int, depth: int) -> float:
        a, b = self.ngram_posterior.get((order, depth), (2.0, 2.0))
        return a / (a + b)

    # Learning --------------------------------------------------------------------------------------------------
    def update(self, result: RoundResult) -> None:
        observed = result.steps[:result.accepted + 1]
        for i, step in enumerate(observed):
            ok = i < result.accepted
            post = self.posterior.get(step.exit_layer)
            if post is not None:
                post[0 if ok else 1] += 1
            self.conf_bins[min(9, int(step.confidence * 10))][0 if ok else 1] += 1
        # Probe less and less often until the posterior means (not one lucky acceptance) say drafting pays.
        if self.best_setting(self.posterior_means())[1] > 0:
            self.backoff = 4
        if result.ngram_run:  # how far the run matched what the model produced (merging does not matter)
            right = next((j for j, (c, t) in enumerate(zip(result.ngram_run, result.output)) if c != t),
                         min(len(result.ngram_run), len(result.output)))
            for d in range(1, min(right + 1, len(result.ngram_run)) + 1):
                self.ngram_posterior.setdefault((result.ngram_order, d), [2.0, 2.0])[0 if d <= right else 1] += 1
            if result.steps:
                post = self.beside_posterior.setdefault(result.ngram_order < 0, [0.0, 0.0])
                post[0] += result.accepted > right
                post[1] += 1
        for step, rank, token in result.siblings:  # observed when the chain reached the sibling's parent
            if result.accepted >= step:
                self.rank_posterior.setdefault(rank, [1.0, 9.0])[0 if result.output[step] == token else 1] += 1
        # v(n) keeps its profiled values (two contexts, verify_at): learned online in units of the profiled step
        # (until 2026-12-06), every pass at a long context looked dearer than plain decoding (a step at 700 tokens
        # runs 1.3x the profile's at 64), and adaptive verified fewer n-gram tokens than a fixed run of 2 (Zen 5,
        # xsum: 1.10x against 1.18x); a scale shared by all n, dividing the draft cost too, made self-drafts look
        # cheap (gsm8k chains 0.92x)
        if result.context:
            self.costs.context = result.context
        if result.draft_seconds and result.steps:
            self.costs.observe_draft([st.exit_layer for st in result.steps], result.draft_seconds)
