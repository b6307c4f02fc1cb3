"""Our forward for Llama-family decoders (Llama, SmolLM, Mistral, Qwen2) and Gemma 3, gpt-fast style.

One model class: Gemma 3 is Llama with a few named variations (ModelArgs: scaled embeddings, q/k norms, norms after
attention and FFN, GeGLU, sliding-window layers with their own RoPE base), each a branch where it applies.

Activations are (T, dim): batch size one, T new positions. Every entry point takes the block's first position
`start` and the KV cache, so any layer range [a, b) can run on any block: drafting runs the shallow layers,
verification the deep ones, with the cache shared between them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from skiplayer.model.kv_cache import KVCache
from skiplayer.model.packing import packed_rows, unpack_pairs

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3_text")


@dataclass
class TreeMask:
    """Tree attention for a block of T rows written at cache slots start..start+T-1: row r sits at RoPE position
    positions[r] and attends to slots [0, paths[r, 0]) and to paths[r] (its ancestors and itself, root first, -1
    padded; drafts/tree.py). Without a TreeMask a block is a causal chain."""
    paths: torch.Tensor      # (T, W) int64 cache slots
    positions: torch.Tensor  # (T,) int64

    def allowed(self, S: int, window: int = 0) -> torch.Tensor:
        """(T, S) bool: which of the first S cache slots each row attends to (with a sliding `window`, only slots
        after position - window: ancestors always qualify, a tree being shallower than the window)."""
        paths = torch.where(self.paths >= 0, self.paths, self.paths[:, :1])  # padding repeats the root slot
        slots = torch.arange(S, device=paths.device)[None, :]
        allowed = (slots < paths[:, :1]).scatter(1, paths, True)
        return allowed & (slots > self.positions[:, None] - window) if window > 0 else allowed


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    # Gemma 3's variations (the defaults are Llama's):
    embed_scale: float = 1.0        # embeddings times sqrt(dim)
    qk_norm: bool = False           # RMSNorm of every q and k head before RoPE
    sandwich_norms: bool = False    # norms on the attention and FFN outputs too, before the residual adds
    hidden_act: str = "silu"        # "gelu_tanh": GeGLU
    sliding_window: int = 0         # local layers attend to the last `sliding_window` positions only ...
    sliding_layers: tuple = ()      # ... these layers, which also have their own RoPE base (local rope tables)

    @property
    def llama_layers(self) -> bool:
        """No Gemma variation in the layers: what the one-call native layers and the bfloat16 prefill compute."""
        return not (self.qk_norm or self.sandwich_norms or self.hidden_act != "silu" or self.sliding_layers)

    @classmethod
    def from_hf_config(cls, config) -> "ModelArgs":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        gemma = config.model_type == "gemma3_text"
        if gemma and (config.attn_logit_softcapping or config.final_logit_softcapping
                      or getattr(config, "use_bidirectional_attention", False)):
            raise ValueError("Gemma 3 configs with logit soft-capping or bidirectional attention are not supported")
        layer_types = getattr(config, "layer_types", None) or []
        return cls(
            vocab_size=config.vocab_size,
            dim=config.hidden_size,
            n_layers=config.num_hidden_layers,
            n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            norm_eps=config.rms_norm_eps,
            qkv_bias=config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            embed_scale=config.hidden_size ** 0.5 if gemma else 1.0,
            qk_norm=gemma,
            sandwich_norms=gemma,
            hidden_act="gelu_tanh" if gemma else "silu",
            sliding_window=int(config.sliding_window or 0) if gemma else 0,
            sliding_layers=tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention") if gemma else (),
        )


class RMSNorm(nn.Module):
    native: bool = False  # one fused op (torch.ops.skiplayer.rms_norm) instead of eight: set by model/optimize.py

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            return torch.ops.skiplayer.rms_norm(x, self.weight, self.eps)
        # Normalise in fp32 and scale in the model dtype, as HF Llama does, so half precision matches it.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear whose weight is float32 / bfloat16 / float16, int8 with a per-output-row fp32 `scale`
    (weight-only quantisation, see model/optimize.py), or uint8 GGUF blocks (model/gguf_blocks.py). Blocks of at
    most `native_rows` positions run the native batch-invariant kernel `torch.ops.skiplayer.small_linear` once optimize_model has enabled it. A `packed` weight
    (pairs of rows interleaved, model/packing.py) runs that kernel at every block size."""

    native_rows: int = 0
    packed: bool = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("scale", None)

    def forward(self, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.scale, self.native_rows, float_out, self.packed)

    def row_major_weight(self) -> torch.Tensor:
        """The weight as a row-major float (out, in) matrix, whatever its storage (packed, int8, GGUF blocks)."""
        return dequantize(unpack_pairs(self.weight) if self.packed else self.weight, self.scale, self.in_features)


def runs_native(T: int, native_rows: int, packed: bool) -> bool:
    """Whether a block of T positions goes through the native kernel (a packed weight has no other path)."""
    return packed or T <= native_rows


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, in_features: int | None = None) -> torch.Tensor:
    """A row-major weight in float: int8 rows times their fp32 scale (model/optimize.py), uint8 GGUF blocks of
    `in_features` columns dequantized (model/gguf_blocks.py), else as it is."""
    if weight.dtype == torch.uint8:
        from skiplayer.model.gguf_blocks import dequantize_blocks
        return dequantize_blocks(weight, in_features)
    return weight if scale is None else weight.float() * scale[:, None]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
           native_rows: int = 0, float_out: bool = False, packed: bool = False) -> torch.Tensor:
    """x (T, in) @ weight.T (+ bias), in x's dtype (fp32 if float_out), fp32 accumulation either way."""
    if runs_native(x.shape[0], native_rows, packed):
        return torch.ops.skiplayer.small_linear(x, weight, scale, bias, float_out, packed)
    if scale is not None or weight.dtype == torch.uint8:  # int8 / GGUF blocks: dequantise for a large block
        weight = dequantize(weight, scale, x.shape[-1]).to(x.dtype)
    y = F.linear(x, weight, bias)
    return y.float() if float_out else y


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (heads, T, head_dim); cos/sin: (T, head_dim). HF's rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    # RoPE, the cache write and causal attention in one batch-invariant op (torch.ops.skiplayer.rope_cache_attention)
    # instead of ~40 small ones: set by model/optimize.py.
    native: bool = False

    def __init__(self, a: ModelArgs, window: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.window = window  # > 0: a sliding-window layer, which uses the local rope tables (Transformer.rope)
        # One fused q/k/v matrix: one kernel call instead of three.
        self.wqkv = Linear(a.dim, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, bias=a.qkv_bias)
        self.wo = Linear(a.n_heads * a.head_dim, a.dim, bias=False)
        # Gemma: per-head norms of q and k. The attention scale 1/sqrt(query_pre_attn_scalar) is folded into
        # q_norm's weight (from_hf), so the attention kernels keep their 1/sqrt(head_dim).
        self.q_norm = RMSNorm(a.head_dim, a.norm_eps) if a.qk_norm else None
        self.k_norm = RMSNorm(a.head_dim, a.norm_eps) if a.qk_norm else None

    def rope_tables(self, cos: torch.Tensor, sin: torch.Tensor):
        """This layer's (T, head_dim) tables from what Transformer.rope gives: (T, D), or (2, T, D) = global, local
        for models with local layers."""
        if cos.dim() == 2:
            return cos, sin
        local = int(self.window > 0)
        return cos[local], sin[local]

    def norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """Fused q/k/v rows (..., (H + 2G) * D) with q and k normalised per head (Gemma); as they are otherwise."""
        if self.q_norm is None:
            return qkv
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        lead, D = q.shape[:-1], self.head_dim
        q = self.q_norm(q.reshape(-1, D)).reshape(*lead, q_size)
        k = self.k_norm(k.reshape(-1, D)).reshape(*lead, kv_size)
        return torch.cat([q, k, v], dim=-1)

    def split(self, qkv: torch.Tensor, cos, sin):
        """Fused q/k/v rows (..., T, ...) -> q (without RoPE: only attention needs it), k with RoPE and v, each
        (..., heads, T, head_dim); leading dims are a batch (calibration trains on whole sequences)."""
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.unflatten(-1, (self.n_heads, self.head_dim)).transpose(-3, -2)
        k = apply_rope(k.unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(-3, -2), cos, sin)
        return q, k, v.unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(-3, -2)

    def _native(self, qkv, cos, sin, cache: KVCache, layer: int, start: int, attend: bool,
                tree: TreeMask | None = None) -> torch.Tensor:
        cache.claim(layer, start, qkv.shape[0])
        return torch.ops.skiplayer.rope_cache_attention(qkv, cos, sin, cache.k[layer], cache.v[layer], start,
                                                        self.n_heads, self.n_kv_heads, attend,
                                                        None if tree is None else tree.paths, self.window)

    def write_kv(self, x, cos, sin, cache: KVCache, layer: int, start: int) -> None:
        """Only store this block's K/V (for positions that skip the layer): see Transformer.fill_kv."""
        self.store_kv(self.wqkv(x), cos, sin, cache, layer, start)

    def store_kv(self, qkv: torch.Tensor, cos, sin, cache: KVCache, layer: int, start: int) -> None:
        """RoPE'd K and V of fused q/k/v rows (T, (H + 2G) * D) into the cache at start..start+T-1, no attention."""
        qkv, (cos, sin) = self.norm_qk(qkv), self.rope_tables(cos, sin)
        if self.native:
            self._native(qkv, cos, sin, cache, layer, start, attend=False)
            return
        _, k, v = self.split(qkv, cos, sin)
        cache.write(layer, start, k, v)

    def attend(self, qkv: torch.Tensor, cos, sin, cache: KVCache, layer: int, start: int,
               tree: TreeMask | None = None) -> torch.Tensor:
        """One sequence's block of T positions from its fused q/k/v rows: RoPE, cache write, causal (or tree)
        attention over the cache; (T, n_heads * head_dim), before wo. Separate from forward() so that a batch of
        sequences can share the q/k/v and wo products (decoding/batched.py)."""
        T = qkv.shape[0]
        qkv, (cos, sin) = self.norm_qk(qkv), self.rope_tables(cos, sin)
        if self.native:
            return self._native(qkv, cos, sin, cache, layer, start, attend=True, tree=tree)
        q, k, v = self.split(qkv, cos, sin)
        q = apply_rope(q, cos, sin)
        keys, values = cache.write(layer, start, k, v)
        # Grouped-query attention without repeating K/V: fold the query heads of each KV group into the
        # sequence axis, (n_kv, group*T, head_dim), so each group attends to its own K/V.
        group = self.n_heads // self.n_kv_heads
        q = q.reshape(self.n_kv_heads, group * T, self.head_dim)
        mask = None
        if tree is not None:
            mask = tree.allowed(keys.shape[1], self.window).repeat(group, 1)
        elif T > 1 or 0 < self.window < start + T:
            S = keys.shape[1]
            rows = start + torch.arange(T, device=qkv.device)[:, None]
            slots = torch.arange(S, device=qkv.device)[None, :]
            allowed = (slots <= rows) & (slots > rows - self.window) if self.window else slots <= rows
            mask = allowed.repeat(group, 1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return out.reshape(self.n_heads, T, self.head_dim).transpose(0, 1).reshape(T, -1)

    def forward(self, x, cos, sin, cache: KVCache, layer: int, start: int, tree: TreeMask | None = None):
        return self.wo(self.attend(self.wqkv(x), cos, sin, cache, layer, start, tree))


class FeedForward(nn.Module):
    # silu(gate) * up (gelu_tanh(gate) * up) as one op (torch.ops.skiplayer.silu_mul / gelu_tanh_mul): set by
    # model/optimize.py
    native: bool = False

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.w13 = Linear(a.dim, 2 * a.intermediate_size, bias=False)  # gate and up, fused
        self.w2 = Linear(a.intermediate_size, a.dim, bias=False)
        self.gelu = a.hidden_act == "gelu_tanh"  # GeGLU (Gemma)

    def forward(self, x):
        return self.w2(self.act(self.w13(x)))

    def act(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up (gelu_tanh(gate) * up for GeGLU) of the fused gate/up rows (..., 2I) -> (..., I)."""
        if self.native:
            op = torch.ops.skiplayer.gelu_tanh_mul if self.gelu else torch.ops.skiplayer.silu_mul
            return op(gate_up.reshape(-1, gate_up.shape[-1])).reshape(*gate_up.shape[:-1], -1)
        gate, up = gate_up.chunk(2, dim=-1)
        return (F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)) * up


def mlp_residual(block: "Block", h: torch.Tensor) -> torch.Tensor:
    """The second half of a block, h + FFN(norm(h)) (h + norm(FFN(norm(h))) with sandwich norms): no cache, so
    torch.compile can take it (one graph shared by every layer and block size, see model/optimize.py)."""
    out = block.feed_forward(block.ffn_norm(h))
    return h + (out if block.post_ffn_norm is None else block.post_ffn_norm(out))


def native_layers(block: "Block", weights: list, scales: list, biases: list, norms: list, windows: list,
                  h: torch.Tensor, cos, sin, cache: KVCache, first: int, start: int, keep: list[int] = (),
                  tree: TreeMask | None = None) -> list[torch.Tensor]:
    """Layers first..first+len(biases)-1 in one native call (torch.ops.skiplayer.decoder_layers: the same ops as
    Block.forward without their Python overhead); weights/scales/biases/norms/windows: 6/4/1/4 or 0/1 per layer, as
    in Block.native_args (norms and windows: Gemma's variations). cos, sin: (T, D), or (2, T, D) with the local
    tables (Transformer.rope). `block`: any of them (shapes and options are the same for all). Returns the states
    entering each layer in `keep` (ascending, strictly inside the range), then the output."""
    for layer in range(first, first + len(biases)):
        cache.claim(layer, start, h.shape[0])
    a = block.attention
    local = (None, None)
    if cos.dim() == 3:  # the global tables, then the sliding layers' own
        cos, sin, local = cos[0], sin[0], (cos[1], sin[1])
    return torch.ops.skiplayer.decoder_layers(h, weights, scales, biases, cos, sin, cache.k, cache.v, first, start,
                                              a.n_heads, a.n_kv_heads, block.attention_norm.eps, a.wqkv.packed,
                                              list(keep), None if tree is None else tree.paths, norms, windows,
                                              *local, block.feed_forward.gelu)


class Block(nn.Module):
    mlp = staticmethod(mlp_residual)  # replaced by a compiled version by optimize_model(compile=True)
    # ([attention_norm, wqkv, wo, ffn_norm, w13, w2], [their 4 int8 scales or None], [qkv bias or None],
    # [q_norm, k_norm, post_attention_norm, post_ffn_norm] or [], [window] or []) for native_layers. Set by
    # model/optimize.py.
    native_args: tuple | None = None

    def __init__(self, a: ModelArgs, layer: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.attention = Attention(a, a.sliding_window if layer in a.sliding_layers else 0)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)
        self.feed_forward = FeedForward(a)
        # Gemma's norms on the sub-block outputs (HF: post_attention_layernorm / post_feedforward_layernorm)
        self.post_attention_norm = RMSNorm(a.dim, a.norm_eps) if a.sandwich_norms else None
        self.post_ffn_norm = RMSNorm(a.dim, a.norm_eps) if a.sandwich_norms else None

    def add_attention(self, x: torch.Tensor, attention_out: torch.Tensor) -> torch.Tensor:
        """The residual add after attention (its output normalised first with sandwich norms)."""
        if self.post_attention_norm is not None:
            attention_out = self.post_attention_norm(attention_out)
        return x + attention_out

    def runs_native(self, T: int) -> bool:
        a = self.attention
        return self.native_args is not None and runs_native(T, a.wqkv.native_rows, a.wqkv.packed)

    def forward(self, x, cos, sin, cache, layer, start, tree: TreeMask | None = None):
        if self.runs_native(x.shape[0]):
            return native_layers(self, *self.native_args, x, cos, sin, cache, layer, start, tree=tree)[0]
        h = self.add_attention(x, self.attention(self.attention_norm(x), cos, sin, cache, layer, start, tree))
        return self.mlp(self, h)


class Transformer(nn.Module):
    def __init__(self, a: ModelArgs, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                 rope_local: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.args = a
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a, i) for i in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.output = None if a.tie_word_embeddings else Linear(a.dim, a.vocab_size, bias=False)
        # The head logits() uses when given no head_weight, when it differs from head_weight (int8 copy): set by
        # model/optimize.py. head_weight stays float; head_rows() gives row subsets of it (draft vocabularies).
        self.lm_head: Linear | None = None
        self.native_rows = 0  # blocks up to this many positions use the native kernels (model/optimize.py)
        self.head_packed = False  # head_weight stored pair-packed for the native kernel (model/packing.py)
        self.native_stack: tuple | None = None  # every layer's Block.native_args, concatenated (model/optimize.py)
        self.wide_prefill = None  # the prompt block's own kernels (model/prefill.py), set by model/optimize.py
        self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.register_buffer("rope_sin", rope_sin, persistent=False)
        # (max_len, head_dim) tables of the sliding-window layers' RoPE base, when the model has such layers
        self.register_buffer("rope_local_cos", None if rope_local is None else rope_local[0], persistent=False)
        self.register_buffer("rope_local_sin", None if rope_local is None else rope_local[1], persistent=False)

    @property
    def n_layers(self) -> int:
        return self.args.n_layers

    @property
    def max_seq_len(self) -> int:
        return self.rope_cos.shape[0]

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head as stored (pair-packed when head_packed): use head_rows() for its rows."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def head_rows(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `ids` of the LM head (all rows when None), row-major whatever the storage: draft vocabularies."""
        w = self.head_weight
        if not self.head_packed:
            return w if ids is None else w[ids]
        return unpack_pairs(w) if ids is None else packed_rows(w, ids)

    def new_cache(self, max_len: int, extra_layers: int = 0) -> KVCache:
        """`extra_layers` slots after the model's own: K/V of a draft's attention adapters (decoding/draft.py)."""
        w = self.tok_embeddings.weight
        return KVCache(self.n_layers + extra_layers, self.args.n_kv_heads, self.args.head_dim, max_len, w.dtype,
                       w.device)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.head_packed and self.output is None:  # tied: the table is the packed head
            h = packed_rows(self.tok_embeddings.weight, tokens)
        else:
            h = self.tok_embeddings(tokens)
        if self.args.embed_scale != 1.0:  # Gemma: scaled in the table's dtype, as HF does
            h = h * torch.tensor(self.args.embed_scale, dtype=h.dtype)
        return h

    def rope(self, start: int, T: int, tree: TreeMask | None = None):
        """cos, sin of positions start..start+T-1 (a tree's positions): (T, head_dim) each, or (2, T, head_dim)
        (global, local) when the model has sliding-window layers; Attention.rope_tables picks a layer's."""
        rows = tree.positions if tree is not None else slice(start, start + T)
        if self.rope_local_cos is None:
            return self.rope_cos[rows], self.rope_sin[rows]
        return (torch.stack([self.rope_cos[rows], self.rope_local_cos[rows]]),
                torch.stack([self.rope_sin[rows], self.rope_local_sin[rows]]))

    def forward_layers(self, h: torch.Tensor, start: int, cache: KVCache, first: int, last: int,
                       taps: dict[int, Callable[[torch.Tensor], None]] | None = None,
                       tree: TreeMask | None = None) -> torch.Tensor:
        """Run layers [first, last) on a block of T positions written at cache slots start..start+T-1 (a causal
        chain, or a token tree); `taps[n](h)` gets the states entering layer n, for first < n < last, in layer
        order (after the whole range where it runs natively). h: (T, dim)."""
        cos, sin = self.rope(start, h.shape[0], tree)
        keep = sorted(n for n in taps or () if first < n < last)
        if first < last and self.native_stack is not None and self.layers[first].runs_native(h.shape[0]):
            weights, scales, biases, norms, windows = self.native_stack  # the whole range in one call
            *states, h = native_layers(self.layers[first], weights[6 * first:6 * last], scales[4 * first:4 * last],
                                       biases[first:last], norms[4 * first:4 * last], windows[first:last], h, cos,
                                       sin, cache, first, start, keep, tree)
            for n, state in zip(keep, states):
                taps[n](state)
            return h
        for i in range(first, last):
            if i in keep:
                taps[i](h)
            h = self.layers[i](h, cos, sin, cache, i, start, tree)
        return h

    def prefill(self, tokens: torch.Tensor, cache: KVCache,
                taps: dict[int, Callable[[torch.Tensor], None]] | None = None) -> torch.Tensor:
        """All layers on a prompt (T,) at cache slots 0..T-1: the hidden states (T, dim). A long prompt goes through
        `wide_prefill` when set (model/prefill.py: fast, deterministic, not batch invariant), else forward_layers."""
        h = self.embed(tokens)
        if self.wide_prefill is not None and self.wide_prefill.applies(h.shape[0], 0):
            return self.wide_prefill.layers(self, h, cache, taps)
        return self.forward_layers(h, 0, cache, 0, self.n_layers, taps)

    def fill_kv(self, layer: int, h: torch.Tensor, start: int, cache: KVCache) -> None:
        """Write layer `layer`'s K/V computed from hidden states `h` without running the layer: for draft tokens that
        skipped or exited below it. Only drafts read these entries; verification overwrites them."""
        block = self.layers[layer]
        cos, sin = self.rope(start, h.shape[0])
        block.attention.write_kv(block.attention_norm(h), cos, sin, cache, layer, start)

    def logits(self, h: torch.Tensor, head_weight: torch.Tensor | None = None, packed: bool = False) -> torch.Tensor:
        """Final norm + LM head (intermediate exits use the final norm too): fp32 logits (T, vocab) whatever the
        model dtype. `head_weight` may be rows of the head (head_rows: a reduced draft vocabulary), row-major or
        pair-packed (`packed`, model/packing.py)."""
        h = self.norm(h)
        if head_weight is None and self.lm_head is not None:
            return self.lm_head(h, float_out=True)
        if head_weight is None:
            return linear(h, self.head_weight, native_rows=self.native_rows, float_out=True, packed=self.head_packed)
        return linear(h, head_weight, native_rows=self.native_rows, float_out=True, packed=packed)

    def forward(self, tokens: torch.Tensor, start: int, cache: KVCache) -> torch.Tensor:
        """Full model on a block of tokens: logits (T, vocab)."""
        return self.logits(self.forward_layers(self.embed(tokens), start, cache, 0, self.n_layers))

    @classmethod
    def from_hf(cls, hf_model, dtype: torch.dtype | None = None, device="cpu") -> "Transformer":
        """Build from a loaded HF Llama/Mistral/Qwen2/Gemma 3 model (fuses q/k/v and gate/up)."""
        config = hf_model.config
        a = ModelArgs.from_hf_config(config)
        gemma = a.qk_norm
        dtype = dtype or next(hf_model.parameters()).dtype
        # RoPE tables up to 32k positions (Gemma 3 and Llama 3 configs say 128k: 0.5 GB of tables we never read)
        max_len = min(int(getattr(config, "max_position_embeddings", 4096) or 4096), 32768)
        positions = torch.arange(max_len)[None]
        probe = torch.zeros(1, dtype=torch.float32)
        with torch.no_grad():
            if gemma:
                cos, sin = hf_model.model.rotary_emb(probe, positions, "full_attention")
                local = hf_model.model.rotary_emb(probe, positions, "sliding_attention")
            else:
                cos, sin = hf_model.model.rotary_emb(probe, positions)
        with torch.device("meta"):
            empty = torch.empty(max_len, a.head_dim)
            model = cls(a, empty, empty, (empty, empty) if gemma else None)
        hf = hf_model.model

        def norm(module) -> torch.Tensor:  # Gemma's RMSNorm scales by 1 + weight: store that sum
            return 1.0 + module.weight.float() if gemma else module.weight

        sd = {
            "tok_embeddings.weight": hf.embed_tokens.weight,
            "norm.weight": norm(hf.norm),
        }
        if not a.tie_word_embeddings:
            sd["output.weight"] = hf_model.lm_head.weight
        for i, layer in enumerate(hf.layers):
            at, mlp = layer.self_attn, layer.mlp
            p = f"layers.{i}."
            sd[p + "attention.wqkv.weight"] = torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight])
            if a.qkv_bias:
                sd[p + "attention.wqkv.bias"] = torch.cat([at.q_proj.bias, at.k_proj.bias, at.v_proj.bias])
            sd[p + "attention.wo.weight"] = at.o_proj.weight
            sd[p + "feed_forward.w13.weight"] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            sd[p + "feed_forward.w2.weight"] = mlp.down_proj.weight
            sd[p + "attention_norm.weight"] = norm(layer.input_layernorm)
            if gemma:
                sd[p + "ffn_norm.weight"] = norm(layer.pre_feedforward_layernorm)
                sd[p + "post_attention_norm.weight"] = norm(layer.post_attention_layernorm)
                sd[p + "post_ffn_norm.weight"] = norm(layer.post_feedforward_layernorm)
                # attention scale 1/sqrt(query_pre_attn_scalar) where the kernels use 1/sqrt(head_dim)
                q_scale = (a.head_dim / config.query_pre_attn_scalar) ** 0.5
                sd[p + "attention.q_norm.weight"] = norm(at.q_norm) * q_scale
                sd[p + "attention.k_norm.weight"] = norm(at.k_norm)
            else:
                sd[p + "ffn_norm.weight"] = layer.post_attention_layernorm.weight
        sd = {k: v.detach().to(device=device, dtype=dtype) for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        model.rope_cos = cos[0].to(device=device, dtype=dtype)
        model.rope_sin = sin[0].to(device=device, dtype=dtype)
        if gemma:
            model.rope_local_cos = local[0][0].to(device=device, dtype=dtype)
            model.rope_local_sin = local[1][0].to(device=device, dtype=dtype)
        return model.eval().requires_grad_(False)
