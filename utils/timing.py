"""Timing forwards the way the decoder runs them: random tree inputs after a cached prefix, one-call closures
for a target forward and a draft growth step, and interleaved timing rounds. Shared by `growmap_tool latency`
(the hardware profile of the tree search) and `utils.bench.floor` (step times against the weight-read floor)."""
from __future__ import annotations

import torch

from utils.report import wall_clock

DRAFT_TOPK = 8  # children picked per expanded node in a timed draft step (a top-k over the draft's logits)


def tree_inputs(size: int, prefix: int, vocab: int, shape: str, generator: torch.Generator,
                device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token_ids [n], positions [n], kv_slots [n], attn_mask [n, prefix + n]) of a tree of n nodes placed
    after `prefix` cached tokens, as the decoder feeds it. shape "random": node i's parent is uniform in
    0..i-1 (a random recursive tree); "chain": node i's parent is i - 1."""
    from engine.tree_mask import ancestor_mask_from_parents, tree_attention_mask

    ids = torch.arange(size)
    if shape == "chain":
        parents = ids - 1
    else:
        parents = (torch.rand(size, generator=generator) * ids).long()  # [n], node 0 gets 0: fixed below
        parents[0] = -1
    ancestors = ancestor_mask_from_parents(parents)                    # [n, n] bool
    depth = ancestors.sum(dim=-1) - 1                                  # [n]
    tokens = torch.randint(0, vocab, (size,), generator=generator)
    mask = tree_attention_mask(ancestors, ids, prefix)                 # [n, prefix + n]
    return tokens.to(device), (prefix + depth).to(device), (prefix + ids).to(device), mask.to(device)


def _timed_ms(call, device: str) -> float:
    """Wall time of call() in ms, synchronising CUDA before and after."""
    with wall_clock(device) as elapsed:
        call()
    return elapsed[0] * 1000.0


def time_round_robin(calls: dict[str, object], repeats: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Every call `warmup` times untimed, then `repeats` timed rounds, each round running every call once
    (interleaved, so a slow spell on a shared machine spreads over all sizes instead of hitting one)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    timings: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            timings[key].append(_timed_ms(call, device))
    return timings


def target_call(model, inputs):
    """One target forward over tree_inputs' (tokens, positions, slots, mask), as a function of no arguments."""
    tokens, positions, slots, mask = inputs
    return lambda: model.forward(tokens, positions, slots, mask)


def draft_call(model, inputs):
    """One draft growth step: the forward over the frontier and the top-k children of each node."""
    tokens, positions, slots, mask = inputs
    k = min(DRAFT_TOPK, model.vocab_size)
    features = model.placeholder_features(tokens.shape[0])
    return lambda: model.to_target_ids(model.forward(tokens, positions, slots, mask, prev_features=features)
                                       .topk(k, dim=-1).indices)
