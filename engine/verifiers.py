"""Verification: pure functions of (tree, target logits, sampling, generator) that pick the accepted path
and the bonus token. They never call a model.

| verifier      | children drafted by              | lossless?                                          |
| greedy        | draft top-k                      | yes: output equals the target's greedy decoding     |
| sample-match  | draft top-k (distinct tokens)    | yes in distribution: the target draws one token at  |
|               |                                  | each accepted node, a child equal to it is accepted |
|               |                                  | (the original test_greedyS.py rule at T > 0)        |
| specinfer     | sampling without replacement     | yes in distribution (SpecInfer arXiv 2305.09781;    |
|               | from the draft distribution q    | Sequoia arXiv 2402.12374 for the without-replacement|
|               |                                  | variant)                                            |
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.sampling import Sampling, probs_from_logits, residual, sample
from engine.tree import CandidateTree

VERIFIERS = ("greedy", "match", "specinfer")
# which verifiers need the drafter to sample children from q (the others want the draft's top-k)
SAMPLED_CHILDREN = {"greedy": False, "match": False, "specinfer": True}
LOSSLESS = {"greedy": True, "match": True, "specinfer": True}


@dataclass(frozen=True)
class Verdict:
    path: list[int]  # accepted node indices, root excluded, root-to-leaf order
    bonus: int       # the target's own next token after the last accepted node
    # node -> token written over the draft's token before accepting the node; only a lossy rule
    # (engine/commonsense.py) fills it
    substitutions: dict[int, int] = field(default_factory=dict)


def verify_greedy(tree: CandidateTree, target_logits: torch.Tensor) -> Verdict:
    """target_logits: [n, V]. A node is accepted when every node on its root path (root excluded) equals
    the target's argmax at its parent; vectorised (UMbreLLa style), one host sync."""
    choice = target_logits.argmax(dim=-1)                         # [n]
    matches = tree.tokens == choice[tree.parents.clamp(min=0)]    # [n]
    matches[0] = True
    on_path = ~(tree.ancestors & ~matches[None, :]).any(dim=-1)   # [n]
    # siblings carry distinct tokens, so the accepted nodes form one chain: order it by depth
    depth_key = torch.where(on_path, tree.depth, torch.full_like(tree.depth, -1))
    order = depth_key.argsort(descending=True)
    count = int(on_path.sum())
    chain = order[:count].flip(0)
    nodes_and_bonus = torch.cat([chain, choice[chain[-1:]]]).tolist()
    return Verdict(path=nodes_and_bonus[1:count], bonus=nodes_and_bonus[-1])


def verify_sample_match(tree: CandidateTree, target_logits: torch.Tensor, sampling: Sampling,
                        generator: torch.Generator) -> Verdict:
    """Walk from the root: draw x from the target at the current node; move to the child whose token is
    x, else emit x as the bonus. Only rows on the walk are processed (top-p sorts are not free)."""
    kids = tree.children()
    tokens = tree.tokens.tolist()
    node, path = 0, []
    while True:
        drawn = int(sample(probs_from_logits(target_logits[node], sampling), generator))
        nxt = next((c for c in kids[node] if tokens[c] == drawn), None)
        if nxt is None:
            return Verdict(path=path, bonus=drawn)
        path.append(nxt)
        node = nxt


def verify_specinfer(tree: CandidateTree, target_logits: torch.Tensor, sampling: Sampling,
                     generator: torch.Generator) -> Verdict:
    """Multi-draft speculative sampling. At each node the children x_1..x_k were drawn without replacement
    from the draft distribution q; try them in order, accepting x_j with probability min(1, p(x_j)/q(x_j)).
    On rejection p becomes norm(max(p - q, 0)) and x_j is removed from q (renormalised). If every child
    is rejected the bonus is drawn from the final p."""
    kids = tree.children()
    tokens = tree.tokens.tolist()
    device = target_logits.device
    node, path = 0, []
    while True:
        target_probs = probs_from_logits(target_logits[node], sampling)
        accepted = None
        if kids[node]:
            draft_probs = tree.draft_probs[node].clone()
            for child in kids[node]:
                token = tokens[child]
                q_token = float(draft_probs[token])
                if q_token <= 0.0:  # only zero-probability tokens are left: stop proposing
                    break
                ratio = float(target_probs[token]) / q_token
                if float(torch.rand((), generator=generator, device=device)) < ratio:
                    accepted = child
                    break
                target_probs = residual(target_probs, draft_probs)
                draft_probs[token] = 0.0
                remaining = draft_probs.sum()
                if remaining <= 0:
                    break
                draft_probs /= remaining
        if accepted is None:
            return Verdict(path=path, bonus=int(sample(target_probs, generator)))
        path.append(accepted)
        node = accepted


def verify(name: str, tree: CandidateTree, target_logits: torch.Tensor, sampling: Sampling,
           generator: torch.Generator) -> Verdict:
    """Dispatch on the verifier name; temperature 0 always verifies greedily (the argmax is exact)."""
    if sampling.greedy or name == "greedy":
        if not sampling.greedy:
            raise ValueError("the greedy verifier needs temperature 0")
        return verify_greedy(tree, target_logits)
    if name == "match":
        return verify_sample_match(tree, target_logits, sampling, generator)
    if name == "specinfer":
        return verify_specinfer(tree, target_logits, sampling, generator)
    raise ValueError(f"unknown verifier {name!r}; choose one of {', '.join(VERIFIERS)}")
