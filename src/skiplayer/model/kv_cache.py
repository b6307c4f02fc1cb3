"""Preallocated per-layer KV cache with per-layer lengths and O(1) rollback."""
from __future__ import annotations

import torch


class KVCache:
    """Keys/values for every layer in one preallocated buffer.

    Layers may hold different lengths: drafting fills only the shallow layers. Rolling back is setting a length;
    stale entries past it are simply overwritten later.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (n_layers, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * n_layers
        self.max_len = max_len

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (n_kv_heads, T, head_dim) at positions [start, start+T); return the layer's keys/values up to
        start+T. Writing may only extend or overwrite: no gap is allowed below `start`."""
        end = self.claim(layer, start, k.shape[1])
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def claim(self, layer: int, start: int, n: int) -> int:
        """Check and record a write of n positions at `start` in `layer` (the caller fills self.k/self.v[layer]
        itself, as the native attention op does); return the layer's new length start+n."""
        end = start + n
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: need {end} positions, have {self.max_len}")
        assert start <= self.lengths[layer], f"gap in layer {layer}: length {self.lengths[layer]}, write at {start}"
        self.lengths[layer] = end
        return end

    def rollback(self, length: int) -> None:
        """Forget every position >= length in every layer (O(layers), no copies)."""
        self.lengths = [min(n, length) for n in self.lengths]

    def keep(self, start: int, slots: list[int]) -> None:
        """Keep the entries at `slots` (ascending, the first == start) as positions start, start+1, ... in every
        layer and forget the rest: a token tree's accepted path (O(accepted) copies; none for a chain prefix)."""
        if slots != list(range(start, start + len(slots))):
            index = torch.tensor(slots, device=self.k.device)
            self.k[:, :, start:start + len(slots)] = self.k[:, :, index]
            self.v[:, :, start:start + len(slots)] = self.v[:, :, index]
        self.rollback(start + len(slots))

    def reset(self) -> None:
        self.lengths = [0] * len(self.lengths)
