"""The decoder stack of a model on the "gguf" linear path as one native call per layer.

With its weights in GGUF blocks, the embedded target's one-token forward on 2 CPU cores spent about half its
time outside the matrix products: some 25 small torch operations per layer (two RMSNorms, RoPE, the cache write,
the attention, SiLU, residual adds), each a few microseconds of dispatch for a few hundred numbers. A layer
step (engine/llama_layer.c, compiled and bound by utils/native_kernels.py) does a whole Llama decoder layer in
one call instead, on the same GGUF blocks and the same KV cache tensor.

What it guarantees: every row's values are computed from that row and the keys it attends alone, in an order
fixed by the row (the block kernel's products, an attention that visits only the masked-in keys in slot
order), so a tree node verified among others gets the very bits the one-token step gives the same token:
speculative greedy output equals the same path's autoregressive output. Against the torch glue it replaces it
agrees to float32 rounding (its own exp, its own summation orders), like any kernel path.

Everything here is plain torch; the step itself is handed in.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from engine.kv_cache import KVCache

# (layer index, hidden [n, d] float32 updated in place, cos [n, hd], sin [n, hd], kv_slots [n] long,
#  attention mask [n, S] bool contiguous, the model's cache) -> None
LayerStep = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, KVCache], None]


def native_stack(step: LayerStep, num_layers: int, embedded: torch.Tensor, rotary: nn.Module,
                 positions: torch.Tensor, kv_slots: torch.Tensor, attn_mask: torch.Tensor, cache: KVCache,
                 keep: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`decoder_stack`'s result through `step`: embedded [n, d] float32 -> (the last layer's output [n, d],
    before the final norm; the states after the layers in `keep`, 0 = the input, [n, d] each, `keep`'s order)."""
    hidden = embedded.contiguous().clone()
    cos, sin = rotary(hidden[None], positions[None])
    cos, sin = cos[0].float().contiguous(), sin[0].float().contiguous()
    mask, slots = attn_mask.contiguous(), kv_slots.to(torch.long).contiguous()
    states = {0: hidden.clone()} if 0 in keep else {}
    for index in range(num_layers):
        step(index, hidden, cos, sin, slots, mask, cache)
        if index + 1 in keep:
            states[index + 1] = hidden.clone()
    return hidden, [states[i] for i in keep]
