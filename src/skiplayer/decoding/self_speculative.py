"""Self-speculative decoding: draft with the shallow layers, verify with the rest, accept.

Each round: the pending token (the last accepted one, whose K/V is not yet in the cache) and the drafts form a
block. Drafting ran the block's tokens through shallow layers; verification starts at the shallowest layer any
draft did not run exactly (the exit layer E in the static case), feeds each token its stored hidden state there,
recomputes every deeper layer (overwriting the drafts' K/V) and scores all positions with the full head.
"""
from __future__ import annotations

import torch

from skiplayer.decoding.draft import DraftHead, draft_round
from skiplayer.decoding.sampling import accept_greedy, accept_sampling, probabilities
from skiplayer.decoding.stats import Clock
from skiplayer.model.kv_cache import KVCache
from skiplayer.model.llama import Transformer
from skiplayer.policies.base import DraftPolicy, DraftStep, RoundResult


def verify(model: Transformer, cache: KVCache, tokens: list[int], steps: list[DraftStep], start: int,
           head: DraftHead) -> torch.Tensor:
    """Full-model logits for the block `tokens` = [pending, *drafts] at positions start.. (len(steps)+1 rows)."""
    layer = min((s.exact_until for s in steps), default=0)
    # The last draft was never run through the model: bring it to `layer` exactly, then join the stored states.
    last = [model.embed(torch.tensor(tokens[-1:], device=cache.k.device))]
    h = model.forward_layers(last[0], start + len(steps), cache, 0, layer, {n: last.append for n in range(1, layer)})
    states = [s.hiddens for s in steps] + [last + [h]]  # states[j][l]: exact input of layer l <= `layer`, position j
    for e in head.slots:  # attention adapters read exact states of every kept position (deeper ones: taps)
        if e <= layer:
            head.write_kv(e, torch.cat([st[e] for st in states]), start, cache)
    h = torch.cat([st[layer] for st in states])
    return model.logits(model.forward_layers(h, start, cache, layer, model.n_layers, head.taps(start, cache)))


def speculative_round(model, cache, pending, start, budget, policy: DraftPolicy, head: DraftHead, sampling,
                      generator, clock: Clock, stop_ids) -> list[int]:
    """One draft → verify → accept round. Returns the new tokens (accepted drafts + one verified token)."""
    stats = clock.stats
    steps = draft_round(model, cache, pending, start, budget, policy, head, sampling, generator, clock, stop_ids)
    drafts = [s.token for s in steps]
    t = clock.now()
    logits = verify(model, cache, [pending, *drafts], steps, start, head)
    if sampling.sample:
        n, nxt = accept_sampling(drafts, [s.probs for s in steps], probabilities(logits, sampling), generator)
    else:
        n, nxt = accept_greedy(drafts, logits)
    cache.rollback(start + n + 1)  # keep the pending token and the accepted drafts
    verify_seconds = clock.now() - t
    stats.time_verify += verify_seconds
    new = drafts[:n] + [nxt]
    policy.update(RoundResult(steps, n, new, verify_seconds))
    stats.rounds += 1
    stats.drafted += len(steps)
    stats.accepted += n
    stats.draft_lengths.append(len(steps))
    stats.accepted_per_round.append(n)
    stats.verify_start_layers.append(min((s.exact_until for s in steps), default=0))
    for i, s in enumerate(steps):
        stats.exit_layers.append(s.exit_layer)
        stats.skipped_layers.append(list(s.skipped))
        stats.exit_confidences.append(s.confidence)
        stats.accepted_flags.append(i < n)
    return new
