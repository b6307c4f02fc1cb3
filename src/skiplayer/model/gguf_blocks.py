"""GGUF weights as the file stores them: Q4_0 / Q4_1 / Q5_0 / Q8_0 / Q4_K / Q6_K blocks, multiplied by the native
kernels without expanding them (kernels/qblocks.h), instead of the float copy `load.py` converts the file to.

A block-quantized Linear keeps a uint8 weight (N, K / 32 * bytes per block): the file's blocks, re-laid out per row
for the kernels (pack_blocks; qblocks.h says why), told apart by their bytes per block (22: Q4_1 and Q4_0, the latter
as m = -8d; 36: Q8_0, and Q5_0 as Q8_0 blocks of q - 16, exact; 24: Q4_K, each 32-weight sub-block with its own
fp32 d = d * scale and m = -dmin * min, exact, rows layout only; 40: Q6_K, each 32 weights with the fp32 d * scale
of its two 16-weight sub-blocks and the quants - 32 as int8, exact, rows layout only). The kernels compute with
exactly the fp32 values ggml's own dequantization gives (d * q + m), so the weights are the file's, bit for bit; the
float16 path rounds them to 11 significant bits on top. Matrices in other formats (F16/F32 and the other K-quants)
keep their float copy.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from skiplayer.model.llama import Linear, Transformer

FILE_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q8_0": 34}  # per block of 32 weights, in the file
SUPER_BLOCK_BYTES = {"Q4_K": 144, "Q6_K": 210}  # per super-block of 256 weights
# the layout each takes
KERNEL_FAMILY = {"Q4_0": "Q4", "Q4_1": "Q4", "Q5_0": "Q8", "Q8_0": "Q8", "Q4_K": "Q4K", "Q6_K": "Q6K"}
ROWS_ONLY = {"Q4K", "Q6K"}  # fp32 scales: no tiles layout
# In the kernels' layouts (kernels/qblocks.h): per row for the AVX2 / AVX-512 kernels, per 16 rows for the tiles (AMX or VNNI).
KERNEL_BLOCK_BYTES = {"Q4": 22, "Q8": 36, "Q4K": 24, "Q6K": 40, "Q4 tiles": 20, "Q8 tiles": 34}


def kernel_format(weight: torch.Tensor, in_features: int) -> str:
    """'Q4', 'Q8', 'Q4K', 'Q4 tiles' or 'Q8 tiles': the kernel layout of a uint8 block weight (N, bytes)."""
    for name, size in KERNEL_BLOCK_BYTES.items():
        if in_features % 32 == 0 and weight.shape[-1] == in_features // 32 * size:
            return name
    raise ValueError(f"a uint8 weight of {weight.shape[-1]} bytes per row holds no packed GGUF blocks of "
                     f"{in_features} columns")


def tiles_available(family: str = "Q4") -> bool:
    """Whether the native kernels run products of `family` blocks ('Q4' or 'Q8', KERNEL_FAMILY) in the tiles layout
    here: on AMX tiles (kernels/amx.cpp) or with AVX-512 VNNI (kernels/avx512_vnni.cpp), and on AVX2 alone for Q4
    blocks with int8 activations (q4_tiles_avx2_int8 in kernels/avx2.cpp: set_gguf_activations before packing);
    SKIPLAYER_GGUF_TILES=0 keeps the rows layout for comparisons."""
    if os.environ.get("SKIPLAYER_GGUF_TILES", "1") == "0":
        return False
    try:
        isa = torch.ops.skiplayer.kernel_isa("")
        return isa in ("amx", "vnni") or (isa == "avx2" and family == "Q4"
                                          and torch.ops.skiplayer.activation_int8_parts(0) == 1)
    except (AttributeError, RuntimeError):
        return False


GGUF_ACTIVATIONS = ("auto", "int8", "int8x2")


def set_gguf_activations(choice: str = "auto") -> str:
    """How the block kernels take x (process-wide, like kernel_isa): "int8x2" splits each block of 32 values in two
    int8 parts on the tiles kernels (relative error ~2^-16 of the block's largest |x|; AMX and VNNI agree bit for
    bit), "int8" keeps one (llama.cpp's 8-bit activations, ~2^-8: half the integer products on the VNNI kernel, and
    integer dot products instead of fp32 FMAs on the AVX2 kernel). "auto": int8 where the products run on VNNI or
    AVX2 alone (bound by their dot products), int8x2 on AMX tiles. Returns the choice made. The AVX-512 rows kernel,
    and the AVX2 one under int8x2, take x in fp32."""
    if choice not in GGUF_ACTIVATIONS:
        raise ValueError(f"unknown GGUF activations '{choice}': use one of {', '.join(GGUF_ACTIVATIONS)}")
    if choice == "auto":
        choice = "int8" if torch.ops.skiplayer.kernel_isa("") in ("vnni", "avx2") else "int8x2"
    torch.ops.skiplayer.activation_int8_parts(1 if choice == "int8" else 2)
    return choice


def _q4k_parts(rows: np.ndarray):
    """Q4_K rows as 32-weight blocks: (d (n, nb) fp32, m (n, nb) fp32, q (n, nb, 32) uint8), w = d * q + m exactly as
    ggml dequantizes (d = d_super * scale, m = -(dmin * min), both exact in fp32)."""
    n = rows.shape[0]
    b = np.ascontiguousarray(rows).reshape(n, -1, SUPER_BLOCK_BYTES["Q4_K"])
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)  # (n, ns, 1)
    dmin = b[..., 2:4].copy().view(np.float16).astype(np.float32)
    sc, qs = b[..., 4:16].astype(np.uint8), b[..., 16:]
    # the 6-bit scales and mins of the 8 sub-blocks (ggml's get_scale_min_k4)
    scale = np.concatenate([sc[..., 0:4] & 63, (sc[..., 8:12] & 15) | ((sc[..., 0:4] >> 6) << 4)], axis=-1)
    mins = np.concatenate([sc[..., 4:8] & 63, (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)], axis=-1)
    # 4 chunks of 32 bytes: low nibbles are sub-block 2c, high nibbles sub-block 2c + 1
    chunks = qs.reshape(n, -1, 4, 32)
    q = np.stack([chunks & 15, chunks >> 4], axis=3).reshape(n, -1, 32)  # (n, ns * 8, 32)
    d_sub = (d * scale.astype(np.float32)).reshape(n, -1)
    m_sub = -(dmin * mins.astype(np.float32)).reshape(n, -1)
    return d_sub, m_sub, q


def _q6k_rows(rows: np.ndarray) -> torch.Tensor:
    """Q6_K rows -> the rows layout: per 32 weights [fp32 d0][fp32 d1][32 int8], w = d0 * q (elements 0..15) and
    d1 * q (16..31), with d0, d1 = d * scale of the two 16-weight sub-blocks (exact in fp32) and q = the 6-bit quant
    - 32, as ggml dequantizes (d * scale * q, whose product needs at most 23 significant bits: exact)."""
    n = rows.shape[0]
    b = np.ascontiguousarray(rows).reshape(n, -1, SUPER_BLOCK_BYTES["Q6_K"])
    ql, qh = b[..., :128], b[..., 128:192]
    scale = b[..., 192:208].copy().view(np.int8).astype(np.float32)  # (n, ns, 16)
    d = b[..., 208:210].copy().view(np.float16).astype(np.float32)    # (n, ns, 1)
    q = np.empty((n, b.shape[1], 256), np.uint8)
    for half in range(2):  # each 128 weights: 64 bytes of low nibbles and 32 of high bit pairs (ggml's layout)
        lo, hi, o = ql[..., 64 * half:64 * half + 64], qh[..., 32 * half:32 * half + 32], 128 * half
        q[..., o:o + 32] = (lo[..., :32] & 15) | ((hi & 3) << 4)
        q[..., o + 32:o + 64] = (lo[..., 32:] & 15) | (((hi >> 2) & 3) << 4)
        q[..., o + 64:o + 96] = (lo[..., :32] >> 4) | (((hi >> 4) & 3) << 4)
        q[..., o + 96:o + 128] = (lo[..., 32:] >> 4) | (((hi >> 6) & 3) << 4)
    q = (q.astype(np.int16) - 32).astype(np.int8).reshape(n, -1, 32)     # (n, nb, 32)
    ds = (d * scale).reshape(n, -1, 2).view(np.uint8)                     # (n, nb, 8): d0, d1 of each block
    return torch.from_numpy(np.concatenate([ds, q.view(np.uint8)], axis=-1).reshape(n, -1).copy())


def _file_parts(fmt: str, rows: np.ndarray):
    """(d (n, nb) fp16 (fp32 for Q4_K), m (n, nb) fp16 / fp32 or None, q (n, nb, 32) uint8 / int8) of a file's
    rows."""
    if fmt == "Q4_K":
        return _q4k_parts(rows)
    n = rows.shape[0]
    b = np.ascontiguousarray(rows).reshape(n, -1, FILE_BLOCK_BYTES[fmt])
    d = b[..., 0:2].copy().view(np.float16)[..., 0]
    if fmt == "Q8_0":
        return d, None, b[..., 2:].copy().view(np.int8)
    if fmt == "Q5_0":  # d * (q - 16), q = 4 low bits from qs (element j: byte j low, j + 16 high) + 1 bit from qh
        qh = b[..., 2:6].copy().view(np.uint32)  # (n, nb, 1): bit j is element j's fifth bit
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # (n, nb, 32)
        qs = b[..., 6:]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1) | (high << 4)
        return d, None, (q.astype(np.int16) - 16).astype(np.int8)
    nibbles = b[..., 4:] if fmt == "Q4_1" else b[..., 2:]
    q = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1)  # byte j: element j (low), j + 16 (high)
    if fmt == "Q4_1":
        m = b[..., 2:4].copy().view(np.float16)[..., 0]
    else:  # Q4_0: d * (q - 8) = d * q + m with m = -8d, exact in fp16 (a power-of-two multiple of a half)
        m = (-8 * d.astype(np.float32)).astype(np.float16)
        if not np.isfinite(m).all():
            raise ValueError("a Q4_0 scale too large to carry as Q4_1 (|8d| > 65504)")
    return d, m, q


def pack_blocks(fmt: str, rows: np.ndarray, tiles: bool = False) -> torch.Tensor:
    """A file's (N, blocks * file bytes) uint8 rows of format `fmt` -> a kernels' layout (kernels/qblocks.h): the
    rows layout, or with `tiles` (N % 16 == 0; tiles_available says where the kernels run it) the tiles layout. Same
    shape (N, nb * bytes per block)."""
    if tiles and KERNEL_FAMILY[fmt] in ROWS_ONLY:
        raise ValueError(f"{fmt} blocks have fp32 scales: the rows layout only")
    if fmt == "Q6_K":
        return _q6k_rows(rows)
    return _pack_parts(*_file_parts(fmt, rows), tiles=tiles)


def _pack_parts(d: np.ndarray, m: np.ndarray | None, q: np.ndarray, tiles: bool) -> torch.Tensor:
    """Blocks given as (d (n, nb), m (n, nb) or None, q (n, nb, 32)) -> a kernels' layout (pack_blocks)."""
    n, nb = d.shape
    if tiles:
        if n % 16:
            raise ValueError(f"the tiles layout needs a multiple of 16 rows, got {n}")
        g = n // 16
        # B[k / 4][4 n + k % 4] per group and block: (g, 16 rows, nb, 8, 4) -> (g, nb, 8, 16, 4)
        bq = q.reshape(g, 16, nb, 8, 4).transpose(0, 2, 3, 1, 4).reshape(g, nb, 8, 64)
        d16 = d.reshape(g, 16, nb).transpose(0, 2, 1).copy().view(np.uint8)  # (g, nb, 32)
        if m is None:
            body = np.concatenate([d16, bq.view(np.uint8).reshape(g, nb, 512)], axis=-1)
        else:
            m16 = m.reshape(g, 16, nb).transpose(0, 2, 1).copy().view(np.uint8)
            pairs = bq.reshape(g, nb, 4, 2, 64)
            nibbles = (pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4)).reshape(g, nb, 256)
            body = np.concatenate([d16, m16, nibbles], axis=-1)
        return torch.from_numpy(np.ascontiguousarray(body).reshape(n, -1))
    d32 = d.astype(np.float32)[..., None].view(np.uint8)  # (n, nb, 4): exact
    if m is None:
        return torch.from_numpy(np.concatenate([d32, q.view(np.uint8)], axis=-1).reshape(n, -1).copy())
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    body = np.concatenate([d32, nibbles], axis=-1).reshape(n, -1)
    return torch.from_numpy(np.concatenate([body, m.view(np.uint8).reshape(n, -1)], axis=-1).copy())


def _tiles_parts(weight: torch.Tensor, in_features: int):
    """(d (n, nb) fp16, m (n, nb) fp16 or None, q (n, nb, 32) int8 / uint8) of a block weight in the tiles layout:
    the inverse of _pack_parts' tiles order, as _file_parts gives them for a file's rows."""
    fmt, n, nb = kernel_format(weight, in_features), weight.shape[0], in_features // 32
    g = n // 16
    b = weight.numpy().reshape(g, nb, KERNEL_BLOCK_BYTES[fmt] * 16)

    def per_row(a: np.ndarray) -> np.ndarray:  # (g, nb, 16 rows) fp16 -> (n, nb)
        return a.view(np.float16).transpose(0, 2, 1).reshape(n, nb)
    d = per_row(b[..., :32].copy())
    if fmt == "Q8 tiles":
        m, bq = None, b[..., 32:].view(np.int8).reshape(g, nb, 8, 64)
    else:
        m = per_row(b[..., 32:64].copy())
        nibbles = b[..., 64:].reshape(g, nb, 4, 1, 64)
        bq = np.concatenate([nibbles & 15, nibbles >> 4], axis=3).reshape(g, nb, 8, 64)
    q = bq.reshape(g, nb, 8, 16, 4).transpose(0, 3, 1, 2, 4).reshape(n, nb, 32)
    return d, m, q


def dequantize_blocks(weight: torch.Tensor, in_features: int) -> torch.Tensor:
    """(N, bytes) uint8 blocks in a kernels' layout -> (N, in_features) float32: the values ggml's dequantization
    gives for the file's blocks."""
    fmt, n, nb = kernel_format(weight, in_features), weight.shape[0], in_features // 32
    if fmt.endswith("tiles"):
        d, m, q = (None if a is None else torch.from_numpy(a).float() for a in _tiles_parts(weight, in_features))
        w = q * d[..., None] + (0.0 if m is None else m[..., None])
        return w.reshape(n, in_features)
    if fmt == "Q8":
        b = weight.reshape(n, nb, 36)
        return (b[..., :4].contiguous().view(torch.float32) * b[..., 4:].contiguous().view(torch.int8).float()
                ).reshape(n, in_features)
    if fmt == "Q6K":
        b = weight.reshape(n, nb, 40)
        d = b[..., :8].contiguous().view(torch.float32).repeat_interleave(16, dim=-1)  # (n, nb, 32)
        return (d * b[..., 8:].contiguous().view(torch.int8).float()).reshape(n, in_features)
    b = weight[:, :nb * 20].reshape(n, nb, 20)
    d = b[..., :4].contiguous().view(torch.float32)  # (n, nb, 1)
    m = weight[:, nb * 20:].contiguous().view(torch.float32 if fmt == "Q4K" else torch.float16).float()[..., None]
    nibbles = b[..., 4:]
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).float()  # byte j: element j (low), j + 16 (high)
    return torch.addcmul(m, q, d).reshape(n, in_features)  # d * q is exact: one rounding, as in ggml


def block_rows(weight: torch.Tensor, in_features: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a block weight in a kernels' layout, as a block weight (a draft's reduced vocabulary read from
    the model's quantized head: a quarter of the bytes of float16 rows). The tiles layout is kept where the rows
    fill whole groups of 16, else the rows layout; the weights are the same bit for bit."""
    if not kernel_format(weight, in_features).endswith("tiles"):
        return weight[ids].contiguous()  # the rows layouts are per row
    d, m, q = _tiles_parts(weight, in_features)
    rows = ids.numpy()
    return _pack_parts(d[rows], None if m is None else m[rows], q[rows], tiles=len(rows) % 16 == 0)


def _unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo the row order llama.cpp's converter gives q/k projections (rotary halves interleaved per head)."""
    n = rows.shape[0]
    perm = np.arange(n).reshape(heads, 2, n // heads // 2).swapaxes(1, 2).reshape(-1)
    return rows[np.argsort(perm)]


def read_blocks(path: str | Path) -> tuple[str, dict[str, tuple[str, np.ndarray]]]:
    """The file's architecture, and name -> (format, (rows, bytes) uint8) for every tensor in a format the kernels
    take (KERNEL_FAMILY)."""
    from gguf import GGUFReader
    reader = GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else ""
    return arch, {t.name: (t.tensor_type.name, np.asarray(t.data)) for t in reader.tensors
                  if t.tensor_type.name in KERNEL_FAMILY}


def _blocks_weight(parts: list[tuple[str, np.ndarray]]) -> torch.Tensor | None:
    """One uint8 weight (kernel layout) from row-concatenated parts, or None when they do not all take one layout
    (Q4 or Q8: KERNEL_FAMILY)."""
    if not parts or any(p is None for p in parts) or len({KERNEL_FAMILY[fmt] for fmt, _ in parts}) != 1:
        return None
    family = KERNEL_FAMILY[parts[0][0]]
    tiles = family not in ROWS_ONLY and tiles_available(family) and sum(r.shape[0] for _, r in parts) % 16 == 0
    if len({fmt for fmt, _ in parts}) == 1:
        return pack_blocks(parts[0][0], np.concatenate([r for _, r in parts]), tiles=tiles)
    # mixed Q5_0 / Q8_0 parts (a fused q/k/v): each part's rows packed alone, then joined
    if tiles and any(r.shape[0] % 16 for _, r in parts):
        tiles = False
    return torch.cat([pack_blocks(fmt, r, tiles=tiles) for fmt, r in parts])


def use_gguf_blocks(model: Transformer, path: str | Path) -> dict[str, int]:
    """Give `model` (built from the file's float conversion, not yet optimize_model'ed) the file's own blocks for
    every matrix stored as Q4_0 / Q4_1 / Q5_0 / Q8_0 / Q4_K / Q6_K; returns how many matrices took each format. The
    LM head becomes `model.lm_head` (the float table stays for the embedding lookup and head_rows)."""
    a = model.args
    arch, blocks = read_blocks(path)
    permuted = arch == "llama"  # llama.cpp's converter reorders q/k rows for Llama-architecture files only
    counts: dict[str, int] = {}

    def put(linear: Linear, parts) -> None:
        w = _blocks_weight(parts)
        if w is None:
            return
        fmt = "+".join(sorted({f for f, _ in parts}))
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
