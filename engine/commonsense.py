"""Common-sense tokens: a follower table (for each token id, the K ids that most often follow it in text;
[V, K] int32, -1 as padding) used at verification time, two ways.

- `SubstituteVerifier`, the original project's rule (test_greedyS_commonsense.py of "An Empirical Study on
  Tree-based Speculative Decoding", a fork of Sequoia, arXiv 2402.12374). During greedy verification, at a
  node none of whose children carries the target's token: when that token is among the common followers of
  the node's own token, the first child's token is overwritten with it, the child is accepted and
  verification goes on in the child's subtree. **Lossy**: the target's logits in that subtree (and the KV
  cache slot kept for the child) were computed with the draft's old token in the context, so the output can
  drift from the target's own greedy output.
- `FollowerAugmentDrafter`, lossless: before verification, the common followers of the first nodes' tokens
  that the draft did not already propose become extra children (within a node budget). Verification is
  unchanged, so greedy output equals the target's own and sample-match stays exact (the candidate set
  never depends on the target's draws).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.prompt_lookup import GraftedDrafter
from engine.sampling import Sampling
from engine.tree import CandidateTree, append_nodes
from engine.verifiers import Verdict


def followers_of(followers: torch.Tensor, token: int) -> list[int]:
    """followers: [V, K] int32 on the CPU. The follower ids of `token` in rank order, padding dropped."""
    return [f for f in followers[token].tolist() if f >= 0]


def verify_substitute(tree: CandidateTree, target_logits: torch.Tensor, followers: torch.Tensor) -> Verdict:
    """Greedy verification with the original's common-sense substitution (lossy, see module docstring).

    target_logits: [n, V]; followers: [V, K] int32 on the CPU. Returns the Verdict with `substitutions`
    (node -> the target's token written over the draft's)."""
    choice = target_logits.argmax(dim=-1).tolist()
    tokens = tree.tokens.tolist()
    kids = tree.children()
    node, path, substitutions = 0, [], {}
    while True:
        wanted = choice[node]
        nxt = next((c for c in kids[node] if tokens[c] == wanted), None)
        if nxt is None and kids[node] and wanted in followers_of(followers, tokens[node]):
            nxt = kids[node][0]
            substitutions[nxt] = wanted
        if nxt is None:
            return Verdict(path=path, bonus=wanted, substitutions=substitutions)
        path.append(nxt)
        node = nxt


@dataclass(frozen=True)
class SubstituteVerifier:
    """The substitute rule as a verifier the decoder calls (`speculative_generate(..., verifier=this)`)."""

    followers: torch.Tensor          # [V, K] int32, CPU
    name: str = "greedy+substitute"
    lossless: bool = False

    def __call__(self, tree: CandidateTree, target_logits: torch.Tensor, sampling: Sampling,
                 generator: torch.Generator) -> Verdict:
        if not sampling.greedy:
            raise ValueError("the common-sense substitute rule is a greedy-verification rule: temperature 0 only")
        return verify_substitute(tree, target_logits, self.followers)


def augment_counts(budget: int, width: int) -> list[int]:
    """Extra children per node for an augment budget: nodes 0, 1, ... (root first; in a growmap, node order
    is drafting order, so the likeliest nodes come first) get up to `width` followers each until `budget`."""
    if budget < 1 or width < 1:
        raise ValueError(f"augment needs budget >= 1 and width >= 1, got {budget} and {width}")
    return [min(width, budget - width * i) for i in range(math.ceil(budget / width))]


def graft_followers(tree: CandidateTree, followers: torch.Tensor, counts: list[int]) -> tuple[CandidateTree, int]:
    """Give node i (i < len(counts)) up to counts[i] extra children: its token's followers, in rank order,
    that are not already among its children. Returns the new tree and how many nodes were added."""
    tokens = tree.tokens.tolist()
    kids = [list(c) for c in tree.children()]
    new_tokens, new_parents = [], []
    for node, count in enumerate(counts[:tree.size]):
        have = {tokens[c] for c in kids[node]}
        for follower in followers_of(followers, tokens[node]):
            if count == 0:
                break
            if follower not in have:
                have.add(follower)
                new_tokens.append(follower)
                new_parents.append(node)
                count -= 1
    if not new_tokens:
        return tree, 0
    return append_nodes(tree, kids, new_tokens, new_parents), len(new_tokens)


class FollowerAugmentDrafter(GraftedDrafter):
    """Wraps a drafter and grafts common followers onto its tree each step (lossless; `augment_counts` says
    where). The tree grows by at most `budget` nodes, which the KV cache (--M) must hold."""

    def __init__(self, inner, followers: torch.Tensor, budget: int, width: int) -> None:
        super().__init__(inner, "common-sense augment")
        self.followers = followers.cpu()
        self.counts = augment_counts(budget, width)

    def propose(self, committed: torch.Tensor, generator: torch.Generator) -> CandidateTree:
        return graft_followers(self.inner_tree(committed, generator), self.followers, self.counts)[0]
