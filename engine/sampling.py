"""Temperature / top-p processing, residual distributions and sampling without replacement.

Every random draw takes an explicit `torch.Generator` on the tensors' device, so runs repeat exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How the target's next-token distribution is formed. temperature == 0 means greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probs_from_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[..., V] float logits -> [..., V] float32 probabilities after temperature and nucleus (top-p) filtering.

    Top-p keeps the smallest set of most likely tokens whose mass reaches top_p (always at least one).
    """
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= sampling.top_p, 0.0)
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row: probs [..., V] -> [...] long."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def sample_without_replacement(probs: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct draws per row in draw order (Gumbel-top-k): probs [r, V] -> [r, k] long.

    Tokens of zero probability come last (score -inf); the verifier stops at the first such child.
    """
    uniform = torch.rand(probs.shape, generator=generator, device=probs.device).clamp_(min=1e-20)
    gumbel = -torch.log(-torch.log(uniform))
    return (probs.log() + gumbel).topk(k, dim=-1).indices


def residual(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """norm(max(p - q, 0)) over the last axis: the distribution to draw from after a rejection
    (arXiv 2211.17192). Falls back to p where p <= q everywhere (then the rejection had probability 0)."""
    diff = (target_probs - draft_probs).clamp_(min=0)
    total = diff.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, diff / total.clamp(min=1e-30), target_probs)
