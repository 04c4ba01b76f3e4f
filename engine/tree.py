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


def append_nodes(tree: CandidateTree, kids: list[list[int]], tokens: list[int], parents: list[int]) -> CandidateTree:
    """`tree` with new nodes after its own: node `tree.size + j` carries tokens[j] below parents[j] (an existing
    node, or an earlier new one). `kids` are the tree's child lists, extended in place with the new nodes.

    Built with one host-to-device copy and one row gather, since drafters graft every step (prompt lookup's
    copied chain, common-sense followers). The caller keeps sibling tokens distinct, as the verifiers need.
    """
    size, count = tree.size, len(tokens)
    anchors, offsets = [], []          # each new node's nearest existing ancestor, and its depth below it
    new_block = [[False] * count for _ in range(count)]  # ancestor-or-self among the new nodes
    for j, parent in enumerate(parents):
        if parent < size:
            anchors.append(parent)
            offsets.append(1)
        else:
            anchors.append(anchors[parent - size])
            offsets.append(offsets[parent - size] + 1)
            new_block[j] = list(new_block[parent - size])
        new_block[j][j] = True
        kids[parent].append(size + j)
        kids.append([])
    device = tree.tokens.device
    packed = torch.tensor([tokens, parents, anchors, offsets] + new_block).to(device)  # [4 + count, count]
    block = packed[4:].bool()                                                      # [count, count]
    ancestors = torch.zeros(size + count, size + count, dtype=torch.bool, device=device)
    ancestors[:size, :size] = tree.ancestors
    ancestors[size:, :size] = tree.ancestors[packed[2]]
    ancestors[size:, size:] = block
    return CandidateTree(torch.cat([tree.tokens, packed[0]]), torch.cat([tree.parents, packed[1]]),
                         torch.cat([tree.depth, tree.depth[packed[2]] + packed[3]]), ancestors,
                         dict(tree.draft_probs), child_lists=kids)
