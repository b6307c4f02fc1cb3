"""GGUF weights as the file stores them: Q4_0 / Q4_1 / Q8_0 blocks, multiplied by the native kernels without expanding
them (kernels/qblocks.h), instead of the float copy `load.py` converts the file to.

A block-quantized Linear keeps a uint8 weight (N, K / 32 * bytes per block) holding the file's blocks row by row; the
format follows from the bytes per block (18: Q4_0, 20: Q4_1, 34: Q8_0). The kernels dequantize each weight in
registers to exactly the fp32 value ggml's own dequantization gives (d * q + m), so the weights the model computes with
are the file's, bit for bit; the float16 path rounds them to 11 significant bits on top. Matrices in other formats
(F16/F32, the K-quants) keep their float copy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from skiplayer.model.llama import Linear, Transformer

BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # per block of 32 weights


def block_format(weight: torch.Tensor, in_features: int) -> str:
    """The GGUF format of a uint8 block weight (N, bytes) with `in_features` columns."""
    for name, size in BLOCK_BYTES.items():
        if in_features % 32 == 0 and weight.shape[-1] == in_features // 32 * size:
            return name
    raise ValueError(f"a uint8 weight of {weight.shape[-1]} bytes per row holds no Q4_0/Q4_1/Q8_0 blocks of "
                     f"{in_features} columns")


def dequantize_blocks(weight: torch.Tensor, in_features: int) -> torch.Tensor:
    """(N, bytes) uint8 blocks -> (N, in_features) float32, the values ggml's dequantization gives."""
    fmt = block_format(weight, in_features)
    n = weight.shape[0]
    b = weight.reshape(n, in_features // 32, BLOCK_BYTES[fmt])
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # (n, blocks, 1)
    if fmt == "Q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).float()
        return (d * q).reshape(n, in_features)
    nibbles = b[..., 4:] if fmt == "Q4_1" else b[..., 2:]
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).float()  # byte j: element j (low), j + 16 (high)
    m = b[..., 2:4].contiguous().view(torch.float16).float() if fmt == "Q4_1" else -8 * d
    return torch.addcmul(m, q, d).reshape(n, in_features)  # d * q is exact: one rounding, as in ggml


def _unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo the row order llama.cpp's converter gives q/k projections (rotary halves interleaved per head)."""
    n = rows.shape[0]
    perm = np.arange(n).reshape(heads, 2, n // heads // 2).swapaxes(1, 2).reshape(-1)
    return rows[np.argsort(perm)]


def read_blocks(path: str | Path) -> tuple[str, dict[str, tuple[str, np.ndarray]]]:
    """The file's architecture, and name -> (format, (rows, bytes) uint8) for every Q4_0 / Q4_1 / Q8_0 tensor."""
    from gguf import GGUFReader
    reader = GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else ""
    return arch, {t.name: (t.tensor_type.name, np.asarray(t.data)) for t in reader.tensors
                  if t.tensor_type.name in BLOCK_BYTES}


def _blocks_weight(parts: list[tuple[str, np.ndarray]]) -> torch.Tensor | None:
    """One uint8 weight from row-concatenated parts, or None when they are not all one supported format."""
    if not parts or any(p is None for p in parts) or len({fmt for fmt, _ in parts}) != 1:
        return None
    return torch.from_numpy(np.ascontiguousarray(np.concatenate([rows for _, rows in parts])))


def use_gguf_blocks(model: Transformer, path: str | Path) -> dict[str, int]:
    """Give `model` (built from the file's float conversion, not yet optimize_model'ed) the file's own blocks for
    every matrix stored as Q4_0 / Q4_1 / Q8_0; returns how many matrices took each format. The LM head becomes
    `model.lm_head` (the float table stays for the embedding lookup and head_rows)."""
    a = model.args
    arch, blocks = read_blocks(path)
    permuted = arch == "llama"  # llama.cpp's converter reorders q/k rows for Llama-architecture files only
    counts: dict[str, int] = {}

    def put(linear: Linear, parts) -> None:
        w = _blocks_weight(parts)
        if w is None:
            return
        fmt = block_format(w, linear.in_features)
        if w.shape[0] != linear.out_features:
            raise ValueError(f"GGUF blocks of {w.shape[0]} rows for a matrix of {linear.out_features}")
        linear.weight = nn.Parameter(w, requires_grad=False)
        linear.scale = None
        counts[fmt] = counts.get(fmt, 0) + 1

    def get(name: str, heads: int | None = None):
        if name not in blocks:
            return None
        fmt, rows = blocks[name]
        return fmt, (_unpermute(rows, heads) if heads and permuted else rows)

    for i, block in enumerate(model.layers):
        p = f"blk.{i}."
        put(block.attention.wqkv, [get(p + "attn_q.weight", a.n_heads), get(p + "attn_k.weight", a.n_kv_heads),
                                   get(p + "attn_v.weight")])
        put(block.attention.wo, [get(p + "attn_output.weight")])
        put(block.feed_forward.w13, [get(p + "ffn_gate.weight"), get(p + "ffn_up.weight")])
        put(block.feed_forward.w2, [get(p + "ffn_down.weight")])
    head = get("output.weight") or (get("token_embd.weight") if model.output is None else None)
    if head is not None:
        model.lm_head = Linear(a.dim, a.vocab_size, bias=False, device="meta")
        model.lm_head.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        put(model.lm_head, [head])
    return counts
