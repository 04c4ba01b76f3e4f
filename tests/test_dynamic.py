"""Dynamic trees (EAGLE-2 style best-first growth): exact at T = 0, always a connected tree within the budget,
and lossless in distribution with every sampling verifier each score supports."""
from __future__ import annotations

import pytest
import torch

from engine.decoder import autoregressive_generate, speculative_generate
from engine.drafters import append_tokens
from engine.dynamic_drafter import DynamicTreeDrafter
from engine.sampling import Sampling, probs_from_logits
from engine.tree import CandidateTree
from engine.tree_mask import ancestor_mask_from_parents
from tests.tiny_models import hf_greedy, random_prompt, tiny_llama, tree_model

VOCAB = 128
GREEDY = Sampling(0.0, 1.0)
# (budget, width, depth, score)
CONFIGS = [(2, 1, 1, "logprob"), (16, 4, 5, "logprob"), (64, 8, 9, "logprob"), (10, 3, 12, "original"),
           (32, 2, 16, "original")]


class RecordingDrafter:
    """Wraps a drafter and keeps every tree it proposes."""

    def __init__(self, inner: DynamicTreeDrafter) -> None:
        self.inner, self.trees = inner, []

    def __getattr__(self, name: str):  # everything but `propose` is the wrapped drafter's
        return getattr(self.inner, name)

    def propose(self, committed: torch.Tensor, generator: torch.Generator) -> CandidateTree:
        tree = self.inner.propose(committed, generator)
        self.trees.append(tree)
        return tree




@pytest.fixture(scope="module")
def target_hf():
    return tiny_llama(seed=0, vocab=VOCAB)


@pytest.fixture(scope="module")
def sharp_target_hf():
    """Peaked distributions, so that trees grow deep and draft = target accepts long chains."""
    return tiny_llama(seed=0, vocab=VOCAB, logit_scale=8.0)


@pytest.fixture(scope="module")
def random_draft_hf():
    return tiny_llama(seed=1, vocab=VOCAB, hidden=32, layers=1, heads=2, kv_heads=1, tied=True)


def first_child_chain(tree: CandidateTree) -> int:
    kids, node, length = tree.children(), 0, 0
    while kids[node]:
        node, length = kids[node][0], length + 1
    return length


def check_tree(tree: CandidateTree, budget: int, width: int, depth: int, sampled: bool) -> None:
    parents = tree.parents.tolist()
    assert 1 <= tree.size <= budget
    assert parents[0] == -1 and all(0 <= parents[i] < i for i in range(1, tree.size))
    assert torch.equal(tree.depth[1:], tree.depth[tree.parents[1:]] + 1)
    assert int(tree.depth.max()) <= depth
    assert torch.equal(tree.ancestors, ancestor_mask_from_parents(tree.parents))
    for node, kids in enumerate(tree.children()):
        tokens = tree.tokens[kids].tolist()
        assert len(kids) <= width and len(set(tokens)) == len(tokens)
        if kids and sampled:
            assert node in tree.draft_probs


@pytest.mark.parametrize("budget,width,depth,score", CONFIGS)
@pytest.mark.parametrize("draft_kind", ["random", "same"])
def test_dynamic_greedy_is_exact(target_hf, sharp_target_hf, random_draft_hf, budget, width, depth, score, draft_kind):
    target_model = sharp_target_hf if draft_kind == "same" else target_hf
    draft_model = sharp_target_hf if draft_kind == "same" else random_draft_hf
    drafter = RecordingDrafter(DynamicTreeDrafter(tree_model(draft_model), GREEDY, False, budget, width, depth, score))
    target = tree_model(target_model)
    prompt = random_prompt(17, VOCAB, seed=budget + depth)
    expected = hf_greedy(target_model, prompt, 40)
    assert autoregressive_generate(target, prompt, 40, set(), GREEDY, torch.Generator()).output_ids == expected
    result = speculative_generate(target, drafter, prompt, 40, set(), GREEDY, "greedy", torch.Generator())
    assert result.output_ids == expected
    for tree in drafter.trees:
        check_tree(tree, budget, width, depth, sampled=False)
    if draft_kind == "same":
        # the draft's argmax chain is the target's: each step accepts its whole first-child chain + the bonus,
        # which also checks that the draft's cache keeps the right entries after each step
        chains = [first_child_chain(tree) + 1 for tree in drafter.trees]
        assert result.accepted_per_step[:-1] == chains[:-1]
        assert depth == 1 or max(chains) > 2


@pytest.mark.parametrize("sample_children", [False, True])
def test_kept_set_is_a_connected_tree_over_many_steps(sharp_target_hf, random_draft_hf, sample_children):
    sampling = Sampling(1.0, 0.9)
    verifier = "specinfer" if sample_children else "match"
    for budget, width, depth, score in CONFIGS[1:]:
        if sample_children and score == "original":
            continue
        drafter = RecordingDrafter(DynamicTreeDrafter(tree_model(random_draft_hf), sampling, sample_children,
                                                      budget, width, depth, score))
        speculative_generate(tree_model(sharp_target_hf), drafter, random_prompt(9, VOCAB, seed=width), 30, set(),
                             sampling, verifier, torch.Generator().manual_seed(depth))
        assert len(drafter.trees) >= 10
        for tree in drafter.trees:
            check_tree(tree, budget, width, depth, sample_children)


def test_unsupported_combinations_raise(random_draft_hf):
    draft = tree_model(random_draft_hf)
    with pytest.raises(ValueError, match="original.*specinfer"):
        DynamicTreeDrafter(draft, Sampling(1.0, 1.0), True, 16, 4, 4, "original")
    with pytest.raises(ValueError, match="unknown score"):
        DynamicTreeDrafter(draft, GREEDY, False, 16, 4, 4, "entropy")
    with pytest.raises(ValueError, match="budget >= 2"):
        DynamicTreeDrafter(draft, GREEDY, False, 1, 4, 4)


# Distribution tests: a vocabulary of 8, T = 1. The empirical distribution of the first two emitted tokens over
# RUNS seeded runs must be within TV_BOUND (total variation) of the target's exact distribution. With these
# models the expected TV of an exact sampler is about 0.078 at 1500 runs (0.059 with top-p 0.8); the draft's own
# distribution is 0.34 (0.67) away, so a sampler that leaks the draft's distribution fails.
SMALL_VOCAB, RUNS, TV_BOUND = 8, 1500, 0.12
PROMPT = [1, 5, 2]


def small_model(seed: int) -> torch.nn.Module:
    return tiny_llama(seed=seed, vocab=SMALL_VOCAB, hidden=16, layers=1, heads=2, kv_heads=1, logit_scale=6.0)


def exact_pair_distribution(hf_model: torch.nn.Module, sampling: Sampling) -> torch.Tensor:
    """[V, V]: P(first token = a, second = b) from the model's own probabilities."""
    model = tree_model(hf_model, 64)
    first = probs_from_logits(append_tokens(model, torch.tensor(PROMPT), 0), sampling)
    rows = [first[a] * probs_from_logits(append_tokens(model, torch.tensor(PROMPT + [a]), 0), sampling)
            for a in range(SMALL_VOCAB)]
    return torch.stack(rows)


def empirical_pairs(generate) -> torch.Tensor:
    counts = torch.zeros(SMALL_VOCAB, SMALL_VOCAB)
    for seed in range(RUNS):
        first, second = generate(torch.Generator().manual_seed(seed))[:2]
        counts[first, second] += 1
    return counts / RUNS


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


@pytest.fixture(scope="module")
def small_pair():
    return small_model(0), small_model(1)


@pytest.mark.parametrize("verifier,score,top_p,shape", [
    ("match", "logprob", 1.0, (6, 3, 3)),
    ("match", "original", 1.0, (5, 2, 3)),
    ("specinfer", "logprob", 1.0, (6, 3, 3)),
    ("specinfer", "logprob", 0.8, (4, 3, 2)),
])
def test_sampling_verifiers_are_lossless(small_pair, verifier, score, top_p, shape):
    target_hf, draft_hf = small_pair
    sampling = Sampling(1.0, top_p)
    target, draft = tree_model(target_hf, 64), tree_model(draft_hf, 64)
    drafter = DynamicTreeDrafter(draft, sampling, verifier == "specinfer", *shape, score=score)
    exact = exact_pair_distribution(target_hf, sampling)
    emitted = empirical_pairs(lambda gen: speculative_generate(target, drafter, PROMPT, 2, set(), sampling, verifier,
                                                               gen).output_ids)
    distance = total_variation(emitted, exact)
    assert distance < TV_BOUND, f"total variation {distance:.3f} from the target's distribution"


def test_wrong_sampler_fails_the_bound(small_pair):
    """The draft's own samples (what a verifier that accepted every draft token would emit) are far off."""
    target_hf, draft_hf = small_pair
    sampling = Sampling(1.0, 1.0)
    draft = tree_model(draft_hf, 64)
    emitted = empirical_pairs(lambda gen: autoregressive_generate(draft, PROMPT, 2, set(), sampling, gen).output_ids)
    assert total_variation(emitted, exact_pair_distribution(target_hf, sampling)) > TV_BOUND
