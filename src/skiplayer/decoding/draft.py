"""Drafting: run each drafted token through the shallow layers its policy plans, and record what it ran.

Tokens that exit below a layer, or skip it, leave no exact K/V there. Later drafted tokens still need something
to attend to, so the missing entries are filled from the token's last hidden state (state propagation, as in
CALM). Only drafts read these approximate entries: verification recomputes every layer from the shallowest one
any draft did not run exactly, so the output stays lossless.
"""
from __future__ import annotations

import weakref

import torch

from skiplayer.decoding.sampling import SamplingConfig, greedy_token, probabilities, sample
from skiplayer.decoding.stats import Clock
from skiplayer.model.gguf_blocks import block_rows
from skiplayer.model.kv_cache import KVCache
from skiplayer.model.llama import Transformer
from skiplayer.model.optimize import keep_weights_cached
from skiplayer.model.packing import pack_pairs
from skiplayer.policies.base import DraftPolicy, DraftStep


class DraftHead:
    """Final norm + LM head for drafts. A calibrated draft adds an adapter per exit depth (applied to the hidden
    state before the norm) and may score only a reduced vocabulary (rows of the head) to make exits cheap.

    An attention adapter (draft_artifact.AttentionAdapter) attends over the states at its depth of all earlier
    positions, kept as K/V in an extra cache slot (`extra_layers`): drafting writes them for drafted tokens;
    the prompt's and verification's exact states of the positions kept wait (`defer_kv`) until a draft next reads
    the slot, and their K/V are written then in one call: rounds that draft nothing (adaptive, n-gram runs) cost no
    adapter work."""

    def __init__(self, model: Transformer, vocab_ids: torch.Tensor | None = None, adapters: dict | None = None):
        from skiplayer.draft_artifact import AttentionAdapter
        self.model, self.vocab_ids, self.adapters = model, vocab_ids, adapters or {}
        # a reduced head is stored like the model's: pair-packed when the native kernel streams it (~20% faster), or
        # as rows of the head's GGUF blocks (a quarter of float16's bytes: decoding on them is memory-bound)
        blocks = model.lm_head is not None and model.lm_head.weight.dtype == torch.uint8
        self.packed = vocab_ids is not None and model.head_packed and not blocks
        self.weight = None if vocab_ids is None else _reduced_head(model, vocab_ids, blocks, self.packed)
        if self.weight is not None and self.adapters:  # read again at every draft step: kept in the caches if small
            keep_weights_cached([t for layer in model.layers[:max(self.adapters)]
                                 for t in layer.state_dict(keep_vars=True).values()] + [self.weight])
        attention = sorted(e for e, a in self.adapters.items() if isinstance(a, AttentionAdapter))
        self.slots = {e: model.n_layers + j for j, e in enumerate(attention)}  # depth -> cache slot
        self.extra_layers = len(self.slots)
        self.pending: dict[int, list[torch.Tensor]] = {e: [] for e in self.slots}  # exact states not yet written
        self.pending_from: dict[int, int] = {}  # position of each depth's first pending state

    def __call__(self, h: torch.Tensor, depth: int, pos: int = 0, cache: KVCache | None = None,
                 exit_hidden: dict | None = None) -> torch.Tensor:
        adapter = self.adapters.get(depth)
        if depth in self.slots:
            self.flush_kv(depth, cache)
            gap = cache.lengths[self.slots[depth]]
            if gap < pos:  # earlier drafts of this round did not stop here: approximate K/V from their last states
                self.write_kv(depth, torch.cat([exit_hidden[p] for p in range(gap, pos)]), gap, cache)
            h = adapter(h, *self.model.rope(pos, h.shape[0]), cache, self.slots[depth], pos)
        elif adapter is not None:
            h = adapter(h)
        return self.model.logits(h, self.weight, self.packed)[-1]

    def write_kv(self, depth: int, h: torch.Tensor, start: int, cache: KVCache) -> None:
        """K/V at the adapter's slot for states h (T, dim) at positions start..start+T-1."""
        self.adapters[depth].write_kv(h, *self.model.rope(start, h.shape[0]), cache, self.slots[depth], start)

    def defer_kv(self, states: dict[int, torch.Tensor], start: int, cache: KVCache) -> None:
        """Exact states (T, dim) entering each adapter depth at the kept positions start..start+T-1: the slot forgets
        what drafting wrote from `start` on, and the states wait for flush_kv."""
        for e, h in states.items():
            if not self.pending[e]:
                self.pending_from[e] = start
            self.pending[e].append(h)
            slot = self.slots[e]
            cache.lengths[slot] = min(cache.lengths[slot], self.pending_from[e])

    def flush_kv(self, depth: int, cache: KVCache) -> None:
        """Write the K/V of the states deferred at this depth, in one call."""
        if self.pending.get(depth):
            self.write_kv(depth, torch.cat(self.pending[depth]), self.pending_from[depth], cache)
            self.pending[depth].clear()

    def taps(self, start: int, cache: KVCache) -> dict:
        """forward_layers taps that keep a block's exact states for the attention adapters (deferred like a
        verification's: a generation that never drafts never computes their K/V; 0.9 ms of a gsm8k prompt)."""
        return {n: lambda h, n=n: self.defer_kv({n: h}, start, cache) for n in self.slots}

    def to_full(self, index: int) -> int:
        return index if self.vocab_ids is None else int(self.vocab_ids[index])

    def full_probs(self, probs: torch.Tensor) -> torch.Tensor:
        if self.vocab_ids is None:
            return probs
        return torch.zeros(self.model.args.vocab_size, dtype=probs.dtype).scatter(0, self.vocab_ids, probs)


# model -> [(source head, vocab_ids, rows)]: a draft's rows are gathered once per model, head storage and draft (35 ms
# for the default model's blocks), not at every generation
_REDUCED_HEADS: "weakref.WeakKeyDictionary[Transformer, list]" = weakref.WeakKeyDictionary()


def _reduced_head(model: Transformer, vocab_ids: torch.Tensor, blocks: bool, packed: bool) -> torch.Tensor:
    source = model.lm_head.weight if blocks else model.head_weight
    cached = _REDUCED_HEADS.setdefault(model, [])
    for head, ids, rows in cached:
        if head is source and ids is vocab_ids:
            return rows
    if blocks:
        rows = block_rows(source, model.args.dim, vocab_ids)
    else:
        rows = model.head_rows(vocab_ids).contiguous()
        rows = pack_pairs(rows) if packed else rows
    cached[:] = cached[-3:] + [(source, vocab_ids, rows)]   # a few drafts at most: no unbounded growth
    return rows


def draft_round(model: Transformer, cache: KVCache, token: int, start: int, budget: int, policy: DraftPolicy,
                head: DraftHead, sampling: SamplingConfig, generator, clock: Clock, stop_ids=(),
                width: int = 1) -> list[DraftStep]:
    """Draft up to `budget` tokens after `token` (at position `start`); each step also keeps the draft head's next
    `width - 1` candidates (token trees)."""
    steps: list[DraftStep] = []
    exit_hidden: dict[int, torch.Tensor] = {}  # position -> last hidden state of a token that ran fewer layers
    for i in range(budget):
        pos = start + i
        step = draft_step(model, cache, token, pos, i, policy, head, sampling, generator, clock, exit_hidden, width)
        exit_hidden[pos] = step.hiddens[-1]
        steps.append(step)
        token = step.token
        if token in stop_ids or not policy.keep_drafting(step):
            break
    return steps


def draft_step(model, cache, token, pos, index, policy, head, sampling, generator, clock, exit_hidden,
               width: int = 1) -> DraftStep:
    plan = policy.plan(index)
    t = clock.now()
    h = model.embed(torch.tensor([token], device=cache.k.device))
    hiddens, probe_tokens, logits, depth = [], {}, None, plan.exit_layer
    # Nothing to do between layers (no skips, probes or K/V gaps: static exits): one call keeping each layer's input
    plain = (not plan.skip_layers and all(p >= depth for p in plan.probe_layers)
             and min(cache.lengths[:depth], default=pos) >= pos)
    if plain:
        hiddens.append(h)
        h = model.forward_layers(h, pos, cache, 0, depth, {n: hiddens.append for n in range(1, depth)})
    for layer in () if plain else range(plan.exit_layer):
        hiddens.append(h)
        gap = cache.lengths[layer]
        if gap < pos:  # earlier drafts exited below this layer: give them approximate K/V here
            model.fill_kv(layer, torch.cat([exit_hidden[p] for p in range(gap, pos)]), gap, cache)
        if layer in plan.skip_layers:
            model.fill_kv(layer, h, pos, cache)
        else:
            h = model.forward_layers(h, pos, cache, layer, layer + 1)
        if layer + 1 in plan.probe_layers and layer + 1 < plan.exit_layer:
            t = clock.charge("time_draft_layers", t)
            logits = head(h, layer + 1, pos, cache, exit_hidden)
            clock.stats.probe_heads += 1
            top_p, top_i = torch.softmax(logits.float(), -1).max(-1)
            probe_tokens[layer + 1] = head.to_full(int(top_i))
            t = clock.charge("time_draft_heads", t)
            if policy.exit_here(index, layer + 1, probe_tokens[layer + 1], float(top_p)):
                depth = layer + 1
                break
            logits = None
    hiddens.append(h)
    t = clock.charge("time_draft_layers", t)
    if logits is None:
        logits = head(h, depth, pos, cache, exit_hidden)
    if sampling.sample:
        probs = probabilities(logits, sampling)
        choice = sample(probs, generator)
        ranked = probs
    else:
        ranked = torch.softmax(logits.float(), -1)
        choice, probs = greedy_token(logits), None
    confidence = float(ranked[choice])
    alternatives = []
    if width > 1:  # the head's next best candidates (not the chosen one), for siblings in a token tree
        top_p, top_i = ranked.topk(min(width, ranked.shape[-1]))
        alternatives = [(head.to_full(i), p) for p, i in zip(top_p.tolist(), top_i.tolist())
                        if i != choice and p > 0][:width - 1]
    if sampling.sample:
        probs = head.full_probs(probs)
    probe_tokens[depth] = head.to_full(choice)
    clock.charge("time_draft_heads", t)
    skipped = tuple(sorted(s for s in plan.skip_layers if s < depth))
    return DraftStep(head.to_full(choice), depth, skipped, confidence, probs, hiddens, probe_tokens, alternatives)
