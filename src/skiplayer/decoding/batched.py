"""Greedy decoding of many prompts at once (continuous batching), to produce the model's own outputs fast.

A decode step is memory-bound: one token reads every weight once. A step that runs the newest token of B sequences
together reads the weights once for B tokens; only attention runs per sequence, on its own cache. A sequence that
stops frees its slot for the next prompt. With the native batch-invariant kernels (model/optimize.py) every
sequence's logits are bit-identical to decoding it alone; other kernels may round differently with B rows.
Used by `skiplayer calibrate`; interactive generation stays in generate.py (one sequence, any strategy).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from skiplayer.decoding.generate import positions_needed
from skiplayer.decoding.sampling import greedy_token
from skiplayer.decoding.stopping import StopCriteria
from skiplayer.model.kv_cache import KVCache
from skiplayer.model.llama import Transformer


@dataclass
class Finished:
    index: int                                  # the prompt's index in the list given
    tokens: list[int]                           # greedy output, as generate_ids would return it
    rows: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # see generate_batched


@dataclass
class _Sequence:
    index: int
    cache: KVCache
    pos: int
    token: int
    stop: StopCriteria
    rows: dict[int, list[torch.Tensor]]


def batched_step(model: Transformer, tokens: list[int], positions: list[int], caches: list[KVCache],
                 on_layer: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Logits (B, vocab) for one new token of each of B sequences (token b at positions[b] of caches[b]).
    `on_layer(n, h)` sees the hidden states (B, dim) after the first n layers."""
    device = model.tok_embeddings.weight.device
    h = model.embed(torch.tensor(tokens, device=device))
    ropes = [model.rope(p, 1) for p in positions]
    for i, block in enumerate(model.layers):
        a = block.attention
        qkv = a.wqkv(block.attention_norm(h))  # the weight products see all B rows ...
        att = torch.cat([a.attend(qkv[b:b + 1], *ropes[b], caches[b], i, positions[b])  # ... attention one by one
                         for b in range(len(tokens))])
        h = block.mlp(block, block.add_attention(h, a.wo(att)))
        if on_layer is not None:
            on_layer(i + 1, h)
    return model.logits(h)


@torch.inference_mode()
def generate_batched(model: Transformer, prompts: list[list[int]], make_stop: Callable[[int], StopCriteria],
                     batch_size: int = 8, keep_layers: tuple[int, ...] = (), keep_prompt_rows: int = 1,
                     admit: Callable[[], bool] = lambda: True) -> Iterator[Finished]:
    """Greedy outputs of `prompts` (prompt i stops by make_stop(i)), at most `batch_size` decoding together;
    yields each sequence when it stops. A new prompt is admitted while admit() says so.

    For each n in `keep_layers` (layers run: an exit layer E, or n_layers for the last layer's output), `rows[n]`
    holds the hidden states of the prompt's last `keep_prompt_rows` positions, then of every output position but
    the last: exactly the rows that predict each output token (and the last prompt tokens)."""
    device = model.tok_embeddings.weight.device
    keep = sorted(set(keep_layers))
    cuts = sorted(set(keep) | {model.n_layers})
    queue = list(range(len(prompts)))[::-1]
    active: list[_Sequence] = []
    while queue or active:
        while queue and len(active) < batch_size and admit():
            i = queue.pop()
            stop = make_stop(i)
            ids = prompts[i]
            cache = model.new_cache(positions_needed(model, len(ids), stop.max_steps, 1))
            rows: dict[int, list[torch.Tensor]] = {n: [] for n in keep}
            h, layer = model.embed(torch.tensor(ids, device=device)), 0
            for n in cuts:  # the prefill: one block, cut where rows are kept
                h, layer = model.forward_layers(h, 0, cache, layer, n), n
                if n in rows:
                    rows[n].append(h[-keep_prompt_rows:].detach().to("cpu", copy=True))
            token = greedy_token(model.logits(h[-1:])[-1])
            seq = _Sequence(i, cache, len(ids), token, stop, rows)
            stop.extend([token])
            if stop.done:
                yield Finished(i, stop.tokens, rows)
            else:
                active.append(seq)
        if not active:  # the queue is empty or admission has stopped
            return

        def keep_rows(n, h):
            if n in keep:
                h = h.detach().to("cpu", copy=True)
                for b, s in enumerate(active):
                    s.rows[n].append(h[b:b + 1])

        logits = batched_step(model, [s.token for s in active], [s.pos for s in active], [s.cache for s in active],
                              keep_rows if keep else None)
        still = []
        for s, row in zip(active, logits):
            s.token, s.pos = greedy_token(row), s.pos + 1
            s.stop.extend([s.token])
            if s.stop.done:
                yield Finished(s.index, s.stop.tokens, s.rows)
            else:
                still.append(s)
        active = still
