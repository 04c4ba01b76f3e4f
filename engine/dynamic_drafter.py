"""Dynamic draft trees: the draft grows each step's tree best-first under a node budget (EAGLE-2, arXiv 2406.16858;
the original project's `test_greedyS_dy.py`).

One step, for a budget B (root included), an expansion width W and a depth limit D:
  level 1     the root's top-W children (or W children sampled without replacement from the draft's q)
  level d+1   the frontier = the best W nodes of level d that are still among the best B - 1 candidates so
              far, run in one batched draft forward, each given W children
  at the end  the tree = the root + the best B - 1 candidates, renumbered in breadth-first order
Every node is ranked by a key (below) that never exceeds its parent's, ties going to the older node, so the
best B - 1 always form a connected tree, and a node outside the running best B - 1 can never get back in: it is
not expanded (EAGLE-2 expands the top-k of the newest layer and reranks all candidates at the end; pruning the
frontier by the running top B is what makes that rerank exact here).

Slots: the draft runs only the frontier nodes, in run order: run node r (the root is run 0) sits in draft slot
`root_slot + r`. A tree node's final index is known only after the rerank, so the drafter keeps the run index
of each final node and `accept` hands `DraftCache.accept` the accepted path in run indices; the cache then
moves the accepted nodes it ran onto the committed prefix. Nothing is moved or re-run. The draft writes at
most `1 + min(W, B - 1) * (D - 1)` tree slots, the target B: `slots_for` is the larger.

Scores (a node's rank key is its score capped by its parent's key, and for sampled children by its elder
sibling's too, so that a node's kept children are a prefix of its children in rank order):
  logprob   cumulative draft log-probability of the path (EAGLE-2): log_softmax of the draft logits. With
            sampled children the term of the j-th draw is instead log E[q(x_j) | x_1..x_{j-1}], the expected
            draft probability of the j-th draw given the earlier ones: it does not depend on the token drawn,
            which keeps speculative sampling lossless (see below).
  original  the original's `compute_cumulative_logit`: the sum over the path of (1 - decay * depth) x the raw
            draft logit of each node's token (the original hard-codes decay = 0.09; `--decay` sets it). A child can outscore its parent; the cap by the parent's key
            ranks it just after its parent instead (the original keeps the raw top B and drops orphans).

| verifier      | logprob | original | why                                                                 |
| greedy        | yes     | yes      | argmax match is exact for any tree                                  |
| match         | yes     | yes      | the target draws its token whatever the tree; siblings are distinct |
| specinfer     | yes     | no       | see below                                                           |

Multi-draft speculative sampling needs, at every node, children that are the first k draws without
replacement from q, where the decision to stop after k draws depends only on the earlier draws, never on the
values of the draws it cuts (or keeps). Dropping a middle child breaks the first condition (the capped keys
prevent it); ranking a sampled child by its own probability breaks the second: a draw would be kept more
often when q(x) is large, so the kept children are no longer distributed as q. Hence the value-blind term
above: a sampled child's key depends on its ancestors and elder siblings only, and nothing the child or its
descendants draw can push it out of the best B - 1 (they all rank below it). The `original` score ranks
sampled children by their own logits and is refused with the `specinfer` verifier.
"""
from __future__ import annotations

import torch

from engine.drafters import DraftCache, DraftPrefix, draft_children
from engine.model import TreeModel
from engine.sampling import Sampling
from engine.tree import CandidateTree
from engine.tree_mask import ancestor_mask_from_parents

SCORES = ("logprob", "original")
ORIGINAL_DEPTH_DECAY = 0.09  # the original's weight 1 - 0.09 * depth on each path node's logit


def check_score(score: str, sample_children: bool) -> None:
    """Raise ValueError for an unknown score or one that would make the sampling verifier lossy."""
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    if score == "original" and sample_children:
        raise ValueError("the 'original' score ranks sampled children by their own logits, which biases the "
                         "specinfer verifier; use --score logprob or --verify match")


def check_decay(decay: float) -> None:
    """Raise ValueError for a negative decay of the original score (its weights 1 - decay * depth would grow with
    depth). Past depth 1 / decay the weights turn negative, as in the original's formula; that is left as it is."""
    if decay < 0:
        raise ValueError(f"decay must be >= 0, got {decay:g}")


def own_ids(draft: TreeModel, target_ids: torch.Tensor) -> torch.Tensor:
    """Target-vocabulary ids [...] -> the draft's own logit columns [...]."""
    return target_ids if draft.column_of is None else draft.column_of[target_ids]


def expected_draw_logprob(draft_probs: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """log E[q(x_j) | x_1..x_{j-1}] for draws without replacement: draft_probs [r, V], picks [r, k] -> [r, k].

    The j-th draw comes from q restricted to the tokens not drawn yet, so its expected q is
    (sum q^2 - sum_{i<j} q(x_i)^2) / (1 - sum_{i<j} q(x_i)); -inf once the draws exhaust q's support.
    """
    picked = draft_probs.gather(1, picks)                               # [r, k]
    mass_before = picked.cumsum(dim=1) - picked
    square_before = (picked * picked).cumsum(dim=1) - picked * picked
    total_square = (draft_probs * draft_probs).sum(dim=1, keepdim=True)
    remaining = (total_square - square_before).clamp(min=0.0)
    return remaining.log() - (1.0 - mass_before).clamp(min=1e-30).log()


class DynamicTreeDrafter:
    """Best-first dynamic tree under a node budget (module docstring); implements the decoder's Drafter."""

    def __init__(self, draft: TreeModel, sampling: Sampling, sample_children: bool, budget: int, width: int,
                 max_depth: int, score: str = "logprob", decay: float = ORIGINAL_DEPTH_DECAY) -> None:
        check_score(score, sample_children)
        if score == "original":
            check_decay(decay)
        if budget < 2 or width < 1 or max_depth < 1:
            raise ValueError(f"the dynamic tree needs budget >= 2, width >= 1 and depth >= 1 "
                             f"(got {budget}, {width}, {max_depth})")
        self.draft, self.sampling, self.sample_children = draft, sampling, sample_children
        self.budget, self.width, self.max_depth, self.score = budget, width, max_depth, score
        self.decay = decay
        self.max_runs = 1 + min(width, budget - 1) * (max_depth - 1)
        self.cache = DraftCache(draft, self.max_runs)
        self.uses_target_features = draft.uses_target_features
        self.target_layers = draft.target_layers
        self.run_of_node: list[int] = [0]

    @staticmethod
    def slots_for(budget: int, width: int, max_depth: int) -> int:
        """Cache slots a step writes from the root's slot on: B in the target, up to one per run node in the draft."""
        return max(budget, 1 + min(width, budget - 1) * (max_depth - 1))

    def reset(self, prefix: DraftPrefix | None = None) -> None:
        self.cache.reset(prefix)

    def record_target_features(self, start_slot: int, features: torch.Tensor) -> None:
        self.cache.record_target_features(start_slot, features)

    def edge_scores(self, logits: torch.Tensor, picks: torch.Tensor, probs: torch.Tensor | None,
                    depth: int) -> torch.Tensor:
        """Score added by each child: logits [r, draft vocab], picks [r, W] target ids -> [r, W]."""
        if self.score == "original":
            return (1.0 - self.decay * depth) * logits.gather(1, own_ids(self.draft, picks))
        if probs is not None:
            return expected_draw_logprob(probs, picks)
        return torch.log_softmax(logits.float(), dim=-1).gather(1, own_ids(self.draft, picks))

    def child_keys(self, parent_keys: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """Rank keys of children: parent_keys [r], edges [r, W] -> [r, W], never above the parent's key, and
        with sampled children never above the elder sibling's."""
        keys = torch.minimum(parent_keys[:, None] + edges, parent_keys[:, None])
        if self.sample_children:
            keys = torch.cummin(keys, dim=1).values
        return keys

    def select_frontier(self, keys: torch.Tensor, level_start: int) -> torch.Tensor:
        """Indices (ascending) of the newest level's nodes to expand: its best W that are still among the best
        B - 1 candidates. keys: [N] rank keys of all candidates so far (root excluded from ranking)."""
        order = torch.sort(keys[1:], descending=True, stable=True).indices + 1
        in_budget = order[:self.budget - 1]
        newest = in_budget[(in_budget >= level_start) & torch.isfinite(keys[in_budget])]
        return newest[:self.width].sort().values

    def propose(self, committed: torch.Tensor, generator: torch.Generator) -> CandidateTree:
        """committed: [L] long. Grows, ranks and prunes this step's tree; its root is committed[-1]."""
        device = self.draft.device
        root_logits = self.cache.catch_up(committed)
        tokens, parents = [committed[-1:]], [torch.full((1,), -1, dtype=torch.long, device=device)]
        depths = [torch.zeros(1, dtype=torch.long, device=device)]
        keys = torch.zeros(1, device=device)
        run_index = torch.full((1,), 0, dtype=torch.long, device=device)
        run_tokens = torch.zeros(self.max_runs, dtype=torch.long, device=device)
        run_tokens[0] = committed[-1]
        run_parents = torch.full((self.max_runs,), -1, dtype=torch.long, device=device)
        run_depth = torch.zeros(self.max_runs, dtype=torch.long, device=device)
        probs_of_run: dict[int, torch.Tensor] = {}
        frontier, logits, runs = torch.zeros(1, dtype=torch.long, device=device), root_logits[None], 1
        level_start = 0  # index of the newest level's first node
        for depth in range(1, self.max_depth + 1):
            if depth > 1:
                frontier = self.select_frontier(keys, level_start)
                if frontier.numel() == 0:
                    break
                new_count = frontier.shape[0]
                new_runs = torch.arange(runs, runs + new_count, device=device)
                run_index[frontier] = new_runs
                run_tokens[new_runs] = torch.cat(tokens)[frontier]
                run_parents[new_runs] = run_index[torch.cat(parents)[frontier]]
                run_depth[new_runs] = depth - 1
                ancestors = ancestor_mask_from_parents(run_parents[:runs + new_count])
                logits = self.cache.run_nodes(new_runs, list(range(runs, runs + new_count)), run_tokens,
                                              run_depth, run_parents, ancestors, runs + new_count)
                runs += new_count
            picks, probs = draft_children(self.draft, logits, self.width, self.sampling, self.sample_children,
                                          generator)
            if probs is not None:
                probs_of_run.update(zip(run_index[frontier].tolist(), probs.unbind(0)))
            level_start = keys.shape[0]
            edges = self.edge_scores(logits, picks, probs, depth)
            tokens.append(picks.flatten())
            parents.append(frontier.repeat_interleave(self.width))
            depths.append(torch.full((picks.numel(),), depth, dtype=torch.long, device=device))
            keys = torch.cat([keys, self.child_keys(keys[frontier], edges).flatten()])
            run_index = torch.cat([run_index, torch.full((picks.numel(),), -1, dtype=torch.long, device=device)])
        return self.prune(torch.cat(tokens), torch.cat(parents), torch.cat(depths), keys, run_index, probs_of_run)

    def prune(self, tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor, keys: torch.Tensor,
              run_index: torch.Tensor, probs_of_run: dict[int, torch.Tensor]) -> CandidateTree:
        """Keep the root and the best B - 1 candidates (all [N], creation order = breadth-first order) and
        renumber them 0..n-1 in creation order, so parents[i] < i."""
        order = torch.sort(keys[1:], descending=True, stable=True).indices + 1
        best = order[:self.budget - 1]
        best = best[torch.isfinite(keys[best])]
        kept = torch.cat([torch.zeros(1, dtype=torch.long, device=keys.device), best]).sort().values
        final_of = torch.full_like(parents, -1)
        final_of[kept] = torch.arange(kept.shape[0], device=keys.device)
        kept_parents = parents[kept]
        new_parents = torch.where(kept_parents < 0, kept_parents, final_of[kept_parents.clamp(min=0)])
        self.run_of_node = run_index[kept].tolist()
        draft_probs = {final: probs_of_run[run] for final, run in enumerate(self.run_of_node) if run in probs_of_run}
        return CandidateTree(tokens[kept], new_parents, depths[kept], ancestor_mask_from_parents(new_parents),
                             draft_probs)

    def accept(self, path: list[int]) -> None:
        """path: accepted final node indices; the draft cache keeps the ones it ran (by run index)."""
        self.cache.accept([self.run_of_node[node] for node in path])
