"""Drafters turn draft-model logits into a candidate tree each step.

The draft keeps its own KV cache of the committed tokens. `DraftCache` owns that bookkeeping: before a
step it appends whatever committed tokens the draft has not seen (the root, plus accepted leaves the draft
never ran), and after verification it keeps the accepted nodes the draft did run. Tree node i of a step
sits in slot `root_slot + i` in both the draft and the target cache, at position `root_slot + depth[i]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.feature_draft import shift_features
from engine.growmap import Growmap
from engine.model import TreeModel, to_target_vocab
from engine.sampling import Sampling, probs_from_logits, sample_without_replacement
from engine.tree import CandidateTree
from engine.tree_mask import causal_mask, tree_attention_mask


def append_tokens(model: TreeModel, token_ids: torch.Tensor, start: int, last_logits: bool = True,
                  prev_features: torch.Tensor | None = None, return_hidden: bool = False,
                  hidden_layers: tuple[int, ...] | None = None, inputs_embeds: torch.Tensor | None = None
                  ) -> torch.Tensor | None | tuple[torch.Tensor | None, torch.Tensor]:
    """Append a causal chunk of committed tokens (token_ids: [c] long) at slots/positions [start, start + c)
    and return the last token's logits ([own vocab]) if asked; the prefill skips the LM head entirely.

    A feature draft reads `prev_features` [c, d]; with `return_hidden` the chunk's final hidden states [c, d]
    (or its `hidden_layers` side by side, see TreeModel.forward) come back too, as (logits or None, hidden).
    `inputs_embeds` [c, d] replaces the chunk's token embeddings (a multimodal prefill).
    """
    count = token_ids.shape[0]
    slots = torch.arange(start, start + count, device=model.device)
    mask = causal_mask(count, start, model.device)
    rows = slots[-1:] - start if last_logits else slots[:0]
    out = model.forward(token_ids, slots, slots, mask, logits_rows=rows, return_hidden=return_hidden,
                        prev_features=prev_features, hidden_layers=hidden_layers, inputs_embeds=inputs_embeds)
    logits, hidden = out if return_hidden else (out, None)
    last = logits[0] if last_logits else None
    return (last, hidden) if return_hidden else last


def teacher_forced_logits(model: TreeModel, token_ids: torch.Tensor, rows: torch.Tensor,
                          target_features: torch.Tensor | None = None, return_hidden: bool = False,
                          hidden_layers: tuple[int, ...] | None = None,
                          predicted_features: torch.Tensor | None = None
                          ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One causal forward over a whole text from slot 0: token_ids [L] long (target ids), rows [r] long.

    Returns the next-token logits of `rows` over the model's own vocabulary, [r, own vocab]: every position's
    distribution from a single forward, which is how draft quality is measured without decoding; with
    `return_hidden` also the hidden states of all L positions: for the target, the features a feature draft
    reads ([L, d], or its `hidden_layers` side by side, [L, k * d]: pass the draft's `target_layers`); for a
    feature draft, its predicted features [L, d].
    A feature draft reads either the target's `target_features` (as the target returned them) or its own
    `predicted_features` [L, d] from an earlier call: the self-fed logits, as the children of every non-root
    tree node are drafted. (There every position is self-fed, also the context, where decoding uses the
    target's real features: a slightly pessimistic stand-in.)
    """
    length = token_ids.shape[0]
    slots = torch.arange(length, device=model.device)
    prev_features = None
    if model.uses_target_features:
        if (target_features is None) == (predicted_features is None):
            raise ValueError("a feature draft's logits need either the target's features (target_features=) or "
                             "its own predicted features (predicted_features=)")
        own = predicted_features if target_features is None else model.target_feature(target_features)
        prev_features = shift_features(own)
    return model.forward(token_ids, slots, slots, causal_mask(length, 0, model.device), logits_rows=rows,
                         return_hidden=return_hidden, prev_features=prev_features, hidden_layers=hidden_layers)


@dataclass(frozen=True)
class DraftPrefix:
    """What a draft reads in place of the target's prompt, when that differs: a vision-language draft's own
    image prefix, or a text-only draft's prompt without the image placeholder (Gagrani et al. 2024,
    arXiv 2404.08856). The draft's committed sequence is `ids` followed by the target's committed tokens
    after its prompt, so the draft's slots are its own; trees are exchanged by node index, which needs no
    slots. The prompt's last token (the first step's root) must be a text token, embedded as such.
    """

    target_len: int                         # tokens of the target's prompt this prefix stands for
    ids: torch.Tensor                       # [p] long, the draft's prompt
    embeds: torch.Tensor | None = None      # [p, d] the draft's first-layer inputs for it (image features merged)


class DraftCache:
    """Which committed tokens the draft's cache holds, and which tree nodes it ran this step.

    For a feature draft (engine/feature_draft.py) it also keeps the target's feature of every committed slot
    (`record_target_features`, fed by the decoder after each target forward): slot p runs with the feature of
    slot p - 1. Tree nodes run on their parent's predicted feature (kept per node for the step), so `accept`
    keeps none of them: the next `catch_up` runs the accepted tokens again with the target's real features,
    in one forward.
    """

    def __init__(self, draft: TreeModel, max_nodes: int) -> None:
        """max_nodes: the most tree nodes the draft runs in one step (root included)."""
        self.draft = draft
        self.uses_features = draft.uses_target_features
        self.cached_len = 0
        self.prefix: DraftPrefix | None = None
        self.root_slot = 0
        self.ran_nodes: set[int] = set()
        if self.uses_features:
            # row p + 1 holds the target's feature of slot p; row 0 stays zero (slot 0 has no previous position)
            self.feature_log = torch.zeros(draft.max_len + 1, draft.hidden_size, dtype=draft.dtype,
                                           device=draft.device)
            # this step's predicted feature of each node the draft ran (node 0: the root), read by its children
            self.node_features = torch.zeros(max_nodes, draft.hidden_size, dtype=draft.dtype, device=draft.device)

    def reset(self, prefix: DraftPrefix | None = None) -> None:
        """Start a new prompt; `prefix`: the draft's own version of it (None: the target's tokens)."""
        if prefix is not None and self.uses_features:
            raise ValueError("a feature draft reads the target's own prompt and features: it takes no DraftPrefix")
        self.cached_len = 0
        self.prefix = prefix

    def draft_sequence(self, committed: torch.Tensor) -> torch.Tensor:
        """committed: [L] long, the target's committed tokens -> the draft's: its prefix, then what follows
        the target's prompt."""
        if self.prefix is None:
            return committed
        return torch.cat([self.prefix.ids.to(committed.device), committed[self.prefix.target_len:]])

    def record_target_features(self, start_slot: int, features: torch.Tensor) -> None:
        """features: [n, d] the target's final hidden states at slots [start_slot, start_slot + n) (a draft of
        fused layers: [n, k * d], its `target_layers`' states, kept as the fused [n, d] feature)."""
        if self.uses_features:
            self.feature_log[start_slot + 1:start_slot + 1 + features.shape[0]] = self.draft.target_feature(features)

    def catch_up(self, committed: torch.Tensor) -> torch.Tensor:
        """committed: [L] long, all committed tokens (the last one is this step's root).
        Runs the unseen ones and returns the root's next-token logits [draft vocab]."""
        committed = self.draft_sequence(committed)
        length = committed.shape[0]
        if self.uses_features:  # slot p reads the target's feature of slot p - 1: feature_log row p
            logits, hidden = append_tokens(self.draft, committed[self.cached_len:], self.cached_len,
                                           prev_features=self.feature_log[self.cached_len:length],
                                           return_hidden=True)
            self.node_features[0] = hidden[-1]
        else:
            logits = append_tokens(self.draft, committed[self.cached_len:], self.cached_len,
                                   inputs_embeds=self._prefix_embeds(committed))
        self.cached_len = length
        self.root_slot = length - 1
        self.ran_nodes = {0}
        return logits

    def _prefix_embeds(self, committed: torch.Tensor) -> torch.Tensor | None:
        """First-layer inputs [c, d] of the catch-up chunk when it reaches into a prefix with embeddings."""
        if self.prefix is None or self.prefix.embeds is None or self.cached_len >= self.prefix.ids.shape[0]:
            return None
        own = self.prefix.embeds[self.cached_len:].to(self.draft.device, self.draft.dtype)
        rest = committed[self.cached_len + own.shape[0]:]
        return torch.cat([own, self.draft.embed_inputs(rest, None)]) if rest.numel() else own

    def run_nodes(self, nodes: torch.Tensor, node_ids: list[int], tree_tokens: torch.Tensor, depth: torch.Tensor,
                  parents: torch.Tensor, ancestors: torch.Tensor, tree_size: int) -> torch.Tensor:
        """Run tree nodes [r] long (their ancestors already ran) and return their logits [r, draft vocab].

        node_ids: the same nodes as Python ints, for the bookkeeping (reading `nodes` back would sync CUDA).
        tree_tokens, depth, parents: [>= tree_size] long; ancestors: [>= tree_size, >= tree_size] bool.
        """
        slots = self.root_slot + nodes
        mask = tree_attention_mask(ancestors[:tree_size, :tree_size], nodes, self.root_slot)
        self.ran_nodes.update(node_ids)
        positions = self.root_slot + depth[nodes]
        if not self.uses_features:
            return self.draft.forward(tree_tokens[nodes], positions, slots, mask)
        logits, predicted = self.draft.forward(tree_tokens[nodes], positions, slots, mask, return_hidden=True,
                                               prev_features=self.node_features[parents[nodes]])
        self.node_features[nodes] = predicted
        return logits

    def accept(self, path: list[int]) -> None:
        """Keep the accepted nodes the draft ran (a prefix of the path: a node runs only after its parent);
        a feature draft keeps none (they ran on predicted features)."""
        ran = []
        for node in () if self.uses_features else path:
            if node not in self.ran_nodes:
                break
            ran.append(node)
        if ran:
            src = self.root_slot + torch.tensor(ran, device=self.draft.device)
            self.draft.cache.keep(src, self.root_slot + 1)
        self.cached_len = self.root_slot + 1 + len(ran)


def draft_children(draft: TreeModel, logits: torch.Tensor, count: int, sampling: Sampling, sample_children: bool,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick `count` distinct children per row. logits: [r, draft vocab].

    Returns child token ids [r, count] (target vocabulary) in rank order and, when sampling children, the
    draft distributions they were drawn from [r, target vocab] (needed by the speculative-sampling verifier).
    """
    if not sample_children:
        return draft.to_target_ids(logits.topk(count, dim=-1).indices), None
    probs = probs_from_logits(logits, sampling)
    picks = sample_without_replacement(probs, count, generator)
    return draft.to_target_ids(picks), to_target_vocab(probs, draft.output_ids, draft.target_vocab_size, 0.0)


@dataclass(frozen=True)
class _GrowthStep:
    """One growth step of a growmap, laid out once so that `propose` never reads a device tensor back (each
    read would be a CUDA sync): the nodes it expands, and where each child's token sits in the step's
    [expanded, width] block of picks (width = the widest branching of the step)."""

    expanded: torch.Tensor        # [e] long
    expanded_ids: list[int]       # the same nodes as Python ints
    child_nodes: torch.Tensor     # [c] long, the children of the expanded nodes in order
    pick_positions: torch.Tensor  # [c] long, flat index of each child's pick in the [e, width] block
    width: int

    @staticmethod
    def of(growmap: Growmap, roots: list[int], branches: list[int], device: torch.device) -> _GrowthStep:
        expanded = [node for node, count in zip(roots, branches) if count > 0]
        width = max(len(growmap.successors[node]) for node in expanded)
        child_nodes = [child for node in expanded for child in growmap.successors[node]]
        positions = [row * width + rank for row, node in enumerate(expanded)
                     for rank in range(len(growmap.successors[node]))]
        return _GrowthStep(torch.tensor(expanded, device=device), expanded,
                           torch.tensor(child_nodes, dtype=torch.long, device=device),
                           torch.tensor(positions, dtype=torch.long, device=device), width)


class StaticTreeDrafter:
    """Fills the fixed tree shape of a growmap: growth step s runs the nodes it expands (one batched draft
    forward) and gives each its top-k (or sampled) children. Sequoia (arXiv 2402.12374) / the original."""

    def __init__(self, draft: TreeModel, growmap: Growmap, sampling: Sampling, sample_children: bool) -> None:
        device = draft.device
        self.draft, self.growmap, self.sampling, self.sample_children = draft, growmap, sampling, sample_children
        self.cache = DraftCache(draft, growmap.size)
        self.uses_target_features = draft.uses_target_features
        self.target_layers = draft.target_layers
        self.parents = growmap.parents.to(device)
        self.depth = growmap.depth.to(device)
        self.ancestors = growmap.mask.to(device)
        self.steps = [_GrowthStep.of(growmap, roots, branches, device)
                      for roots, branches in zip(growmap.roots, growmap.branches) if any(branches)]

    def reset(self, prefix: DraftPrefix | None = None) -> None:
        self.cache.reset(prefix)

    def record_target_features(self, start_slot: int, features: torch.Tensor) -> None:
        self.cache.record_target_features(start_slot, features)

    def propose(self, committed: torch.Tensor, generator: torch.Generator) -> CandidateTree:
        """committed: [L] long. Returns the filled tree whose root is committed[-1]."""
        size = self.growmap.size
        tokens = torch.zeros(size, dtype=torch.long, device=self.draft.device)
        tokens[0] = committed[-1]
        root_logits = self.cache.catch_up(committed)
        draft_probs: dict[int, torch.Tensor] = {}
        for step in self.steps:
            if step.expanded_ids == [0]:  # catch_up already ran the root
                logits = root_logits[None]
            else:
                logits = self.cache.run_nodes(step.expanded, step.expanded_ids, tokens, self.depth, self.parents,
                                              self.ancestors, size)
            picks, probs = draft_children(self.draft, logits, step.width, self.sampling, self.sample_children,
                                          generator)
            tokens[step.child_nodes] = picks.flatten()[step.pick_positions]
            if probs is not None:
                draft_probs.update(zip(step.expanded_ids, probs.unbind(0)))
        return CandidateTree(tokens, self.parents, self.depth, self.ancestors, draft_probs,
                             child_lists=self.growmap.successors)

    def accept(self, path: list[int]) -> None:
        self.cache.accept(path)
