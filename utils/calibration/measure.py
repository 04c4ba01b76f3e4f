"""Timing each dtype/kernel candidate of a target and its draft for the row counts the trees use."""
from __future__ import annotations

import time

import torch

from engine.drafters import append_tokens
from engine.linear_paths import GGUF_PATHS, LINEAR_PATHS, KernelPlan, path_available
from engine.tree_mask import ancestor_mask_from_parents, tree_attention_mask
from utils.gguf_weights import gguf_path_unavailable

CALIBRATION_ROWS = (1, 2, 4, 8, 16, 32)  # tokens per forward: the autoregressive step up to large trees
CALIBRATION_DTYPES = (torch.float32, torch.bfloat16)
PREFIX = 128  # cached tokens before the timed forwards (the default prompt length)
REPEATS = 3


def candidates(device: str, target: str | None) -> list[KernelPlan]:
    """Every dtype/kernel path this machine can run on `device` for `target` ("gguf" and "q8" need a GGUF
    target and the compiled kernel)."""
    gguf = gguf_path_unavailable(target) is None
    return [KernelPlan(dtype, path) for dtype in CALIBRATION_DTYPES for path in LINEAR_PATHS
            if path_available(path, dtype, device) and (path not in GGUF_PATHS or gguf)]


def chain_inputs(rows: int, prefix: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions [n], kv_slots [n], attn_mask [n, prefix + n]) of n chained tree nodes after `prefix` cached
    tokens (a chain has the most positions; the cost of a forward does not depend on the tree's shape)."""
    ids = torch.arange(rows)
    mask = tree_attention_mask(ancestor_mask_from_parents(ids - 1), ids, prefix)
    return (prefix + ids).to(device), (prefix + ids).to(device), mask.to(device)


def time_rows(model, device: str, rows: tuple[int, ...] = CALIBRATION_ROWS, repeats: int = REPEATS,
              prefix: int = PREFIX) -> list[float]:
    """ms of one forward over n new tokens after `prefix` cached ones, for each n in `rows`: the fastest of
    `repeats` runs after one warm-up (the fastest, since on a shared machine other work only adds time),
    rows interleaved so a busy spell spreads over all of them."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.target_vocab_size
    append_tokens(model, torch.randint(0, vocab, (prefix,), generator=generator).to(device), 0, last_logits=False,
                  prev_features=model.placeholder_features(prefix))
    calls = []
    for n in rows:
        tokens = torch.randint(0, vocab, (n,), generator=generator).to(device)
        positions, slots, mask = chain_inputs(n, prefix, device)
        features = model.placeholder_features(n)
        calls.append(lambda t=tokens, p=positions, s=slots, m=mask, f=features:
                     model.forward(t, p, s, m, prev_features=f))
    best = [float("inf")] * len(rows)
    for round_index in range(repeats + 1):
        for index, call in enumerate(calls):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if round_index:  # round 0 is the warm-up
                best[index] = min(best[index], 1000.0 * (time.perf_counter() - start))
    return best


def measure_pair(target: str | None, draft: str | None, device: str, plans: list[KernelPlan],
                 progress=None) -> tuple[dict[str, list[float]], dict[str, list[float]] | None]:
    """(target ms per row count, draft ms per row count), each keyed by plan label; the draft's is None
    when `draft` is None. Loads the pair once per plan, both models in that plan."""
    from utils.experiment import load_pair

    target_ms, draft_ms = {}, ({} if draft is not None else None)
    max_len = PREFIX + max(CALIBRATION_ROWS)
    for plan in plans:
        pair = load_pair(target, draft, draft is not None, plan.dtype, device, max_len, plans=(plan, plan))
        target_ms[plan.label] = time_rows(pair.target, device)
        if draft_ms is not None:
            draft_ms[plan.label] = time_rows(pair.draft, device)
        if progress is not None:
            progress(plan)
    return target_ms, draft_ms
