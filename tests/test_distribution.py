"""Sampling verifiers are lossless: the first two emitted tokens follow the target's own distribution.

Tiny vocabulary (6 tokens, 36 two-token outcomes), fixed seeds, 2000 draws per case; the bound on the
total-variation distance (0.07) is about 1.5x the sampling noise expected at this size, and the exact draft
distribution is checked to lie far outside it, so a verifier that followed the draft would fail.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from engine import growmap as G
from engine.decoder import speculative_generate
from engine.drafters import StaticTreeDrafter, append_tokens
from engine.prompt_lookup import PromptLookupDrafter, lookup_continuation
from engine.sampling import Sampling, probs_from_logits
from engine.verifiers import SAMPLED_CHILDREN
from tests.tiny_models import tiny_llama, tree_model

VOCAB = 6
DRAWS = 2000
TV_BOUND = 0.07
PROMPT = [1, 4, 2, 5, 0]


def exact_two_token_distribution(hf_model, sampling: Sampling, prompt: list[int] = PROMPT) -> torch.Tensor:
    """[VOCAB, VOCAB] probability of (first, second) emitted token under autoregressive sampling."""
    model = tree_model(hf_model, max_len=64)
    first = probs_from_logits(append_tokens(model, torch.tensor(prompt), 0), sampling)
    table = torch.zeros(VOCAB, VOCAB)
    for token in range(VOCAB):
        logits = append_tokens(model, torch.tensor(prompt + [token]), 0)
        table[token] = first[token] * probs_from_logits(logits, sampling)
    return table


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


@pytest.fixture(scope="module")
def pair():
    target = tiny_llama(seed=10, vocab=VOCAB, hidden=32, layers=1, heads=2, kv_heads=1, logit_scale=6.0)
    draft = tiny_llama(seed=11, vocab=VOCAB, hidden=32, layers=1, heads=2, kv_heads=1, logit_scale=6.0)
    return target, draft


@pytest.mark.parametrize("verifier,top_p,lookup", [("match", 1.0, False), ("specinfer", 1.0, False),
                                                   ("specinfer", 0.8, False), ("match", 0.8, False),
                                                   ("match", 1.0, True)])
def test_verifier_reproduces_target_distribution(pair, verifier, top_p, lookup):
    """With `lookup` the prompt's last bigram recurs, so every first step also carries a copied chain
    (engine/prompt_lookup.py) that sample-match must accept only as often as the target draws it."""
    target_hf, draft_hf = pair
    sampling = Sampling(1.0, top_p)
    prompt = PROMPT + PROMPT[:2] if lookup else PROMPT
    expected = exact_two_token_distribution(target_hf, sampling, prompt)
    draft_dist = exact_two_token_distribution(draft_hf, sampling, prompt)
    assert total_variation(expected, draft_dist) > 3 * TV_BOUND  # the test can tell the two apart

    target, draft = tree_model(target_hf, 64), tree_model(draft_hf, 64)
    drafter = StaticTreeDrafter(draft, G.kary_tree(2, 2), sampling, SAMPLED_CHILDREN[verifier])
    if lookup:
        assert lookup_continuation(torch.tensor(prompt), 3, 3) == PROMPT[2:5]
        drafter = PromptLookupDrafter(drafter, 3)
    counts = torch.zeros(VOCAB, VOCAB)
    generator = torch.Generator().manual_seed(1234)
    for _ in range(DRAWS):
        out = speculative_generate(target, drafter, prompt, 2, set(), sampling, verifier, generator).output_ids
        counts[out[0], out[1]] += 1
    assert total_variation(counts / DRAWS, expected) < TV_BOUND


def test_exact_distribution_sums_to_one(pair):
    table = exact_two_token_distribution(pair[0], Sampling(1.0, 0.8))
    assert abs(float(table.sum()) - 1.0) < 1e-5
    assert all(float(table[a, b]) >= 0 for a, b in itertools.product(range(VOCAB), repeat=2))
