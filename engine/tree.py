"""The per-step candidate tree: flat arrays in node order, node 0 the root (the last committed token)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CandidateTree:
    tokens: torch.Tensor     # [n] long, target-vocabulary ids; tokens[0] is the root
    parents: torch.Tensor    # [n] long, -1 for the root; parents[i] < i
    depth: torch.Tensor      # [n] long, root 0
    ancestors: torch.Tensor  # [n, n] bool, ancestor-or-self
    # draft distribution each expanded node's children were sampled from ([V] float32, target vocabulary);
    # filled only when children are sampled (multi-draft speculative sampling needs it)
    draft_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    # child indices per node in rank order, when the drafter already knows them (a static tree's never change),
    # so the sampling verifiers need not read `parents` back from the device every step
    child_lists: list[list[int]] | None = None

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def children(self) -> list[list[int]]:
        """Child indices of each node, in drafting order (child rank)."""
        if self.child_lists is not None:
            return self.child_lists
        return children_of(self.parents.tolist())

    def nodes_per_depth(self) -> list[int]:
        return torch.bincount(self.depth).tolist()


def children_of(parents: list[int]) -> list[list[int]]:
    """Child indices of each node, in node order, from the parent list (-1 for the root)."""
    kids: list[list[int]] = [[] for _ in parents]
    for node, parent in enumerate(parents):
        if parent >= 0:
            kids[parent].append(node)
    return kids
