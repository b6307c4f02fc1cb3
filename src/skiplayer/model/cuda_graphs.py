"""A static-shape one-token decode step, and a runner that replays it as one CUDA graph.

On a GPU our eager decode step is launch-bound: ~1300 small kernels per token, each costing more CPU time to launch
than the GPU needs to run it. `static_decode_step` computes the same logits as `Transformer.forward` on one token,
but with every shape fixed and nothing read back to the host: the position is a device tensor, RoPE rows are gathered
by it, K/V are written into the cache with `index_copy_` at it, and attention runs over the whole preallocated cache
with a mask built from it. Such a function can be captured once (`torch.cuda.CUDAGraph`) and replayed for every
token: one launch per step instead of ~1300.

`decode_step(model, positions)` is what autoregressive decoding uses: on CUDA a captured graph (kept per model and
cache size, reused across calls), anywhere else (or when the model runs the native CPU kernels, or capture fails) the
eager `model.forward`. `static_block_step` is the same for a block of T positions, a chain or a token tree: slots,
RoPE positions and attention masks are inputs, so verification passes of n-gram rounds replay one graph per block
length bucket (`block_runner`, `BlockGraphs`: lengths padded up to 2, 4, 8, 16, 32 or 64). Drafting with the model's
own layers, and blocks longer than the largest bucket, stay eager.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from skiplayer.model.kv_cache import KVCache
from skiplayer.model.llama import Transformer, TreeMask, apply_rope, mlp_residual

# Set to False (or SKIPLAYER_CUDA_GRAPHS=0 in the environment) to decode eagerly on CUDA too: benchmarks compare both.
ENABLED = os.environ.get("SKIPLAYER_CUDA_GRAPHS", "1") != "0"
BUCKET = 256  # graph caches hold a multiple of this many positions, so prompts of similar length share one graph

Step = Callable[[int, int], torch.Tensor]  # (token, position) -> fp32 logits (vocab,)


def static_decode_step(model: Transformer, k_cache: torch.Tensor, v_cache: torch.Tensor, token: torch.Tensor,
                       pos: torch.Tensor) -> torch.Tensor:
    """Logits (1, vocab) of `token` (shape (1,), long) at position `pos` (shape (1,), long, same device), writing its
    K/V into k_cache/v_cache (n_layers, n_kv_heads, S, head_dim) at `pos`. Positions past `pos` are masked out, so
    the cache may hold anything there. No data-dependent shapes or host reads: capturable and compilable."""
    masks = causal_masks(k_cache.shape[2], pos, model.args.sliding_window)
    return static_block_step(model, k_cache, v_cache, token, pos, pos, masks)


def static_block_step(model: Transformer, k_cache: torch.Tensor, v_cache: torch.Tensor, tokens: torch.Tensor,
                      slots: torch.Tensor, positions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Logits (T, vocab) of a block of T tokens (T,) (a chain, or a token tree's nodes), token i written into
    k_cache/v_cache (n_layers, n_kv_heads, S, head_dim) at cache slot slots[i] with RoPE at positions[i], and
    attending to the slots where masks[0, i] (masks[1, i] in sliding-window layers) is True: masks (2, T, S) bool,
    each row including its own slot. Every input a device tensor of fixed shape, no host reads: capturable and
    compilable. The layers as Block.forward computes them, Gemma's variations included."""
    a = model.args
    group, T = a.n_heads // a.n_kv_heads, tokens.shape[0]
    tables = [(model.rope_cos.index_select(0, positions), model.rope_sin.index_select(0, positions))]
    if model.rope_local_cos is not None:
        tables.append((model.rope_local_cos.index_select(0, positions), model.rope_local_sin.index_select(0, positions)))
    h = model.embed(tokens)
    for i, block in enumerate(model.layers):
        at = block.attention
        local = int(at.window > 0)
        cos, sin = tables[local]
        q, k, v = at.split(at.norm_qk(at.wqkv(block.attention_norm(h))), cos, sin)  # (heads, T, head_dim)
        q = apply_rope(q, cos, sin)
        keys, values = k_cache[i], v_cache[i]
        keys.index_copy_(1, slots, k)
        values.index_copy_(1, slots, v)
        # Grouped-query attention as in Attention.attend: each KV group's query heads form its rows.
        out = F.scaled_dot_product_attention(q.reshape(a.n_kv_heads, group * T, a.head_dim), keys, values,
                                             attn_mask=masks[local].repeat(group, 1))
        h = block.add_attention(h, at.wo(out.reshape(a.n_heads, T, a.head_dim).transpose(0, 1).reshape(T, -1)))
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
        """Capture one step (capture_graph). The warm-up and the capture write the current token's K/V at the
        current position, which the replay writes again: the cache ends up the same."""
        self.graph, self.logits = capture_graph(self._run, self.cache.k.device)

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


def capture_graph(run: Callable[[], torch.Tensor], device) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """run() warmed up twice on a side stream (lazy initialisation, kernel selection), then captured: the graph and
    the output buffer its replays write."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


def causal_masks(S: int, positions: torch.Tensor, window: int) -> torch.Tensor:
    """(2, T, S) bool for rows at cache slots = RoPE positions `positions` (T,): slots up to the row's own, and (for
    sliding-window layers) of those only the last `window`; static_block_step's masks for a chain."""
    slots = torch.arange(S, device=positions.device)[None, :]
    causal = slots <= positions[:, None]
    return torch.stack([causal, causal & (slots > positions[:, None] - window)])


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


BLOCK_LENGTHS = (2, 4, 8, 16, 32, 64)  # verification blocks are padded up to one of these: one graph each


class BlockGraphs:
    """`static_block_step` on one cache, one CUDA graph per block length in BLOCK_LENGTHS, each captured at its first
    use (eagerly instead where `capture` is False: CPUs, tests). A block of T tokens is padded to the next length:
    the padding rows sit at the slots after the block, attend to their own slot only, and are never read (their K/V
    lie past the cache's length, where the next write goes). Calling it returns the logits (T, vocab), a view of the
    graph's own buffer (read it before the next call), or None where T exceeds the largest length or capture failed
    (the caller then runs the block eagerly)."""

    def __init__(self, model: Transformer, cache: KVCache, capture: bool = True):
        self.model, self.cache, self.capture = model, cache, capture
        self.graphs: dict[int, tuple] = {}  # length -> (graph, its logits buffer, its input buffers)
        self.failed = False

    def __call__(self, tokens: list[int], start: int, tree: TreeMask | None) -> torch.Tensor | None:
        T, S = len(tokens), self.cache.max_len
        length = next((n for n in BLOCK_LENGTHS if n >= T), None)
        if self.failed or length is None or start + length > S:
            return None
        device = self.cache.k.device
        slots = start + torch.arange(length, device=device)
        positions = slots.clone()
        window = self.model.args.sliding_window
        if tree is not None:
            positions[:T] = tree.positions
            masks = torch.stack([tree.allowed(S), tree.allowed(S, window)])
        else:
            masks = causal_masks(S, slots[:T], window)
        own = torch.arange(S, device=device)[None, :] == slots[T:, None]  # padding rows: their own slot only
        masks = torch.cat([masks, own.expand(2, -1, -1)], dim=1)
        inputs = (torch.tensor(tokens + [0] * (length - T), device=device), slots, positions, masks)
        try:
            logits = self._run(length, inputs)
        except Exception as e:  # noqa: BLE001 - capture failed: eager blocks from now on, said once
            if not self.capture or length in self.graphs:  # not a capture failure
                raise
            self.failed = True
            warnings.warn(f"skiplayer: CUDA graph capture of verification blocks failed ({type(e).__name__}: {e}); "
                          f"verifying eagerly")
            return None
        for i in range(self.model.n_layers):
            self.cache.claim(i, start, T)
        return logits[:T]

    def _run(self, length: int, inputs: tuple) -> torch.Tensor:
        step = lambda *x: static_block_step(self.model, self.cache.k, self.cache.v, *x)  # noqa: E731
        if not self.capture:
            return step(*inputs)
        if length not in self.graphs:  # the warm-up writes K/V only at this block's slots, as the replay does
            static = tuple(x.clone() for x in inputs)
            self.graphs[length] = (*capture_graph(lambda: step(*static), self.cache.k.device), static)
        graph, logits, static = self.graphs[length]
        for buffer, x in zip(static, inputs):
            buffer.copy_(x)
        graph.replay()
        return logits


def blocks_apply(model: Transformer) -> bool:
    """Whether verification blocks replay CUDA graphs for this model: on CUDA, without the native CPU kernels."""
    return ENABLED and model.tok_embeddings.weight.device.type == "cuda" and not uses_native_kernels(model)


def block_runner(model: Transformer, positions: int, extra_layers: int = 0) -> tuple[BlockGraphs | None, KVCache]:
    """For self-speculative decoding: (the verification block runner or None, an empty cache for at least
    `positions` positions plus the largest padded block). Where blocks_apply, the cache and its graphs are kept with
    the model (one per size bucket, as decode_step's) so that later generations reuse them; a draft's attention
    adapters (extra cache layers) keep every pass eager."""
    if extra_layers or not blocks_apply(model):
        return None, model.new_cache(positions, extra_layers)
    size = min(model.max_seq_len, -(-(positions + BLOCK_LENGTHS[-1]) // BUCKET) * BUCKET)
    kept = model.__dict__.setdefault("_block_graphs", {})
    key = (size, _weights_key(model))
    runner = kept.get(key)
    if runner is None:
        kept.clear()
        runner = kept[key] = BlockGraphs(model, model.new_cache(size), capture=model.tok_embeddings.weight.is_cuda)
    runner.cache.reset()
    return runner, runner.cache
