"""Self-speculative decoding: draft with the shallow layers (and n-gram lookup), verify with the rest, accept.

Each round the pending token (the last accepted one, whose K/V is not yet in the cache) is the root of a token
tree: the self-draft chain below it, n-gram candidates merged in (drafts/tree.py); a plain chain when only the
self-draft runs. Drafting ran the chain's tokens through shallow layers; verification starts at the shallowest
layer any draft did not run exactly (the exit layer E in the static case), brings the other nodes there, feeds each
node its state at that layer, recomputes every deeper layer (overwriting the drafts' K/V) and scores all nodes with
the full head. The accepted path's K/V then move to consecutive positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skiplayer.decoding.draft import DraftHead, draft_round
from skiplayer.decoding.sampling import SamplingConfig, probabilities
from skiplayer.decoding.stats import Clock
from skiplayer.drafts.ngram import NGramLookup
from skiplayer.drafts.tree import (NGRAM, SELF, SIBLING, SOURCES, TABLE, TokenTree, accept_tree_greedy,
                                   accept_tree_sampling, rank_siblings)
from skiplayer.model.cuda_graphs import BlockGraphs
from skiplayer.model.kv_cache import KVCache
from skiplayer.model.llama import Transformer, TreeMask
from skiplayer.policies.base import DraftPolicy, DraftStep, RoundResult


@dataclass
class RoundState:
    """What every speculative round of one generation shares."""
    model: Transformer
    cache: KVCache
    head: DraftHead
    policy: DraftPolicy
    sampling: SamplingConfig
    generator: torch.Generator
    clock: Clock
    stop_ids: set
    ngram: NGramLookup | None = None  # n-gram candidates beside (or instead of) the self-draft
    self_draft: bool = True
    tree_width: int = 1               # draft candidates kept per drafted position (ranks 2.. become siblings)
    tree_budget: int | None = None    # most nodes beside the pending token
    blocks: BlockGraphs | None = None  # verification blocks as CUDA graphs (n-gram rounds; model/cuda_graphs.py)


def tree_mask(tree: TokenTree, start: int, first: int = 0, device="cpu") -> TreeMask | None:
    """Attention of nodes first.. (None when the tree is a chain: plain causal attention)."""
    if tree.is_chain():
        return None
    positions = torch.tensor(tree.positions(start)[first:], device=device)
    return TreeMask(tree.attention_paths(start, first).to(device), positions)


def verify(s: RoundState, tree: TokenTree, steps: list[DraftStep],
           start: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Full-model logits (len(tree), vocab) for every node of `tree`, node i written at cache slot start + i, and
    the exact states (len(tree), dim) entering each attention adapter's depth. Nodes 0..len(steps)-1 (the root and
    the chain's drafts but the last) ran the draft layers while drafting."""
    model, cache, head = s.model, s.cache, s.head
    layer, k = min((st.exact_until for st in steps), default=0), len(steps)
    if s.blocks is not None and layer == 0 and not head.slots:  # every node from the embedding: a static block
        logits = s.blocks(tree.tokens, start, tree_mask(tree, start, device=cache.k.device))
        if logits is not None:
            return logits, {}
    # The other nodes never ran through the model: bring them to `layer` exactly, as one block.
    rest = {0: model.embed(torch.tensor(tree.tokens[k:], device=cache.k.device))}
    if layer > 0:
        taps = {n: (lambda h, n=n: rest.__setitem__(n, h)) for n in range(1, layer)}
        rest[layer] = model.forward_layers(rest[0], start + k, cache, 0, layer, taps,
                                             tree_mask(tree, start, k, cache.k.device))

    def states(n: int) -> torch.Tensor:  # exact input of layer n <= `layer` for every node
        return torch.cat([st.hiddens[n] for st in steps] + [rest[n]])

    mask = tree_mask(tree, start, device=cache.k.device)
    exact = {e: states(e) for e in head.slots if e <= layer}  # what attention adapters read (deeper ones: taps)
    taps = {e: (lambda h, e=e: exact.__setitem__(e, h)) for e in head.slots if e > layer}
    h = model.forward_layers(states(layer), start, cache, layer, model.n_layers, taps, mask)
    return model.logits(h), exact


def ngram_run(s: RoundState, room: int) -> list[int]:
    """The n-gram candidates: at most `room` tokens, cut after a stop token."""
    if s.ngram is None:
        return []
    run = s.ngram.propose(room)
    return run[:next((i + 1 for i, t in enumerate(run) if t in s.stop_ids), len(run))]


def build_tree(s: RoundState, pending: int, steps: list[DraftStep], run: list[int],
               order: int = 1) -> tuple[TokenTree, list]:
    """The self-draft chain, the n-gram run (matched on `order` tokens: < 0 in the table) merged in (shared
    prefixes once), then as many of the draft head's alternative candidates as the policy and the budget allow.
    Returns the tree and the siblings added."""
    tree = TokenTree.chain(pending, [st.token for st in steps], [st.probs for st in steps])
    tree.add_path(0, run, TABLE if order < 0 else NGRAM)
    candidates = rank_siblings(steps)
    if not candidates:
        return tree, []
    n = s.policy.siblings(candidates, steps, len(tree))
    if s.tree_budget is not None:
        n = min(n, s.tree_budget - (len(tree) - 1))
    for c in candidates[:max(0, n)]:
        tree.add_path(c.step, [c.token], SIBLING, rank=c.rank)
    return tree, candidates[:max(0, n)]


def speculative_round(s: RoundState, pending: int, start: int, budget: int, room: int) -> list[int]:
    """One draft → verify → accept round: up to `budget` self-drafts, n-gram candidates, at most `room` tokens
    beyond the pending one accepted. Returns the new tokens (accepted candidates + one verified token)."""
    stats = s.clock.stats
    run, order = ngram_run(s, room), s.ngram.order if s.ngram else 0
    nodes = room if s.tree_budget is None else min(room, s.tree_budget)
    if run:  # the policy shapes the tree: self-drafts beside the run, then how much of the run to keep
        budget = min(budget, s.policy.drafts_beside(order, len(run)))
    drafting = stats.time_draft_layers + stats.time_draft_heads
    steps = draft_round(s.model, s.cache, pending, start, min(budget, nodes), s.policy, s.head, s.sampling,
                        s.generator, s.clock, s.stop_ids, s.tree_width) if s.self_draft and budget > 0 else []
    drafting = stats.time_draft_layers + stats.time_draft_heads - drafting
    run = run[:min(s.policy.ngram_tokens(len(steps), order, len(run)), nodes - len(steps))]
    tree, siblings = build_tree(s, pending, steps, run, order)
    t = s.clock.now()
    logits, exact = verify(s, tree, steps, start)
    if s.sampling.sample:
        path, nxt = accept_tree_sampling(tree, probabilities(logits, s.sampling), s.generator)
    else:
        path, nxt = accept_tree_greedy(tree, logits)
    s.cache.keep(start, [start + node for node in path])  # the pending token and the accepted candidates
    kept = slice(0, len(path)) if path == list(range(len(path))) else path  # a chain prefix: a view, no copy
    s.head.defer_kv({e: h[kept] for e, h in exact.items()}, start, s.cache)
    verify_seconds = s.clock.now() - t
    stats.time_verify += verify_seconds
    new = [tree.tokens[node] for node in path[1:]] + [nxt]
    on_chain = min(len(steps), next((i for i, node in enumerate(path) if node != i), len(path)) - 1)  # self-drafts
    s.policy.update(RoundResult(steps, on_chain, new[:on_chain + 1], verify_seconds, run, order, new, len(tree),
                                [(c.step, c.rank, c.token) for c in siblings], drafting, start))
    record(stats, tree, path, steps, on_chain)
    if s.ngram is not None:
        s.ngram.extend(new)
    return new


def record(stats, tree: TokenTree, path: list[int], steps: list[DraftStep], on_chain: int) -> None:
    stats.rounds += 1
    stats.drafted += len(tree) - 1
    stats.accepted += len(path) - 1
    stats.draft_lengths.append(len(tree) - 1)
    stats.accepted_per_round.append(len(path) - 1)
    stats.verify_start_layers.append(min((s.exact_until for s in steps), default=0))
    for source in SOURCES:
        stats.candidates[source] = stats.candidates.get(source, 0) + tree.sources.count(source)
        stats.accepted_from[source] = stats.accepted_from.get(source, 0) + sum(tree.sources[n] == source
                                                                               for n in path)
    for n in range(1, len(tree)):  # the self-draft's candidates by the draft head's rank
        if tree.sources[n] in (SELF, SIBLING):
            r = tree.ranks[n]
            stats.rank_candidates[r] = stats.rank_candidates.get(r, 0) + 1
            stats.rank_accepted[r] = stats.rank_accepted.get(r, 0) + (n in path)
    for i, step in enumerate(steps):
        stats.exit_layers.append(step.exit_layer)
        stats.skipped_layers.append(list(step.skipped))
        stats.exit_confidences.append(step.confidence)
        stats.accepted_flags.append(i < on_chain)
