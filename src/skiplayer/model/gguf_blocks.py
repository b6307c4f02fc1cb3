"""GGUF weights as the file stores them: Q4_0 / Q4_1 / Q8_0 blocks, multiplied by the native kernels without expanding
them (kernels/qblocks.h), instead of the float copy `load.py` converts the file to.

A block-quantized Linear keeps a uint8 weight (N, K / 32 * bytes per block): the file's blocks, re-laid out per row
for the kernels (pack_blocks; qblocks.h says why), told apart by their bytes per block (22: Q4_1 and Q4_0, the latter
as m = -8d; 36: Q8_0). The kernels compute with exactly the fp32 values ggml's own dequantization gives (d * q + m),
so the weights are the file's, bit for bit; the float16 path rounds them to 11 significant bits on top. Matrices in
other formats (F16/F32, the K-quants) keep their float copy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from skiplayer.model.llama import Linear, Transformer

FILE_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # per block of 32 weights, in the file
KERNEL_BLOCK_BYTES = {"Q4": 22, "Q8": 36}  # in the kernels' layout


def kernel_format(weight: torch.Tensor, in_features: int) -> str:
    """'Q4' or 'Q8': the kernel layout of a uint8 block weight (N, bytes) with `in_features` columns."""
    for name, size in KERNEL_BLOCK_BYTES.items():
        if in_features % 32 == 0 and weight.shape[-1] == in_features // 32 * size:
            return name
    raise ValueError(f"a uint8 weight of {weight.shape[-1]} bytes per row holds no packed GGUF blocks of "
                     f"{in_features} columns")


def pack_blocks(fmt: str, rows: np.ndarray) -> torch.Tensor:
    """A file's (N, blocks * file bytes) uint8 rows of format `fmt` -> the kernels' layout (qblocks.h): per row, nb
    blocks of [fp32 d][quants], then (Q4) nb fp16 m."""
    n = rows.shape[0]
    b = np.ascontiguousarray(rows).reshape(n, -1, FILE_BLOCK_BYTES[fmt])
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)  # (n, nb, 1): exact
    if fmt == "Q8_0":
        return torch.from_numpy(np.concatenate([d.view(np.uint8), b[..., 2:]], axis=-1).reshape(n, -1).copy())
    if fmt == "Q4_1":
        quants, m = b[..., 4:], b[..., 2:4].copy()
    else:  # Q4_0: d * (q - 8) = d * q + m with m = -8d, exact in fp16 (a power-of-two multiple of a half)
        quants = b[..., 2:]
        m = (-8 * b[..., 0:2].copy().view(np.float16).astype(np.float32)).astype(np.float16)
        if not np.isfinite(m).all():
            raise ValueError("a Q4_0 scale too large to carry as Q4_1 (|8d| > 65504)")
        m = m.view(np.uint8)
    body = np.concatenate([d.view(np.uint8), quants], axis=-1).reshape(n, -1)
    return torch.from_numpy(np.concatenate([body, m.reshape(n, -1)], axis=-1).copy())


def dequantize_blocks(weight: torch.Tensor, in_features: int) -> torch.Tensor:
    """(N, bytes) uint8 blocks in the kernels' layout -> (N, in_features) float32: the values ggml's dequantization
    gives for the file's blocks."""
    fmt, n, nb = kernel_format(weight, in_features), weight.shape[0], in_features // 32
    if fmt == "Q8":
        b = weight.reshape(n, nb, 36)
        return (b[..., :4].contiguous().view(torch.float32) * b[..., 4:].contiguous().view(torch.int8).float()
                ).reshape(n, in_features)
    b = weight[:, :nb * 20].reshape(n, nb, 20)
    d = b[..., :4].contiguous().view(torch.float32)  # (n, nb, 1)
    m = weight[:, nb * 20:].contiguous().view(torch.float16).float()[..., None]  # (n, nb, 1)
    nibbles = b[..., 4:]
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).float()  # byte j: element j (low), j + 16 (high)
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
                  if t.tensor_type.name in FILE_BLOCK_BYTES}


def _blocks_weight(parts: list[tuple[str, np.ndarray]]) -> torch.Tensor | None:
    """One uint8 weight (kernel layout) from row-concatenated parts, or None when they are not all one format."""
    if not parts or any(p is None for p in parts) or len({fmt for fmt, _ in parts}) != 1:
        return None
    return pack_blocks(parts[0][0], np.concatenate([rows for _, rows in parts]))


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
        fmt = parts[0][0]
        kernel_format(w, linear.in_features)  # the shapes agree
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
