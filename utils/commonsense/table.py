"""Follower tables: for each token id, the K ids that most often follow it, as an int32 tensor [V, K] with -1
as padding (engine/commonsense.py uses them).

Two file formats:
- text (the original project's `sorted_followers_top12.txt`): line i holds the K follower ids of token i,
  separated by spaces, -1 as padding;
- tensor (`.pt`, loaded with `weights_only=True`): {"followers": int32 [V, K], "meta": {...}}, how it was
  built. Loads ~25x faster than the text (0.04 s vs 1.0 s for the original's 32,001-line table, 2-core CPU).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from utils.errors import UserError
from utils.models import DEFAULT_TARGET, REPO_ROOT, resolve_model_path

# the shipped table per embedded target (README: "Common-sense tokens" says how it was built)
DEFAULT_FOLLOWERS = {DEFAULT_TARGET: REPO_ROOT / "followers" / "smollm2-135m-top12.pt"}

TENSOR_SUFFIXES = (".pt", ".pth")


def count_followers(pairs: Iterable[tuple[np.ndarray, np.ndarray]], vocab_size: int, k: int) -> torch.Tensor:
    """The k most frequent followers of every token id, from (previous, next) id arrays of equal length.

    Ties are broken by the smaller id, so a table is a pure function of its counts. Returns [V, k] int32
    (-1 where a token has fewer than k distinct followers)."""
    if k < 1:
        raise UserError(f"--k must be >= 1, got {k}")
    firsts, seconds = [], []
    for prev, nxt in pairs:
        firsts.append(np.asarray(prev, dtype=np.int64))
        seconds.append(np.asarray(nxt, dtype=np.int64))
    prev = torch.from_numpy(np.concatenate(firsts)) if firsts else torch.zeros(0, dtype=torch.long)
    nxt = torch.from_numpy(np.concatenate(seconds)) if seconds else torch.zeros(0, dtype=torch.long)
    if prev.numel() and int(torch.maximum(prev.max(), nxt.max())) >= vocab_size:
        raise UserError(f"token id {int(torch.maximum(prev.max(), nxt.max()))} is outside the vocabulary "
                        f"({vocab_size} ids)")
    keys, counts = torch.unique(prev * vocab_size + nxt, return_counts=True)  # sorted by (prev, next)
    order = torch.argsort(-counts, stable=True)                # most frequent first, smaller id on ties
    order = order[torch.argsort(keys[order] // vocab_size, stable=True)]  # grouped by previous token
    keys = keys[order]
    owner, follower = keys // vocab_size, keys % vocab_size
    group_start = torch.searchsorted(owner, owner)             # index of each owner's first pair
    rank = torch.arange(owner.numel()) - group_start
    keep = rank < k
    table = torch.full((vocab_size, k), -1, dtype=torch.int32)
    table[owner[keep], rank[keep]] = follower[keep].to(torch.int32)
    return table


def target_vocab_size(target: str | None) -> int:
    """Rows of the target's logits (its config's vocab_size), read without loading the weights."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(resolve_model_path(target)).vocab_size)


def default_followers(target: str | None) -> str:
    """The shipped table for the embedded default target; any other target needs --followers."""
    path = DEFAULT_FOLLOWERS.get(DEFAULT_TARGET if target is None else target)
    if path is None or not path.is_file():
        raise UserError(f"no follower table is shipped for target {target}: build one (python -m utils.commonsense "
                        "build --target ... --distill) and pass --followers")
    return str(path)


def prompt_pairs(dataset: str, tokenizer, start: int, end: int | None) -> tuple[list, str]:
    """(previous, next) id pairs of every row of a --dataset, whole rows (chat rows through the template)."""
    from utils.data import load_prompts, load_texts

    stop = end if end is not None else start + len(load_texts(dataset, start, None))
    whole = 1 << 30  # keep every token of a row
    rows = [np.asarray(p.ids) for p in load_prompts(dataset, tokenizer, start, stop, whole)]
    return [(row[:-1], row[1:]) for row in rows], f"--dataset {dataset} rows [{start}, {stop})"


def save_text(table: torch.Tensor, path: str | Path) -> None:
    """The original's text format: one line per token id, K ids, -1 padding."""
    np.savetxt(path, table.numpy(), fmt="%d", delimiter=" ")


def save_tensor(table: torch.Tensor, path: str | Path, meta: dict) -> None:
    torch.save({"followers": table.to(torch.int32).contiguous(), "meta": meta}, path)


def _read_text(path: Path) -> torch.Tensor:
    lines = path.read_text().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    widths = {len(line.split()) for line in lines}
    if len(widths) != 1 or 0 in widths:
        raise UserError(f"follower table {path} is malformed: every line must hold the same number (>= 1) of ids")
    try:
        values = np.array(" ".join(lines).split(), dtype=np.int64)
    except ValueError as exc:
        raise UserError(f"follower table {path} is malformed: {exc}") from exc
    return torch.from_numpy(values.reshape(len(lines), widths.pop()))


def _read_tensor(path: Path) -> tuple[torch.Tensor, dict]:
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises several types for a file that is not a checkpoint
        raise UserError(f"follower table {path} cannot be read: {str(exc).splitlines()[0]}") from exc
    table = data.get("followers") if isinstance(data, dict) else None
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.dtype.is_floating_point:
        raise UserError(f"follower table {path} is malformed: expected {{'followers': int tensor [V, K]}}")
    return table.long(), dict(data.get("meta", {}))


def load_followers(path: str | Path, vocab_size: int) -> tuple[torch.Tensor, dict]:
    """A follower table for a target with `vocab_size` ids, from either format, as (int32 [V, K], meta).

    The table must have one row per token id (or one more: the original's Llama-2 table has 32,001 rows for
    32,000 ids; the extra row is dropped) and only ids below `vocab_size`: a table made for another
    tokenizer is refused, never silently used."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"follower table {path} does not exist (build one: python -m utils.commonsense build)")
    table, meta = _read_tensor(path) if path.suffix in TENSOR_SUFFIXES else (_read_text(path), {})
    rows = table.shape[0]
    if rows not in (vocab_size, vocab_size + 1):
        raise UserError(f"follower table {path} has {rows} rows but the target's vocabulary has {vocab_size} ids: "
                        "it was made for another tokenizer")
    table = table[:vocab_size]
    if int(table.min()) < -1 or int(table.max()) >= vocab_size:
        raise UserError(f"follower table {path} holds ids outside [-1, {vocab_size}): it was made for another "
                        "tokenizer or is malformed")
    return table.to(torch.int32), meta
