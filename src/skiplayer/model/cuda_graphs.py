"""A static-shape one-token decode step, and a runner that replays it as one CUDA graph.

On a GPU our eager decode step is launch-bound: ~1300 small kernels per token, each costing more CPU time to launch
than the GPU needs to run it. `static_decode_step` computes the same logits as `Transformer.forward` on one token,
but with every shape fixed and nothing read back to the host: the position is a device tensor, RoPE rows are gathered
by it, K/V are written into the cache with `index_copy_` at it, and attention runs over the whole preallocated cache
with a mask built from it. Such a function can be captured once (`torch.cuda.CUDAGraph`) and replayed for every
token: one launch per step instead of ~1300.

`decode_step(model, positions)` is what autoregressive decoding uses: on CUDA a captured graph (kept per model and
cache size, reused across calls), anywhere else (or when the model runs the native CPU kernels, or capture fails) the
eager `model.forward`. Self-speculative rounds stay eager: drafts, verification and rollback vary in shape.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from skiplayer.model.kv_cache import KVCache
from skiplayer.model.llama import Transformer, apply_rope, linear, mlp_residual

# Set to False (or SKIPLAYER_CUDA_GRAPHS=0 in the environment) to decode eagerly on CUDA too: benchmarks compare both.
ENABLED = os.environ.get("SKIPLAYER_CUDA_GRAPHS", "1") != "0"
BUCKET = 256  # graph caches hold a multiple of this many positions, so prompts of similar length share one graph

Step = Callable[[int, int], torch.Tensor]  # (token, position) -> fp32 logits (vocab,)


def static_decode_step(model: Transformer, k_cache: torch.Tensor, v_cache: torch.Tensor, token: torch.Tensor,
                       pos: torch.Tensor) -> torch.Tensor:
    """Logits (1, vocab) of `token` (shape (1,), long) at position `pos` (shape (1,), long, same device), writing its
    K/V into k_cache/v_cache (n_layers, n_kv_heads, S, head_dim) at `pos`. Positions past `pos` are masked out, so
    the cache may hold anything there. No data-dependent shapes or host reads: capturable and compilable."""
    a = model.args
    group = a.n_heads // a.n_kv_heads
    cos, sin = model.rope_cos.index_select(0, pos), model.rope_sin.index_select(0, pos)  # (1, head_dim)
    mask = (torch.arange(k_cache.shape[2], device=pos.device) <= pos)[None, :]  # (1, S): attend to 0..pos
    h = model.embed(token)
    for i, block in enumerate(model.layers):
        at = block.attention
        q, k, v = at.split(at.wqkv(block.attention_norm(h)), cos, sin)  # (heads, 1, head_dim)
        q = apply_rope(q, cos, sin)
        keys, values = k_cache[i], v_cache[i]
        keys.index_copy_(1, pos, k)
        values.index_copy_(1, pos, v)
        # Grouped-query attention as in Attention.attend: each KV group's query heads form its rows.
        out = F.scaled_dot_product_attention(q.reshape(a.n_kv_heads, group, a.head_dim), keys, values, attn_mask=mask)
        h = h + at.wo(out.reshape(1, a.n_heads * a.head_dim))
        h = mlp_residual(block, h)
    return model.logits(h)


def uses_native_kernels(model: Transformer) -> bool:
    """Whether optimize_model turned on the native CPU kernels (custom ops that read the cache length on the host)."""
    if model.native_stack is not None or model.native_rows or model.head_packed:
        return True
    return any(getattr(m, "native", False) or getattr(m, "packed", False) or getattr(m, "native_rows", 0)
               for m in model.modules())


def eager_step(model: Transformer, cache: KVCache) -> Step:
    device = cache.k.device
    return lambda token, pos: model.forward(torch.tensor([token], device=device), pos, cache)[-1]


class GraphStep:
    """`static_decode_step` on one cache, captured as a CUDA graph at its first call and replayed after that.
    Calling it returns the graph's own logits buffer: read it before the next call."""

    def __init__(self, model: Transformer, cache: KVCache):
        self.model, self.cache = model, cache
        device = cache.k.device
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.n_layers = model.n_layers

    def _run(self) -> torch.Tensor:
        return static_decode_step(self.model, self.cache.k, self.cache.v, self.token, self.pos)[0]

    def capture(self) -> None:
        """Warm up on a side stream (lazy initialisation, kernel selection), then capture one step. Both write the
        current token's K/V at the current position, which the replay writes again: the cache ends up the same."""
        side = torch.cuda.Stream(device=self.cache.k.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._run()
        self.graph, self.logits = graph, logits

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        lengths = self.cache.lengths
        if pos + 1 > self.cache.max_len:
            raise RuntimeError(f"KV cache full: need {pos + 1} positions, have {self.cache.max_len}")
        assert min(lengths[:self.n_layers]) >= pos, f"gap in the cache below position {pos}"
        self.token.fill_(token)  # asynchronous copies of two host numbers into the graph's inputs
        self.pos.fill_(pos)
        if self.graph is None:
            self.capture()
        self.graph.replay()
        for i in range(self.n_layers):
            lengths[i] = pos + 1
        return self.logits


def _weights_key(model: Transformer) -> tuple:
    """Where the weights live: a captured graph reads them by address, so replaced weights need a new graph."""
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))


def decode_step(model: Transformer, positions: int) -> tuple[Step, KVCache]:
    """A step function for autoregressive decoding and an empty cache for at least `positions` positions (prefill
    writes into it eagerly). On CUDA the step replays a CUDA graph; its cache is kept with the model (one per size
    bucket) so later calls reuse the graph. Elsewhere the step is the eager `model.forward`."""
    device = model.tok_embeddings.weight.device
    if not (ENABLED and device.type == "cuda") or uses_native_kernels(model):
        cache = model.new_cache(positions)
        return eager_step(model, cache), cache
    size = min(model.max_seq_len, -(-positions // BUCKET) * BUCKET)
    graphs = model.__dict__.setdefault("_decode_graphs", {})
    key = (size, _weights_key(model))
    step = graphs.get(key)
    if step is None:
        graphs.clear()  # older sizes or weights: free their caches and graph memory
        step = graphs[key] = _Fallback(GraphStep(model, model.new_cache(size)))
    step.cache.reset()
    return step, step.cache


class _Fallback:
    """A GraphStep that turns into the eager step (with a warning) if capturing fails: decoding never breaks."""

    def __init__(self, graph_step: GraphStep):
        self.step, self.cache, self.failed = graph_step, graph_step.cache, None

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        if self.failed is None:
            try:
                return self.step(token, pos)
            except Exception as e:  # noqa: BLE001 - any capture failure: fall back, say why once
                if self.step.graph is not None:
                    raise
                self.failed = eager_step(self.step.model, self.cache)
                warnings.warn(f"skiplayer: CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly")
        return self.failed(token, pos)
