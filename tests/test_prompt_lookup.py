"""Prompt lookup (engine/prompt_lookup.py): the copy rule against a brute-force reference, grafting keeps a
valid tree with distinct siblings, decoding stays exact at T = 0 with every drafter, copied candidates
are actually accepted on repetitive text. (Sample-match with lookup stays lossless: test_distribution.py.)"""
from __future__ import annotations

import random

import pytest
import torch

from engine import growmap as G
from engine.decoder import autoregressive_generate, speculative_generate
from engine.drafters import StaticTreeDrafter
from engine.dynamic_drafter import DynamicTreeDrafter
from engine.prompt_lookup import PromptLookupDrafter, graft_chain, lookup_continuation
from engine.sampling import Sampling
from engine.tree import CandidateTree
from engine.tree_mask import ancestor_mask_from_parents
from tests.tiny_models import random_prompt, tiny_llama, tree_model

GREEDY = Sampling()


def reference_continuation(context: list[int], max_ngram: int, max_tokens: int) -> list[int]:
    """The rule spelled out one token at a time: latest earlier match of the longest suffix n-gram, then
    copy forward, reading the tokens it copies itself once it runs past the end."""
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        starts = [i for i in range(len(context) - n) if context[i:i + n] == context[-n:]]
        if starts:
            text, read = list(context), starts[-1] + n
            while len(text) < len(context) + max_tokens:
                text.append(text[read])
                read += 1
            return text[len(context):]
    return []


def test_lookup_matches_reference_on_random_texts():
    rng = random.Random(0)
    for _ in range(300):
        context = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        ngram, count = rng.randrange(1, 5), rng.randrange(0, 9)
        assert lookup_continuation(torch.tensor(context), ngram, count) == \
            reference_continuation(context, ngram, count), (context, ngram, count)


def test_lookup_examples():
    assert lookup_continuation(torch.tensor([7, 1, 2, 3, 1, 2, 3]), 3, 7) == [1, 2, 3, 1, 2, 3, 1]
    assert lookup_continuation(torch.tensor([5, 1, 2, 9, 8, 1, 2]), 3, 3) == [9, 8, 1]
    assert lookup_continuation(torch.tensor([5, 6, 7]), 3, 4) == []


def filled_tree(seed: int) -> CandidateTree:
    """A 2-ary depth-2 tree whose siblings carry distinct tokens from a vocabulary of 6."""
    growmap = G.kary_tree(2, 2)
    rng = random.Random(seed)
    tokens = [rng.randrange(6)] * growmap.size
    for siblings in growmap.successors:
        for child, token in zip(siblings, rng.sample(range(6), len(siblings))):
            tokens[child] = token
    return CandidateTree(torch.tensor(tokens), growmap.parents, growmap.depth, growmap.mask,
                         child_lists=growmap.successors)


@pytest.mark.parametrize("seed", range(20))
def test_graft_shares_prefix_and_keeps_tree_valid(seed):
    tree = filled_tree(seed)
    rng = random.Random(seed)
    first = tree.tokens[tree.children()[0][0]].item() if seed % 2 else 7  # half share the first child's token
    chain = [first] + [rng.randrange(8) for _ in range(rng.randrange(0, 5))]
    before = (tree.tokens.clone(), [list(k) for k in tree.children()])
    grafted, added = graft_chain(tree, chain)
    assert grafted.size == tree.size + added
    assert torch.equal(grafted.ancestors, ancestor_mask_from_parents(grafted.parents))
    assert torch.equal(grafted.depth, grafted.ancestors.sum(1) - 1)
    kids = grafted.children()
    assert kids == CandidateTree(grafted.tokens, grafted.parents, grafted.depth, grafted.ancestors).children()
    for siblings in kids:  # the verifiers rely on distinct sibling tokens
        assert len({int(grafted.tokens[c]) for c in siblings}) == len(siblings)
    # the chain is now a root path: follow it token by token
    node = 0
    for token in chain:
        node = next(c for c in kids[node] if int(grafted.tokens[c]) == token)
    assert int(grafted.depth[node]) == len(chain)
    assert torch.equal(tree.tokens, before[0]) and tree.children() == before[1]  # the input tree is untouched
    assert graft_chain(grafted, chain)[1] == 0                    # grafting it again adds nothing


def make_drafter(kind: str, draft) -> PromptLookupDrafter:
    inner = {"none": None,
             "static": StaticTreeDrafter(draft, G.kary_tree(2, 2), GREEDY, False),
             "dynamic": DynamicTreeDrafter(draft, GREEDY, False, budget=8, width=2, max_depth=3)}[kind]
    return PromptLookupDrafter(inner, max_tokens=6, max_ngram=3)


@pytest.mark.parametrize("kind", ["none", "static", "dynamic"])
def test_greedy_output_equals_autoregressive(kind):
    target = tree_model(tiny_llama(seed=0, vocab=32))
    draft = tree_model(tiny_llama(seed=1, vocab=32))
    drafter = make_drafter(kind, draft)
    copied = 0
    for seed in range(3):
        prompt = random_prompt(6, 32, seed) * 3  # a repeated prompt gives lookup matches from the start
        ar = autoregressive_generate(target, prompt, 40, set(), GREEDY, torch.Generator())
        spec = speculative_generate(target, drafter, prompt, 40, set(), GREEDY, "greedy", torch.Generator())
        assert spec.output_ids == ar.output_ids
        copied += sum(n > 1 for n in spec.accepted_per_step) if kind == "none" else 0
    if kind == "none":  # plain lookup accepts more than the bonus only through copied tokens
        assert copied > 0


@pytest.mark.parametrize("target_layers", [None, (0, 1, 2)])
def test_feature_draft_with_lookup_equals_autoregressive(target_layers):
    from tests.test_feature_draft import feature_pair

    target, draft = feature_pair(head_subset=True, target_layers=target_layers)
    drafter = PromptLookupDrafter(StaticTreeDrafter(draft, G.kary_tree(2, 2), GREEDY, False), 5)
    prompt = random_prompt(7, 96, 4) * 2
    ar = autoregressive_generate(target, prompt, 30, set(), GREEDY, torch.Generator())
    spec = speculative_generate(target, drafter, prompt, 30, set(), GREEDY, "greedy", torch.Generator())
    assert spec.output_ids == ar.output_ids


class RecordingDrafter:
    """A stand-in drafter: proposes a fixed 3-node tree (root, children 1 and 2) and records what it is told."""

    uses_target_features = False
    target_layers = None
    sample_children = False

    def __init__(self) -> None:
        self.accepted: list[list[int]] = []

    def reset(self, prefix=None) -> None: ...

    def record_target_features(self, start_slot: int, features: torch.Tensor) -> None: ...

    def propose(self, committed: torch.Tensor, generator: torch.Generator) -> CandidateTree:
        parents = torch.tensor([-1, 0, 0])
        return CandidateTree(torch.tensor([int(committed[-1]), 5, 6]), parents, torch.tensor([0, 1, 1]),
                             ancestor_mask_from_parents(parents))

    def accept(self, path: list[int]) -> None:
        self.accepted.append(path)


def test_accept_hands_the_wrapped_drafter_only_its_own_nodes():
    inner = RecordingDrafter()
    drafter = PromptLookupDrafter(inner, max_tokens=3)
    tree = drafter.propose(torch.tensor([5, 7, 8, 5]), torch.Generator())  # copies 7 8 5 under the root
    assert tree.size == 6 and tree.tokens.tolist() == [5, 5, 6, 7, 8, 5]
    drafter.accept([3, 4])
    drafter.accept([1])
    assert inner.accepted == [[], [1]]
    tree = drafter.propose(torch.tensor([1, 5, 9, 1]), torch.Generator())  # copy 5 9 1 shares node 1
    assert tree.tokens.tolist() == [1, 5, 6, 9, 1] and tree.parents.tolist() == [-1, 0, 0, 1, 3]
    drafter.accept([1, 3, 4])
    assert inner.accepted[-1] == [1]


def test_lookup_refuses_sampled_children():
    inner = RecordingDrafter()
    inner.sample_children = True
    with pytest.raises(ValueError, match="sampled"):
        PromptLookupDrafter(inner, max_tokens=3)
