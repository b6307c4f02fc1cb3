"""The pair-packed weight layout the native kernel streams (model/optimize.py, `small_linear(..., packed=True)`).

A (N, K) matrix keeps its shape, but each pair of rows is interleaved every 8 columns, [N/2][K/8][2][8] (an odd last
row stays as is), so the kernel's tile of two rows reads one sequential stream. Needs K % 8 == 0.
"""
from __future__ import annotations

import torch


def pack_pairs(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape[0] - weight.shape[0] % 2, weight.shape[1]
    body = weight[:n].reshape(n // 2, 2, k // 8, 8).transpose(1, 2).reshape(n, k)
    return torch.cat([body, weight[n:]]).contiguous()


def unpack_pairs(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape[0] - weight.shape[0] % 2, weight.shape[1]
    body = weight[:n].reshape(n // 2, k // 8, 2, 8).transpose(1, 2).reshape(n, k)
    return torch.cat([body, weight[n:]]).contiguous()


def packed_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a packed matrix, row-major (an embedding lookup, a row subset for a draft vocabulary)."""
    n, k = weight.shape[0] - weight.shape[0] % 2, weight.shape[1]
    paired = ids.clamp(max=n - 1)
    rows = weight[:n].view(n // 2, k // 8, 2, 8)[paired // 2, :, paired % 2, :].reshape(*ids.shape, k)
    if n < weight.shape[0]:  # the odd last row is stored as is
        rows = torch.where((ids == n)[..., None], weight[n], rows)
    return rows
