"""Prompt lookup: candidates copied from the text itself, grafted onto a draft's tree as one more branch.

Greedy continuations repeat themselves (and quote their prompt) often, which a small draft predicts only a
few tokens at a time. The tokens that followed the latest earlier occurrence of the context's last n-gram
(prompt lookup decoding, Saxena 2023; transformers' `prompt_lookup_num_tokens`) cost nothing to propose, and
the target verifies them in the same forward as the draft's tree. Verification is unchanged, so the output
stays exact at T = 0 and lossless under sample-match at T > 0: the candidate set never depends on the
target's draws. SpecInfer-style verification needs every child drawn from the draft distribution, which a
copied token is not, so `PromptLookupDrafter` refuses a drafter that samples its children.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.tree import CandidateTree, append_nodes, children_of

if TYPE_CHECKING:
    from engine.drafters import DraftPrefix


def lookup_continuation(context: torch.Tensor, max_ngram: int, max_tokens: int) -> list[int]:
    """Up to `max_tokens` tokens predicted to follow `context` ([L] long, on the CPU) by copying.

    For n from `max_ngram` down to 1, find the latest earlier occurrence of the context's last n tokens that
    has at least one token after it, and return the tokens that followed it. A match that runs into the
    end of the context continues with the period it found (a loop `a b c a b c` goes on `a b c ...`).
    Returns [] when no n-gram recurs.
    """
    length = context.shape[0]
    if max_tokens <= 0 or length < 2:
        return []
    for n in range(min(max_ngram, length - 1), 0, -1):
        windows = context[:length - 1].unfold(0, n, 1)          # window i = context[i:i + n], i <= length - 1 - n
        starts = (windows == context[length - n:]).all(dim=1).nonzero()
        if starts.numel():
            start = int(starts[-1])
            period = length - n - start
            follow = start + n + torch.arange(max_tokens)
            wrapped = length - period + (follow - length) % period  # past the end: repeat with the period
            return context[torch.where(follow < length, follow, wrapped)].tolist()
    return []


def graft_chain(tree: CandidateTree, chain: list[int]) -> tuple[CandidateTree, int]:
    """Add `chain` (tokens after the root) as a path from the root, reusing the nodes already on it.

    Walks down from the root while a child carries the chain's next token, then hangs the rest below as new
    nodes (indices after the tree's). Siblings keep distinct tokens, as the verifiers need. Returns the new
    tree and how many nodes were added; the draft's distributions (`draft_probs`) stay with their nodes.
    """
    if tree.child_lists is None:  # one readback for both
        tokens, parents = torch.stack([tree.tokens, tree.parents]).tolist()
        kids = children_of(parents)
    else:
        tokens, kids = tree.tokens.tolist(), [list(c) for c in tree.child_lists]
    node, used = 0, 0
    while used < len(chain):
        child = next((c for c in kids[node] if tokens[c] == chain[used]), None)
        if child is None:
            break
        node, used = child, used + 1
    extra = chain[used:]
    if not extra:
        return tree, 0
    size = tree.size
    return append_nodes(tree, kids, extra, [node] + list(range(size, size + len(extra) - 1))), len(extra)


def with_prompt_lookup(drafter, max_tokens: int, max_ngram: int):
    """`drafter` wrapped in a PromptLookupDrafter, or as it is when lookup is off (0) or there is no drafter."""
    return PromptLookupDrafter(drafter, max_tokens, max_ngram) if drafter is not None and max_tokens else drafter


class GraftedDrafter:
    """Wraps a drafter (or none) whose tree gets extra nodes grafted after its own each step (prompt lookup
    here, common-sense followers in engine/commonsense.py). The grafted tokens were not drawn from the draft,
    so a drafter that samples its children (specinfer verification) is refused. Accepted grafted tokens are
    new to the wrapped draft, which catches up on them like on any committed token."""

    def __init__(self, inner, what: str) -> None:
        if getattr(inner, "sample_children", False):
            raise ValueError(f"{what} cannot join a tree whose children are sampled from the draft (specinfer "
                             "verification): grafted tokens have no draft probability")
        self.inner = inner
        self.uses_target_features = inner is not None and inner.uses_target_features
        self.target_layers = None if inner is None else inner.target_layers
        self.inner_size = 1  # size of the wrapped drafter's tree this step (grafted nodes come after it)

    def reset(self, prefix: DraftPrefix | None = None) -> None:
        if self.inner is not None:
            self.inner.reset(prefix)

    def record_target_features(self, start_slot: int, features: torch.Tensor) -> None:
        if self.inner is not None:
            self.inner.record_target_features(start_slot, features)

    def inner_tree(self, committed: torch.Tensor, generator: torch.Generator) -> CandidateTree:
        """The wrapped drafter's tree, or the bare root when there is none."""
        if self.inner is not None:
            tree = self.inner.propose(committed, generator)
        else:
            device = committed.device
            tree = CandidateTree(committed[-1:], torch.tensor([-1], device=device),
                                 torch.zeros(1, dtype=torch.long, device=device),
                                 torch.ones(1, 1, dtype=torch.bool, device=device), child_lists=[[]])
        self.inner_size = tree.size
        return tree

    def accept(self, path: list[int]) -> None:
        """The wrapped drafter keeps the part of the path inside its own tree: grafted nodes come after it
        in index and below it in the tree, so they can only end a path."""
        if self.inner is not None:
            self.inner.accept([node for node in path if node < self.inner_size])


class PromptLookupDrafter(GraftedDrafter):
    """Grafts a copied chain of up to `max_tokens` tokens onto each tree of the wrapped drafter (or onto the
    bare root: plain prompt lookup). The tree grows by at most `max_tokens` nodes."""

    def __init__(self, inner, max_tokens: int, max_ngram: int = 3) -> None:
        if max_tokens < 1 or max_ngram < 1:
            raise ValueError("prompt lookup needs max_tokens >= 1 and max_ngram >= 1")
        super().__init__(inner, "prompt lookup")
        self.max_tokens, self.max_ngram = max_tokens, max_ngram

    def propose(self, committed: torch.Tensor, generator: torch.Generator) -> CandidateTree:
        # read the context back before the draft's kernels are queued, so the copy waits for nothing
        chain = lookup_continuation(committed.cpu(), self.max_ngram, self.max_tokens)
        tree = self.inner_tree(committed, generator)
        return graft_chain(tree, chain)[0] if chain else tree
