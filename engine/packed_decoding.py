"""Many independent sequences decoded through one model and one KV cache, continuously batched.

The cache is cut into equal *lanes*, one sequence each. Every forward carries one row per decoding sequence
plus the whole prompt of each sequence that has just taken a free lane; a row attends only to its own lane's
slots up to its position (a block-diagonal mask over the shared cache). A finished sequence frees its lane
for the next prompt in the same step, so the batch stays full to the end instead of draining row by row, and
no cache is ever copied or compacted.

Written for generating distillation data (utils/training/distill_data.py): on the suite's native CPU layers a
row's values never depend on the rows beside it (engine/native_layers.py), so a greedy sequence decoded here
gets the same tokens as decoding it alone. The top-k log-probabilities (at temperature 1) of every step are
kept, so logit distillation needs no second pass of the target.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.model import TreeModel


@dataclass
class Decoded:
    """What the model wrote after one prompt: tokens, the top-k (ids, log-probs) each was drawn from, and
    whether it ended on a stop token (False: cut at the token budget)."""

    tokens: list[int] = field(default_factory=list)
    topk_ids: list[np.ndarray] = field(default_factory=list)
    topk_logprobs: list[np.ndarray] = field(default_factory=list)
    finished: bool = False


def pick_next(logits: torch.Tensor, greedy: torch.Tensor, temps: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
    """Next token per row: `greedy` [r] where the row's temperature is 0, else a sample at that temperature.

    Sampling inverts the CDF with one uniform draw per row: torch.multinomial draws an exponential per
    vocabulary entry, which cost a quarter of each decoding step on CPU.
    """
    sampled_rows = temps > 0
    if not bool(sampled_rows.any()):
        return greedy
    probs = torch.softmax(logits[sampled_rows] / temps[sampled_rows, None], -1)
    cdf = probs.cumsum(-1)
    u = torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device) * cdf[:, -1:]
    out = greedy.clone()
    out[sampled_rows] = torch.searchsorted(cdf, u).squeeze(-1).clamp(max=logits.shape[-1] - 1)
    return out


def lane_mask(lane_starts: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
    """[n, width] bool: row i attends slots lane_starts[i] .. lane_starts[i] + positions[i] (its own lane, up to
    and including itself)."""
    slots = torch.arange(width, device=lane_starts.device)[None]
    start = lane_starts[:, None]
    return (slots >= start) & (slots <= start + positions[:, None])


def lanes_for(model: TreeModel, lane_len: int) -> int:
    """How many lanes of `lane_len` slots the model's cache holds."""
    return model.max_len // lane_len


@torch.inference_mode()
def decode_packed(model: TreeModel, prompts: list[list[int]], temps: list[float], max_new: int,
                  stop_ids: set[int], top_k: int, generator: torch.Generator, lanes: int | None = None,
                  max_prefill_rows: int = 1024, on_step=None) -> list[Decoded]:
    """Decode every prompt (target-vocabulary ids) for up to `max_new` tokens or until a stop id, row i at
    temperature temps[i] (0 = greedy), `lanes` sequences at a time (default: as many as the cache holds).

    A lane holds the longest prompt plus `max_new` slots. New prompts join only while this step's prompt rows
    stay within `max_prefill_rows` (a step never stalls on one huge prefill). `on_step(rows)`, when given, is
    called after each forward with the number of rows it ran (for progress bars)."""
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.device
    lane_len = max(len(p) for p in prompts) + max_new
    capacity = lanes_for(model, lane_len)
    lanes = min(capacity if lanes is None else lanes, capacity, len(prompts))
    if lanes < 1:
        raise ValueError(f"a lane needs {lane_len} cache slots but the model's cache has {model.max_len}")
    results = [Decoded() for _ in prompts]
    temp_of = torch.tensor(temps, dtype=torch.float32, device=device)
    pending = list(range(len(prompts)))[::-1]          # popped from the end: prompts start in order
    lane_seq = [-1] * lanes                             # sequence in each lane (-1: free)
    lane_len_now = [0] * lanes                          # tokens of the lane's sequence already in the cache
    lane_next = [0] * lanes                             # token to feed next (decoding lanes)
    while pending or any(s >= 0 for s in lane_seq):
        token_rows, position_rows, lane_rows, logits_at, owners = [], [], [], [], []
        for lane, seq in enumerate(lane_seq):           # one row per decoding sequence
            if seq >= 0:
                token_rows.append(lane_next[lane])
                position_rows.append(lane_len_now[lane])
                lane_rows.append(lane)
                logits_at.append(len(token_rows) - 1)
                owners.append(lane)
        prefill_rows = 0
        for lane in range(lanes):                       # whole prompts into free lanes
            if lane_seq[lane] >= 0 or not pending:
                continue
            prompt = prompts[pending[-1]]
            if prefill_rows and prefill_rows + len(prompt) > max_prefill_rows:
                break
            seq = pending.pop()
            lane_seq[lane], lane_len_now[lane] = seq, 0
            token_rows += prompt
            position_rows += range(len(prompt))
            lane_rows += [lane] * len(prompt)
            logits_at.append(len(token_rows) - 1)
            owners.append(lane)
            prefill_rows += len(prompt)
        tokens = torch.tensor(token_rows, dtype=torch.long, device=device)
        positions = torch.tensor(position_rows, dtype=torch.long, device=device)
        starts = torch.tensor(lane_rows, dtype=torch.long, device=device) * lane_len
        kv_slots = starts + positions
        width = int(kv_slots.max()) + 1
        logits = model.forward(tokens, positions, kv_slots, lane_mask(starts, positions, width),
                               logits_rows=torch.tensor(logits_at, dtype=torch.long, device=device))
        if on_step is not None:
            on_step(len(token_rows))
        for lane in lane_rows:
            lane_len_now[lane] += 1
        logprobs = torch.log_softmax(logits.float(), -1)
        top_lp, top_ids = logprobs.topk(top_k, -1)
        target_ids = model.to_target_ids(top_ids)
        seqs = torch.tensor([lane_seq[lane] for lane in owners], dtype=torch.long, device=device)
        chosen = model.to_target_ids(pick_next(logits.float(), top_ids[:, 0], temp_of[seqs], generator)).tolist()
        ids_np = target_ids.cpu().numpy().astype(np.int32)       # one copy per forward, not one per row
        logprobs_np = top_lp.cpu().numpy().astype(np.float16)
        for j, lane in enumerate(owners):
            out = results[lane_seq[lane]]
            token = chosen[j]
            out.tokens.append(token)
            out.topk_ids.append(ids_np[j])
            out.topk_logprobs.append(logprobs_np[j])
            if token in stop_ids or len(out.tokens) >= max_new:
                out.finished = token in stop_ids
                lane_seq[lane] = -1
            else:
                lane_next[lane] = token
    return results
