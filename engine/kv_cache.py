"""A preallocated key/value cache written at explicit slots (gpt-fast style: rejected slots cost nothing,
they are simply overwritten by the next step)."""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values `[layers, kv_heads, max_len, head_dim]`; the caller decides which slots are live."""

    def __init__(self, num_layers: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_layers, kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def write(self, layer: int, kv_slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """kv_slots: [n] long; keys, values: [kv_heads, n, head_dim]."""
        self.keys[layer].index_copy_(1, kv_slots, keys)
        self.values[layer].index_copy_(1, kv_slots, values)

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` slots of one layer: two [kv_heads, length, head_dim] views."""
        return self.keys[layer, :, :length], self.values[layer, :, :length]

    def keep(self, src_slots: torch.Tensor, dst_start: int) -> None:
        """Move the entries at `src_slots` ([a] long, increasing) to slots [dst_start, dst_start + a).

        Used after verification to compact the cache onto the accepted path; slots past the new end are
        left stale and will be overwritten.
        """
        count = src_slots.shape[0]
        if count == 0:
            return
        # advanced indexing gathers a copy first, so overlapping source and destination are safe
        self.keys[:, :, dst_start:dst_start + count] = self.keys[:, :, src_slots]
        self.values[:, :, dst_start:dst_start + count] = self.values[:, :, src_slots]

    def reset(self) -> None:
        """Nothing to clear: slots are only read up to the caller's committed length."""
