"""The one interface every draft policy implements (cf. HF's CandidateGenerator: propose, then update).

Per round the decoder asks `round_length()` for the draft budget, then per drafted token `plan(i)` for its depth,
skipped layers and the layers after which it wants an intermediate prediction ("probes"). At each probe the
decoder computes final norm + LM head and asks `exit_here`; after the token is drafted, `keep_drafting`. After
verification `update` receives what was accepted. Policies never touch the model or the cache: the decoding loop
does the work, so adding a policy never touches the loop, and modes without probes pay nothing for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TokenPlan:
    exit_layer: int                               # run layers [0, exit_layer) at most
    skip_layers: frozenset = frozenset()          # layers below exit_layer that are skipped (hidden passes through)
    probe_layers: frozenset = frozenset()         # after layer l-1 (depth l), compute a prediction and ask exit_here


@dataclass
class DraftStep:
    """One drafting step: the input token ran through the planned layers and produced the drafted `token`."""
    token: int
    exit_layer: int                               # depth actually reached (layers [0, exit_layer) considered)
    skipped: tuple = ()                           # layers skipped below exit_layer
    confidence: float = 0.0                       # top-1 probability at the exit
    probs: torch.Tensor | None = None             # the draft distribution the token was drawn from (sampling)
    hiddens: list = field(default_factory=list)   # hiddens[l] = hidden state entering layer l, l in [0, exit_layer]
    probe_tokens: dict = field(default_factory=dict)  # depth -> argmax of the intermediate prediction there
    alternatives: list = field(default_factory=list)  # the draft head's next candidates: (token, probability)

    @property
    def exact_until(self) -> int:
        """Layers [0, exact_until) ran exactly as in the full model: the exit depth or the first skipped layer."""
        return min([self.exit_layer, *self.skipped])


@dataclass
class RoundResult:
    steps: list[DraftStep]
    accepted: int            # drafts accepted
    targets: list[int]       # targets[i] = the verified token that follows step i's input (len = accepted + 1)
    verify_seconds: float = 0.0
    ngram_run: list = field(default_factory=list)  # the n-gram candidates of the round (token tree branch)
    ngram_order: int = 0                           # length of the suffix they matched
    output: list = field(default_factory=list)     # every token the round produced (accepted + verified)
    nodes: int = 0                                 # tree nodes verified (the pending token included)
    siblings: list = field(default_factory=list)   # (step index, rank, token) of the draft-rank siblings verified
    draft_seconds: float = 0.0                     # time of the round's draft steps (layers and heads)
    context: int = 0                               # tokens in the cache before the round (what each position attends to)


class DraftPolicy:
    """Static exit at `exit_layer`, `num_speculations` tokens per round (LayerSkip's behaviour)."""

    name = "none"

    def __init__(self, exit_layer: int, num_speculations: int, n_layers: int):
        self.exit_layer, self.num_speculations, self.n_layers = exit_layer, num_speculations, n_layers

    def round_length(self) -> int:
        return self.num_speculations

    def plan(self, index: int) -> TokenPlan:
        return TokenPlan(self.exit_layer)

    def exit_here(self, index: int, depth: int, token: int, confidence: float) -> bool:
        return False

    def keep_drafting(self, step: DraftStep) -> bool:
        return True

    def drafts_beside(self, order: int, available: int) -> int:
        """How many self-drafts this round may draft next to `available` n-gram candidates (matched on a suffix of
        `order` tokens): as many as round_length() said."""
        return self.num_speculations

    def ngram_tokens(self, drafts: int, order: int, available: int) -> int:
        """How many of `available` n-gram candidates (matched on a suffix of `order` tokens) join this round's
        tree beside `drafts` self-drafts: all of them (--ngram_tokens caps the run)."""
        return available

    def siblings(self, candidates: list, steps: list[DraftStep], nodes: int) -> int:
        """How many of the draft head's alternative candidates (`Sibling`s, best draft path probability first) join
        a tree of `nodes` nodes: all that --tree_width / --tree_budget allowed."""
        return len(candidates)

    def update(self, result: RoundResult) -> None:
        pass
