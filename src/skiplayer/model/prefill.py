"""Prefill at the machine's speed: a long prompt block through oneDNN's bfloat16 matmuls (AMX tiles where the CPU has
them) and torch's flash attention, instead of the small-block kernels built for decoding.

The decoding kernels are batch invariant so that a verification pass reproduces one-token steps bit for bit; the
prefill needs no such thing (both strategies run the same prefill, so self-speculation stays token-identical to
autoregressive decoding), only determinism. On a 2-core Intel Xeon with AMX, oneDNN's bfloat16 products of a
613-token block run 5-6x faster than fp32 ones, and the native attention over 613 keys cost more than all of them.
What it costs in fidelity: matmul inputs and outputs are rounded to bfloat16 (8 significant bits) during the prefill
only; the residual stream, norms and the KV cache keep the model dtype. `benchmarks/vs_llamacpp.py --quality`
measures how often that changes a greedy output.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

from skiplayer.errors import UserError
from skiplayer.model.kv_cache import KVCache
from skiplayer.model.llama import Block, Linear, Transformer, apply_rope

PREFILL = ("auto", "bfloat16", "native")


def fast_bfloat16_matmuls() -> bool:
    """Whether this CPU has AMX tiles for bfloat16 (the path the prefill timings were measured on)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: no AMX detection, the native prefill
        return False
    return "amx_bf16" in flags and "amx_tile" in flags


def choose(prefill: str = "auto") -> str:
    """'bfloat16' or 'native' for `prefill` ('auto': bfloat16 where the CPU has AMX; SKIPLAYER_PREFILL overrides)."""
    env = os.environ.get("SKIPLAYER_PREFILL")
    if env is not None and env not in PREFILL:  # user input: a one-line error, no traceback
        raise UserError(f"SKIPLAYER_PREFILL={env!r}: prefill must be one of {', '.join(PREFILL)}; set one or unset it")
    prefill = env or prefill
    if prefill not in PREFILL:
        raise ValueError(f"prefill must be one of {PREFILL}, got {prefill!r}")
    if prefill == "auto":
        return "bfloat16" if fast_bfloat16_matmuls() else "native"
    return prefill


class Bfloat16Prefill:
    """Row-major bfloat16 copies of every layer matrix, run on blocks of at least `min_rows` positions at slot 0.
    The residual stream stays in float32 between the bfloat16 matmuls (float16 <-> bfloat16 conversions cost torch
    ~4x float32 <-> bfloat16 ones: 29% of a 613-token prefill when the stream was float16)."""

    def __init__(self, model: Transformer, min_rows: int = 32):
        self.min_rows = min_rows
        self.weights = [[_bf16(lin) for lin in (b.attention.wqkv, b.attention.wo, b.feed_forward.w13,
                                                b.feed_forward.w2)] for b in model.layers]
        self.qkv_bias = [None if b.attention.wqkv.bias is None else b.attention.wqkv.bias.to(torch.bfloat16)
                         for b in model.layers]
        self.norms = [(b.attention_norm.weight.float(), b.ffn_norm.weight.float()) for b in model.layers]

    def applies(self, T: int, start: int) -> bool:
        return start == 0 and T >= self.min_rows

    def layers(self, model: Transformer, h: torch.Tensor, cache: KVCache,
               taps: dict[int, Callable[[torch.Tensor], None]] | None = None) -> torch.Tensor:
        """All layers on the prompt block h (T, dim) at slots 0..T-1; taps as in Transformer.forward_layers."""
        cos, sin = model.rope(0, h.shape[0])
        rope_bf16 = cos.to(torch.bfloat16), sin.to(torch.bfloat16)
        dtype, eps = h.dtype, model.args.norm_eps
        h = h.float()
        for i, block in enumerate(model.layers):
            if taps and i in taps and i > 0:
                taps[i](h.to(dtype))
            wqkv, wo, w13, w2 = self.weights[i]
            attention_norm, ffn_norm = self.norms[i]
            qkv = F.linear(_norm(h, attention_norm, eps), wqkv, self.qkv_bias[i])
            h = h + F.linear(_attention(block, qkv, cos, sin, rope_bf16, cache, i, dtype), wo).float()
            gate_up = F.linear(_norm(h, ffn_norm, eps), w13)
            h = h + F.linear(block.feed_forward.act(gate_up), w2).float()
        return h.to(dtype)


def _bf16(linear: Linear) -> torch.Tensor:
    return linear.row_major_weight().to(torch.bfloat16).contiguous()


def _norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, rounded to bfloat16 for the matmul."""
    return F.rms_norm(h, (h.shape[-1],), weight, eps).to(torch.bfloat16)


def _attention(block: Block, qkv: torch.Tensor, cos, sin, rope_bf16, cache: KVCache, layer: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The cache write as decoding does it (RoPE'd K and V in the model dtype), and causal flash attention over
    slots 0..T-1 in bfloat16 on the block's own q/k/v. qkv: (T, (H + 2G) * D) bfloat16."""
    a, T = block.attention, qkv.shape[0]
    a.store_kv(qkv.to(dtype), cos, sin, cache, layer, 0)
    q, k, v = a.split(qkv, *rope_bf16)
    q = apply_rope(q, *rope_bf16)
    group = a.n_heads // a.n_kv_heads  # K/V repeated per query head: with enable_gqa SDPA leaves its flash kernel
    k, v = (t.repeat_interleave(group, dim=0) for t in (k, v))
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
    return out.transpose(0, 1).reshape(T, -1)
