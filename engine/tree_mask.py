"""Tree attention masks, built with tensor ops on the caller's device (no Python loop per node)."""
from __future__ import annotations

import torch


def ancestor_mask_from_parents(parents: torch.Tensor) -> torch.Tensor:
    """[n, n] bool, True where column j is row i or an ancestor of i; parents [n] long, -1 for the root.

    Pointer doubling: log2(depth) rounds of tensor ops, no Python loop per node.
    """
    n = parents.shape[0]
    ids = torch.arange(n, device=parents.device)
    jump = torch.where(parents < 0, ids, parents)  # the root points at itself
    mask = torch.zeros(n, n, dtype=torch.bool, device=parents.device)
    mask[ids, ids] = True
    mask[ids, jump] = True
    # after round r, mask holds every ancestor within 2^(r+1) steps and jump is the 2^(r+1)-th ancestor
    steps = 1
    while steps < n:
        mask = mask | mask[jump]
        jump = jump[jump]
        steps *= 2
    return mask


def tree_attention_mask(ancestors: torch.Tensor, rows: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Boolean attention mask [len(rows), prefix_len + n] for feeding tree nodes `rows`.

    ancestors: [n, n] bool ancestor-or-self matrix of the tree; rows: [r] long node indices.
    Node slots follow the prefix: node i sits in slot prefix_len + i. Each row sees the whole committed
    prefix, its ancestors and itself.
    """
    r = rows.shape[0]
    prefix = torch.ones(r, prefix_len, dtype=torch.bool, device=ancestors.device)
    return torch.cat([prefix, ancestors[rows]], dim=1)


def causal_mask(chunk_len: int, prefix_len: int, device: torch.device | str) -> torch.Tensor:
    """Boolean mask [chunk_len, prefix_len + chunk_len] for appending a chunk of tokens after a prefix."""
    tri = torch.ones(chunk_len, chunk_len, dtype=torch.bool, device=device).tril()
    prefix = torch.ones(chunk_len, prefix_len, dtype=torch.bool, device=device)
    return torch.cat([prefix, tri], dim=1)
