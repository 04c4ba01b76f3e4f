"""Measuring Sequoia's positional acceptance vector from next-token distributions.

Sequoia (Chen et al., arXiv 2402.12374, section 3.1) models a tree step with a vector p: p[k] is the
probability that, at a node, the k-th drafted child is the one the verifier accepts. It is measured by
walking along the target's own continuation of real prompts; at each position the draft proposes W
children of the current context (its top-W at temperature 0, W draws without replacement from its
temperature/top-p distribution otherwise) and the verification rule is applied against the target's
distribution at that position:

  * T = 0: child k is accepted iff it equals the target's argmax (at most one child can);
  * T > 0: Sequoia's / SpecInfer's rule (arXiv 2305.09781), as `engine.verifiers.verify_specinfer`
    applies it: try the children in order, accept x_k with probability min(1, p(x_k) / q(x_k)); after a
    rejection p <- norm(max(p - q, 0)) and x_k is removed from q (renormalised).

Everything here is a pure function of probability (or logit) tensors and a generator; no model is called.

Count layout (Sequoia's): `counts` is [W + 2] long; index 0 is padding (always 0), index k in 1..W counts
the positions where the k-th child was accepted, index W + 1 those where none was.
"""
from __future__ import annotations

import torch

from engine.sampling import Sampling, probs_from_logits, residual, sample_without_replacement


def greedy_ranks(target_scores: torch.Tensor, draft_scores: torch.Tensor, width: int) -> torch.Tensor:
    """Temperature 0: the rank (1..W) of the draft child equal to the target's argmax, W + 1 if none.

    target_scores, draft_scores: [n, V] logits or probabilities (only their order matters). The draft's
    children are its top-W in rank order; a child whose score is -inf is not drafted (a draft over a
    vocabulary subset has -inf outside it). Returns [n] long.
    """
    _check_shapes(target_scores, draft_scores, width)
    top = draft_scores.topk(width, dim=-1)                               # values, indices: [n, W]
    drafted = top.values > float("-inf")                                 # [n, W]
    hit = (top.indices == target_scores.argmax(dim=-1, keepdim=True)) & drafted  # [n, W], <= 1 True per row
    first = hit.int().argmax(dim=-1) + 1                                 # [n]
    return torch.where(hit.any(dim=-1), first, torch.full_like(first, width + 1))


def specinfer_ranks(target_probs: torch.Tensor, draft_probs: torch.Tensor, width: int,
                    generator: torch.Generator) -> torch.Tensor:
    """Temperature > 0: the rank (1..W) of the accepted child under the SpecInfer rule, W + 1 if none.

    target_probs, draft_probs: [n, V] probabilities (rows sum to 1). The W children are drawn without
    replacement from draft_probs (Gumbel-top-k, `engine.sampling.sample_without_replacement`). Rows are
    processed together; rows that accepted a child (or ran out of draft mass) drop out of later rounds.
    Returns [n] long.
    """
    _check_shapes(target_probs, draft_probs, width)
    n = target_probs.shape[0]
    device = target_probs.device
    children = sample_without_replacement(draft_probs, width, generator)             # [n, W]
    uniform = torch.rand(n, width, generator=generator, device=device)               # [n, W]
    ranks = torch.full((n,), width + 1, dtype=torch.long, device=device)
    rows = torch.arange(n, device=device)                                            # [a] rows still trying
    p, q = target_probs.float(), draft_probs.float()                                 # [a, V]
    for k in range(width):
        token = children[rows, k][:, None]                                           # [a, 1]
        p_tok, q_tok = p.gather(1, token)[:, 0], q.gather(1, token)[:, 0]            # [a]
        proposable = q_tok > 0  # only zero-probability tokens are left: stop proposing
        accept = proposable & (uniform[rows, k] * q_tok < p_tok)                     # u < p(x) / q(x)
        ranks[rows[accept]] = k + 1
        keep = proposable & ~accept
        rows, p, q, token = rows[keep], p[keep], q[keep], token[keep]
        if rows.numel() == 0 or k + 1 == width:
            break
        p = residual(p, q)
        q = q.scatter(1, token, 0.0)
        mass = q.sum(dim=-1, keepdim=True)                                           # [a, 1]
        alive = mass[:, 0] > 0
        rows, p, q, mass = rows[alive], p[alive], q[alive], mass[alive]
        q = q / mass
    return ranks


def rank_counts(ranks: torch.Tensor, width: int) -> torch.Tensor:
    """[n] ranks in 1..W + 1 -> counts [W + 2] long in Sequoia's layout (index 0 padding, W + 1 = none)."""
    return torch.bincount(ranks.cpu(), minlength=width + 2)[: width + 2]


def acceptance_counts(target_logits: torch.Tensor, draft_logits: torch.Tensor, width: int, sampling: Sampling,
                      generator: torch.Generator) -> torch.Tensor:
    """Counts [W + 2] for n positions. target_logits, draft_logits: [n, V] over the same (target) vocabulary;
    the draft's logits are -inf on tokens it cannot propose. At T > 0 both go through `sampling`'s
    temperature and top-p first (Sequoia samples the draft's children from the same T/P distribution)."""
    if sampling.greedy:
        ranks = greedy_ranks(target_logits, draft_logits, width)
    else:
        ranks = specinfer_ranks(probs_from_logits(target_logits, sampling), probs_from_logits(draft_logits, sampling),
                                width, generator)
    return rank_counts(ranks, width)


def acceptance_vector(counts: torch.Tensor) -> torch.Tensor:
    """Counts [W + 2] -> the acceptance vector [W + 1] float64: index 0 padding (0), index k the fraction of
    positions where child k was accepted. The 'none accepted' fraction is dropped (see `none_fraction`),
    which is the form `engine.tree_search` and `growmap_tool search --acceptance` read without --drop-last."""
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no positions were measured")
    vec = counts[:-1].double() / total
    vec[0] = 0.0
    return vec


def none_fraction(counts: torch.Tensor) -> float:
    """The fraction of positions where no child was accepted (the last entry of Sequoia's vector)."""
    return float(counts[-1]) / max(int(counts.sum()), 1)


def _check_shapes(target: torch.Tensor, draft: torch.Tensor, width: int) -> None:
    if target.ndim != 2 or target.shape != draft.shape:
        raise ValueError(f"target and draft distributions must both be [n, V]; got {tuple(target.shape)} "
                         f"and {tuple(draft.shape)}")
    if not 1 <= width <= target.shape[1]:
        raise ValueError(f"width must be in 1..{target.shape[1]} (the vocabulary), got {width}")
